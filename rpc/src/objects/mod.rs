//! User-created objects, QEMU's `object-add` / `object-del` (QOM's
//! `/objects` container): an id names one object of a type. Users hold an
//! object by its `Arc`, so deleting an object a server or a node uses takes it
//! out of the table while they keep it, as QEMU's reference counts do (QEMU
//! lets `object-del` remove TLS credentials a running NBD server holds).

pub mod throttle;

use nbd::tls::{AuthzSimple, TlsCreds};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One object.
#[derive(Debug, Clone)]
pub enum Object {
    /// `tls-creds-x509`.
    TlsCredsX509(Arc<TlsCreds>),
    /// `authz-simple`.
    AuthzSimple(Arc<AuthzSimple>),
}

impl Object {
    /// The QOM type name.
    pub fn qom_type(&self) -> &'static str {
        match self {
            Object::TlsCredsX509(_) => "tls-creds-x509",
            Object::AuthzSimple(_) => "authz-simple",
        }
    }
}

/// The objects of one service.
#[derive(Debug, Default)]
pub struct Objects {
    map: Mutex<BTreeMap<String, Object>>,
}

impl Objects {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Object>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `obj` as `id`; QEMU's error when the id is taken.
    pub fn add(&self, id: &str, obj: Object) -> Result<(), String> {
        let mut m = self.lock();
        if m.contains_key(id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        m.insert(id.to_string(), obj);
        Ok(())
    }

    /// Removes `id`; QEMU's error when there is none.
    pub fn del(&self, id: &str) -> Result<Object, String> {
        self.lock()
            .remove(id)
            .ok_or_else(|| format!("object '{id}' not found"))
    }

    /// Whether `id` is taken.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The TLS credentials `id`, in QEMU's words when missing or of another type.
    pub fn tls_creds(&self, id: &str) -> Result<Arc<TlsCreds>, String> {
        match self.lock().get(id) {
            Some(Object::TlsCredsX509(c)) => Ok(c.clone()),
            Some(_) => Err(format!("Object with id '{id}' is not TLS credentials")),
            None => Err(format!("No TLS credentials with id '{id}'")),
        }
    }

    /// The authorization object `id`.
    pub fn authz(&self, id: &str) -> Result<Arc<AuthzSimple>, String> {
        match self.lock().get(id) {
            Some(Object::AuthzSimple(a)) => Ok(a.clone()),
            Some(_) => Err(format!(
                "Object with id '{id}' is not an authorization object"
            )),
            None => Err(format!("No authorization object with id '{id}'")),
        }
    }

    /// `(id, type)` of every object.
    pub fn list(&self) -> Vec<(String, &'static str)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.qom_type()))
            .collect()
    }
}
