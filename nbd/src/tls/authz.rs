//! QEMU's `authz-simple` object: one identity allowed, here the
//! distinguished name of a TLS client's certificate, written as GnuTLS writes
//! it (`gnutls_x509_crt_get_dn`, RFC 4514: most specific first, `,` between
//! RDNs, `+` inside one, special characters escaped), e.g.
//! `CN=client.example.com,O=Example,C=GB`.

use x509_parser::objects::{oid2abbrev, oid_registry};

/// An `authz-simple` object.
#[derive(Debug)]
pub struct AuthzSimple {
    /// The object's id.
    pub id: String,
    /// The identity allowed.
    pub identity: String,
}

impl AuthzSimple {
    /// Whether the client whose certificate is `cert` (DER) is allowed; the
    /// error says why not, in QEMU's words.
    pub fn check(&self, cert: Option<&[u8]>) -> Result<(), String> {
        let Some(cert) = cert else {
            return Err("No certificate peer chain is available".into());
        };
        let dn = distinguished_name(cert)?;
        if dn == self.identity {
            Ok(())
        } else {
            Err(format!("TLS x509 authz check for {dn} is denied"))
        }
    }
}

/// The subject of a DER certificate as GnuTLS formats it.
pub fn distinguished_name(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the peer certificate: {e}"))?;
    let reg = oid_registry();
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter() {
        let mut atvs = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type();
            let name = match oid2abbrev(oid, reg) {
                Ok("emailAddress") => "EMAIL".to_string(),
                Ok(a) => a.to_string(),
                Err(_) => oid.to_id_string(),
            };
            let value = match atv.as_str() {
                Ok(s) => escape(s),
                Err(_) => {
                    let mut h = String::from("#");
                    for b in atv.as_slice() {
                        h.push_str(&format!("{b:02x}"));
                    }
                    h
                }
            };
            atvs.push(format!("{name}={value}"));
        }
        rdns.push(atvs.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

/// RFC 4514 escaping of an attribute value.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_as_rfc4514() {
        assert_eq!(escape("a,b"), "a\\,b");
        assert_eq!(escape(" x "), "\\ x\\ ");
        assert_eq!(escape("#1"), "\\#1");
        assert_eq!(escape("plain"), "plain");
    }
}
