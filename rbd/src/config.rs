//! Which image to open and how to reach its cluster: QEMU's `rbd` options
//! (`pool`, `namespace`, `image`, `snapshot`, `conf`, `user`, `server`,
//! `auth-client-required`) and its `rbd:pool[/namespace]/image[@snap][:key=value...]`
//! filenames (backing names in qcow2 headers), with QEMU's escapes (`\:`,
//! `\@`, `\/`, `\\`). Pure parsing; nothing here connects.

use serde_json::{Map, Value};

/// Where an RBD node's image is and how its connection is made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RbdConfig {
    /// RADOS pool.
    pub pool: String,
    /// RADOS namespace in the pool, if any.
    pub namespace: Option<String>,
    /// Image name.
    pub image: String,
    /// Snapshot to open (read-only), if any.
    pub snapshot: Option<String>,
    /// Ceph configuration file (`None`: librados' default search).
    pub conf: Option<String>,
    /// Ceph user without `client.` (`None`: librados' default, `admin`).
    pub user: Option<String>,
    /// Further `rados_conf_set` options, in order (a filename's
    /// `key=value` pairs, `server` as `mon_host`, SPDK's `config`).
    pub options: Vec<(String, String)>,
}

impl RbdConfig {
    /// QEMU's filename of the node: `rbd:pool/image[@snap][:conf=...]`.
    pub fn filename(&self) -> String {
        let esc = |s: &str| {
            let mut o = String::with_capacity(s.len());
            for c in s.chars() {
                if matches!(c, ':' | '@' | '/' | '\\') {
                    o.push('\\');
                }
                o.push(c);
            }
            o
        };
        let mut f = format!("rbd:{}/", esc(&self.pool));
        if let Some(ns) = &self.namespace {
            f.push_str(&esc(ns));
            f.push('/');
        }
        f.push_str(&esc(&self.image));
        if let Some(s) = &self.snapshot {
            f.push('@');
            f.push_str(&esc(s));
        }
        if let Some(c) = &self.conf {
            f.push_str(":conf=");
            f.push_str(&esc(c));
        }
        if let Some(u) = &self.user {
            f.push_str(":id=");
            f.push_str(&esc(u));
        }
        for (k, v) in &self.options {
            f.push_str(&format!(":{}={}", esc(k), esc(v)));
        }
        f
    }

    /// Parses QEMU's `rbd:` filename (QEMU's `qemu_rbd_parse_filename`).
    pub fn parse_filename(name: &str) -> Result<Self, String> {
        let rest = name
            .strip_prefix("rbd:")
            .ok_or_else(|| format!("{name:?} is not an rbd: filename"))?;
        // Split on unescaped separators, keeping which one ended each token.
        let mut toks: Vec<(String, char)> = Vec::new();
        let mut cur = String::new();
        let mut it = rest.chars();
        let mut in_opts = false;
        while let Some(c) = it.next() {
            match c {
                '\\' => match it.next() {
                    Some(n) => cur.push(n),
                    None => return Err("rbd filename ends in a lone backslash".into()),
                },
                ':' => {
                    toks.push((std::mem::take(&mut cur), ':'));
                    in_opts = true;
                }
                '/' | '@' if !in_opts => toks.push((std::mem::take(&mut cur), c)),
                c => cur.push(c),
            }
        }
        toks.push((cur, '\0'));
        let mut cfg = RbdConfig::default();
        let mut path: Vec<String> = Vec::new();
        let mut i = 0;
        // pool / [namespace /] image [@ snap]
        while i < toks.len() {
            let (t, sep) = &toks[i];
            i += 1;
            match sep {
                '/' => path.push(t.clone()),
                '@' => {
                    path.push(t.clone());
                    let (s, sep2) = toks.get(i).cloned().unwrap_or_default();
                    i += 1;
                    cfg.snapshot = Some(s);
                    if sep2 != ':' {
                        break;
                    }
                    break;
                }
                _ => {
                    path.push(t.clone());
                    break;
                }
            }
        }
        match path.as_slice() {
            [p, im] => {
                cfg.pool = p.clone();
                cfg.image = im.clone();
            }
            [p, ns, im] => {
                cfg.pool = p.clone();
                cfg.namespace = Some(ns.clone());
                cfg.image = im.clone();
            }
            _ => return Err("Pool name is required".into()),
        }
        if cfg.pool.is_empty() {
            return Err("Pool name is required".into());
        }
        if cfg.image.is_empty() {
            return Err("Image name is required".into());
        }
        if cfg.snapshot.as_deref() == Some("") {
            return Err("snapshot name is empty".into());
        }
        for (t, _) in &toks[i.min(toks.len())..] {
            let (k, v) = t
                .split_once('=')
                .ok_or_else(|| format!("conf option {t:?} has no value"))?;
            match k {
                "conf" => cfg.conf = Some(v.to_string()),
                "id" => cfg.user = Some(v.to_string()),
                _ => cfg.options.push((k.to_string(), v.to_string())),
            }
        }
        Ok(cfg)
    }

    /// QEMU's `BlockdevOptionsRbd` members (the caller has taken `driver`
    /// and the common options out). Errors name the parameter as QEMU does.
    pub fn from_options(m: &Map<String, Value>) -> Result<Self, String> {
        let s = |k: &str| -> Result<Option<String>, String> {
            match m.get(k) {
                None => Ok(None),
                Some(Value::String(v)) => Ok(Some(v.clone())),
                Some(_) => Err(format!(
                    "Invalid parameter type for '{k}', expected: string"
                )),
            }
        };
        let pool = s("pool")?.ok_or("Parameter 'pool' is missing")?;
        let image = s("image")?.ok_or("Parameter 'image' is missing")?;
        let mut cfg = RbdConfig {
            pool,
            image,
            namespace: s("namespace")?,
            snapshot: s("snapshot")?,
            conf: s("conf")?,
            user: s("user")?,
            options: Vec::new(),
        };
        if let Some(v) = m.get("server") {
            let Value::Array(list) = v else {
                return Err("Invalid parameter type for 'server', expected: array".into());
            };
            let mut hosts = Vec::new();
            for (i, h) in list.iter().enumerate() {
                let host = h
                    .get("host")
                    .and_then(Value::as_str)
                    .ok_or(format!("Parameter 'server[{i}].host' is missing"))?;
                let port = match h.get("port") {
                    None => "6789".to_string(),
                    Some(Value::String(p)) => p.clone(),
                    Some(_) => {
                        return Err(format!(
                            "Invalid parameter type for 'server[{i}].port', expected: string"
                        ))
                    }
                };
                if host.contains(':') {
                    hosts.push(format!("[{host}]:{port}"));
                } else {
                    hosts.push(format!("{host}:{port}"));
                }
            }
            cfg.options.push(("mon_host".into(), hosts.join(",")));
        }
        if let Some(v) = m.get("auth-client-required") {
            let Value::Array(list) = v else {
                return Err(
                    "Invalid parameter type for 'auth-client-required', expected: array".into(),
                );
            };
            let mut modes = Vec::new();
            for a in list {
                match a.as_str() {
                    Some(x @ ("cephx" | "none")) => modes.push(x),
                    _ => {
                        return Err(format!(
                            "Parameter 'auth-client-required' does not accept value '{a}'"
                        ))
                    }
                }
            }
            cfg.options
                .push(("auth_client_required".into(), modes.join(";")));
        }
        for (k, v) in [
            ("pool", &Some(cfg.pool.clone())),
            ("image", &Some(cfg.image.clone())),
        ] {
            if v.as_deref() == Some("") {
                return Err(format!("Parameter '{k}' must not be empty"));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::RbdConfig;

    /// QEMU's filename forms: pool/image, pool/namespace/image, a snapshot,
    /// options (conf, id, others), escapes; and back to the same filename.
    #[test]
    fn filenames_parse_as_qemu_writes_them() {
        let c = RbdConfig::parse_filename("rbd:rbd/golden").unwrap();
        assert_eq!((c.pool.as_str(), c.image.as_str()), ("rbd", "golden"));
        assert_eq!(c.snapshot, None);
        let c = RbdConfig::parse_filename(
            "rbd:p/ns/im@s1:conf=/tmp/c\\:x/ceph.conf:id=admin:rbd_cache=false",
        )
        .unwrap();
        assert_eq!(c.pool, "p");
        assert_eq!(c.namespace.as_deref(), Some("ns"));
        assert_eq!(c.image, "im");
        assert_eq!(c.snapshot.as_deref(), Some("s1"));
        assert_eq!(c.conf.as_deref(), Some("/tmp/c:x/ceph.conf"));
        assert_eq!(c.user.as_deref(), Some("admin"));
        assert_eq!(c.options, vec![("rbd_cache".into(), "false".into())]);
        assert_eq!(RbdConfig::parse_filename(&c.filename()).unwrap(), c);
        let c = RbdConfig::parse_filename("rbd:p/a\\@b:conf=/c").unwrap();
        assert_eq!(c.image, "a@b");
        assert_eq!(c.snapshot, None);
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:/im",
            "rbd:p/",
            "rbd:p/i@",
            "rbd:p/i:noval",
            "rbd:p/i\\",
        ] {
            assert!(RbdConfig::parse_filename(bad).is_err(), "{bad}");
        }
    }

    /// `blockdev-add` options: required members, `server` as mon_host,
    /// wrong types refused with the parameter's name.
    #[test]
    fn options_parse_with_qemus_errors() {
        let m = serde_json::json!({"pool": "rbd", "image": "i",
            "server": [{"host": "127.0.0.1", "port": "3300"}, {"host": "::1", "port": "1"}]});
        let c = RbdConfig::from_options(m.as_object().unwrap()).unwrap();
        assert_eq!(
            c.options,
            vec![("mon_host".into(), "127.0.0.1:3300,[::1]:1".into())]
        );
        let e = RbdConfig::from_options(serde_json::json!({"pool": "rbd"}).as_object().unwrap())
            .unwrap_err();
        assert_eq!(e, "Parameter 'image' is missing");
        let e = RbdConfig::from_options(
            serde_json::json!({"pool": 1, "image": "i"})
                .as_object()
                .unwrap(),
        )
        .unwrap_err();
        assert!(e.contains("'pool'"), "{e}");
    }
}
