//! Where an NBD client connects and how it behaves when the connection is
//! lost: QEMU's `nbd` driver options (`server`, `export`, `reconnect-delay`,
//! `open-timeout`), its URIs (`nbd://host:port/export`,
//! `nbd+unix:///export?socket=path`) and the filename QEMU shows and writes
//! for such a node (block/nbd.c `nbd_refresh_filename`).

use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// The NBD port when none is given.
pub const DEFAULT_PORT: u16 = 10809;

/// The server's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// TCP.
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// Loaded client credentials (compared by identity).
#[derive(Debug, Clone)]
pub struct ClientTls(pub std::sync::Arc<crate::tls::TlsCreds>);

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClientTls {}

/// An NBD client's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Where.
    pub server: ServerAddr,
    /// The export's name (`None`: the default export, "").
    pub export: Option<String>,
    /// How long a lost connection is retried before requests fail with EIO
    /// (0: they fail at once; reconnection goes on in the background).
    pub reconnect_delay: Duration,
    /// How long the first connection is retried at open (0: one attempt).
    pub open_timeout: Duration,
    /// `tls-creds`: the id of the credentials object (resolved into `tls` by
    /// whoever holds the objects, before the open).
    pub tls_creds: Option<String>,
    /// `tls-hostname`: the name the server's certificate must carry (default:
    /// the TCP host; on a Unix socket without it only the chain is checked).
    pub tls_hostname: Option<String>,
    /// The credentials `tls_creds` names: the client starts TLS and never
    /// falls back to plain text.
    pub tls: Option<ClientTls>,
}

impl ClientConfig {
    /// The TLS session to start on a new connection, if any: an error when
    /// `tls-creds` was given and not resolved, or names server credentials.
    pub fn tls_session(&self) -> Result<Option<(rustls::Connection, Option<String>)>, String> {
        let Some(id) = &self.tls_creds else {
            return Ok(None);
        };
        let Some(ClientTls(creds)) = &self.tls else {
            return Err(format!("No TLS credentials with id '{id}'"));
        };
        let host = match (&self.tls_hostname, &self.server) {
            (Some(h), _) => Some(h.as_str()),
            (None, ServerAddr::Inet { host, .. }) => Some(host.as_str()),
            (None, ServerAddr::Unix(_)) => None,
        };
        creds
            .client_session(host)
            .map(|c| Some((c, host.map(str::to_string))))
    }

    /// The export name sent to the server.
    pub fn export_name(&self) -> &str {
        self.export.as_deref().unwrap_or("")
    }

    /// The filename QEMU gives the node (and writes as a backing file name).
    pub fn filename(&self) -> String {
        match (&self.server, &self.export) {
            (ServerAddr::Unix(p), Some(e)) => format!("nbd+unix:///{e}?socket={}", p.display()),
            (ServerAddr::Unix(p), None) => format!("nbd+unix://?socket={}", p.display()),
            (ServerAddr::Inet { host, port }, Some(e)) => format!("nbd://{host}:{port}/{e}"),
            (ServerAddr::Inet { host, port }, None) => format!("nbd://{host}:{port}"),
        }
    }

    /// The options as QEMU's `blockdev-add` takes them (without `driver`).
    pub fn to_options(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let server = match &self.server {
            ServerAddr::Unix(p) => json!({"type": "unix", "path": p.display().to_string()}),
            ServerAddr::Inet { host, port } => {
                json!({"type": "inet", "host": host, "port": port.to_string()})
            }
        };
        m.insert("server".into(), server);
        if let Some(e) = &self.export {
            m.insert("export".into(), Value::from(e.clone()));
        }
        if !self.reconnect_delay.is_zero() {
            m.insert(
                "reconnect-delay".into(),
                Value::from(self.reconnect_delay.as_secs()),
            );
        }
        if !self.open_timeout.is_zero() {
            m.insert(
                "open-timeout".into(),
                Value::from(self.open_timeout.as_secs()),
            );
        }
        if let Some(t) = &self.tls_creds {
            m.insert("tls-creds".into(), Value::from(t.clone()));
        }
        if let Some(h) = &self.tls_hostname {
            m.insert("tls-hostname".into(), Value::from(h.clone()));
        }
        m
    }

    /// Parses QEMU's `nbd` options (`server`, `export`, `reconnect-delay`,
    /// `open-timeout`; `driver` and the options of every node are ignored
    /// here). Errors are QEMU's words where QEMU has them.
    pub fn from_options(m: &Map<String, Value>) -> Result<ClientConfig, String> {
        const KNOWN: &[&str] = &[
            "server",
            "export",
            "reconnect-delay",
            "open-timeout",
            "tls-creds",
            "tls-hostname",
            "driver",
            "node-name",
            "read-only",
            "auto-read-only",
            "cache",
            "discard",
            "detect-zeroes",
            "force-share",
        ];
        if let Some(k) = m.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!("Parameter '{k}' is unexpected"));
        }
        let server = match m.get("server") {
            None => return Err("Parameter 'server' is missing".into()),
            Some(Value::Object(s)) => parse_server(s)?,
            Some(_) => return Err("Invalid parameter type for 'server', expected: object".into()),
        };
        let export = match m.get("export") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("Invalid parameter type for 'export', expected: string".into()),
        };
        if export
            .as_ref()
            .is_some_and(|e| e.len() > crate::proto::MAX_STRING)
        {
            return Err("export name too long to send to server".into());
        }
        let string = |k: &str| match m.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!(
                "Invalid parameter type for '{k}', expected: string"
            )),
        };
        Ok(ClientConfig {
            server,
            export,
            reconnect_delay: Duration::from_secs(seconds(m, "reconnect-delay")?),
            open_timeout: Duration::from_secs(seconds(m, "open-timeout")?),
            tls_creds: string("tls-creds")?,
            tls_hostname: string("tls-hostname")?,
            tls: None,
        })
    }

    /// Parses an NBD URI as QEMU does (`nbd://`, `nbd+tcp://`, `nbd+unix://`).
    pub fn parse_uri(uri: &str) -> Result<ClientConfig, String> {
        let bad = || format!("invalid NBD URI {uri:?}");
        let (scheme, rest) = uri.split_once("://").ok_or_else(bad)?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            _ => return Err(format!("{}: unknown scheme {scheme:?}", bad())),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = (!path.is_empty())
            .then(|| percent_decode(path))
            .transpose()
            .map_err(|_| bad())?;
        let server = if unix {
            if !authority.is_empty() {
                return Err(format!("{}: nbd+unix takes no host", bad()));
            }
            let q = query.ok_or_else(|| format!("{}: nbd+unix needs ?socket=PATH", bad()))?;
            let path = q
                .strip_prefix("socket=")
                .filter(|p| !p.is_empty() && !p.contains('&'))
                .ok_or_else(|| format!("{}: the one query parameter is socket=PATH", bad()))?;
            ServerAddr::Unix(PathBuf::from(percent_decode(path).map_err(|_| bad())?))
        } else {
            if query.is_some() {
                return Err(format!("{}: nbd over TCP takes no query", bad()));
            }
            let (host, port) = split_host_port(authority).ok_or_else(bad)?;
            ServerAddr::Inet {
                host: if host.is_empty() {
                    "localhost".into()
                } else {
                    host
                },
                port,
            }
        };
        Ok(ClientConfig {
            server,
            export,
            reconnect_delay: Duration::ZERO,
            open_timeout: Duration::ZERO,
            tls_creds: None,
            tls_hostname: None,
            tls: None,
        })
    }
}

fn parse_server(s: &Map<String, Value>) -> Result<ServerAddr, String> {
    let field = |k: &str| -> Result<Option<String>, String> {
        match s.get(k) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(Value::Number(n)) if k == "port" => Ok(Some(n.to_string())),
            Some(_) => Err(format!(
                "Invalid parameter type for 'server.{k}', expected: string"
            )),
        }
    };
    let ty = field("type")?.ok_or("Parameter 'server.type' is missing")?;
    let allowed: &[&str] = match ty.as_str() {
        "unix" => &["type", "path"],
        "inet" => &["type", "host", "port"],
        other => return Err(format!("Parameter 'type' does not accept value '{other}'")),
    };
    if let Some(k) = s.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("Parameter 'server.{k}' is unexpected"));
    }
    if ty == "unix" {
        let p = field("path")?.ok_or("Parameter 'server.path' is missing")?;
        return Ok(ServerAddr::Unix(PathBuf::from(p)));
    }
    let host = field("host")?.ok_or("Parameter 'server.host' is missing")?;
    let port = field("port")?.ok_or("Parameter 'server.port' is missing")?;
    // (QEMU resolves a service name here; sluice takes numbers, and words
    // QEMU's refusal of a name it cannot resolve.)
    let port = port.parse::<u16>().map_err(|_| {
        format!(
            "address resolution failed for {host}:{port}: Servname not supported for ai_socktype"
        )
    })?;
    Ok(ServerAddr::Inet { host, port })
}

fn seconds(m: &Map<String, Value>, k: &str) -> Result<u64, String> {
    match m.get(k) {
        None => Ok(0),
        Some(v) => match v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        {
            Some(n) if n <= u32::MAX as u64 => Ok(n),
            _ => Err(format!(
                "Invalid parameter type for '{k}', expected: integer"
            )),
        },
    }
}

fn split_host_port(a: &str) -> Option<(String, u16)> {
    if let Some(r) = a.strip_prefix('[') {
        let (h, rest) = r.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((a.to_string(), DEFAULT_PORT)),
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(h, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_as_qemu_writes_them() {
        for u in [
            "nbd+unix:///exp?socket=/tmp/s.sock",
            "nbd+unix://?socket=/tmp/s.sock",
            "nbd://127.0.0.1:10810/exp",
            "nbd://h:1",
        ] {
            let c = ClientConfig::parse_uri(u).unwrap();
            assert_eq!(c.filename(), u);
        }
        let c = ClientConfig::parse_uri("nbd+tcp://[::1]/e%20x").unwrap();
        assert_eq!(
            c.server,
            ServerAddr::Inet {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(c.export.as_deref(), Some("e x"));
        for bad in [
            "nbd+rdma://h/e",
            "nbd+unix:///e",
            "nbd+unix://h/e?socket=/s",
            "nbd://h:99999/e",
            "nbd://h/e?socket=/s",
            "nbd+unix:///e?socket=/s&x=1",
        ] {
            assert!(ClientConfig::parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_round_trip_and_errors() {
        let m = json!({"server": {"type": "inet", "host": "h", "port": "77"}, "export": "e",
                       "reconnect-delay": 3})
        .as_object()
        .cloned()
        .unwrap();
        let c = ClientConfig::from_options(&m).unwrap();
        assert_eq!(c.reconnect_delay, Duration::from_secs(3));
        assert_eq!(ClientConfig::from_options(&c.to_options()).unwrap(), c);
        for (o, want) in [
            (json!({}), "'server' is missing"),
            (json!({"server": {"type": "vsock"}}), "type"),
            (json!({"server": {"type": "unix"}}), "server.path"),
            (
                json!({"server": {"type": "inet", "host": "h", "port": "x"}}),
                "port",
            ),
            (
                json!({"server": {"type": "unix", "path": "/s"}, "tls-creds": 3}),
                "tls-creds",
            ),
            (
                json!({"server": {"type": "unix", "path": "/s"}, "x-dirty-bitmap": "b"}),
                "x-dirty-bitmap",
            ),
            (
                json!({"server": {"type": "unix", "path": "/s"}, "export": 3}),
                "export",
            ),
        ] {
            let e = ClientConfig::from_options(o.as_object().unwrap()).unwrap_err();
            assert!(e.contains(want), "{o}: {e}");
        }
    }
}
