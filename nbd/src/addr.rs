//! Listen addresses: `unix:PATH` or `HOST:PORT` on the command line, QEMU's
//! `SocketAddress` (flat) and `SocketAddressLegacy` (`data`-wrapped) in QMP.

use super::error::NbdError;
use serde_json::Value;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path (created on start, removed on stop).
    Unix(PathBuf),
    /// A TCP host (name or address) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            ListenAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

fn bad(addr: &str, why: impl Into<String>) -> NbdError {
    NbdError::BadAddress {
        addr: addr.to_string(),
        why: why.into(),
    }
}

fn parse_port(addr: &str, p: &str) -> Result<u16, NbdError> {
    p.parse::<u16>()
        .map_err(|_| bad(addr, format!("port {p:?} is not a number from 0 to 65535")))
}

impl ListenAddr {
    /// Parses `unix:PATH`, `HOST:PORT`, `[V6ADDR]:PORT` or `HOST` (port 10809).
    pub fn parse(s: &str) -> Result<ListenAddr, NbdError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(bad(s, "empty socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        let t = s.strip_prefix("tcp:").unwrap_or(s);
        if let Some(rest) = t.strip_prefix('[') {
            let (host, tail) = rest.split_once(']').ok_or_else(|| bad(s, "missing ']'"))?;
            let port = match tail.strip_prefix(':') {
                Some(p) => parse_port(s, p)?,
                None if tail.is_empty() => DEFAULT_PORT,
                None => return Err(bad(s, "expected ':PORT' after ']'")),
            };
            return Ok(ListenAddr::Tcp {
                host: host.to_string(),
                port,
            });
        }
        let (host, port) = match t.rsplit_once(':') {
            Some((h, p)) => (h, parse_port(s, p)?),
            None => (t, DEFAULT_PORT),
        };
        if host.is_empty() || host.contains(':') {
            return Err(bad(s, "expected unix:PATH or HOST:PORT"));
        }
        Ok(ListenAddr::Tcp {
            host: host.to_string(),
            port,
        })
    }

    /// Parses QEMU's `SocketAddress` (`{"type": "unix", "path"}`, `{"type":
    /// "inet", "host", "port"}`) or its legacy form with the fields under `data`.
    pub fn from_qmp(v: &Value) -> Result<ListenAddr, NbdError> {
        let text = v.to_string();
        let obj = v
            .as_object()
            .ok_or_else(|| NbdError::Invalid("addr: must be an object".into()))?;
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| NbdError::Invalid("addr: missing 'type'".into()))?;
        let fields = match obj.get("data") {
            Some(Value::Object(d)) => d,
            Some(_) => return Err(NbdError::Invalid("addr.data: must be an object".into())),
            None => obj,
        };
        match ty {
            "unix" => {
                let p = fields
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| NbdError::Invalid("addr: unix address needs 'path'".into()))?;
                if p.is_empty() {
                    return Err(bad(&text, "empty socket path"));
                }
                if fields.get("abstract").and_then(Value::as_bool) == Some(true) {
                    return Err(bad(&text, "abstract Unix sockets are not supported"));
                }
                Ok(ListenAddr::Unix(PathBuf::from(p)))
            }
            "inet" => {
                let host = fields
                    .get("host")
                    .and_then(Value::as_str)
                    .ok_or_else(|| NbdError::Invalid("addr: inet address needs 'host'".into()))?;
                let port = match fields.get("port") {
                    Some(Value::String(p)) => parse_port(&text, p)?,
                    Some(Value::Number(n)) => n
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| bad(&text, "port out of range"))?,
                    None => {
                        return Err(NbdError::Invalid("addr: inet address needs 'port'".into()))
                    }
                    Some(_) => return Err(bad(&text, "port must be a string or a number")),
                };
                Ok(ListenAddr::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            other => Err(bad(
                &text,
                format!("address type '{other}' is not supported (use unix or inet)"),
            )),
        }
    }

    /// The TCP socket addresses the host resolves to (empty for Unix).
    pub fn resolve(&self) -> Result<Vec<SocketAddr>, NbdError> {
        match self {
            ListenAddr::Unix(_) => Ok(Vec::new()),
            ListenAddr::Tcp { host, port } => {
                let v: Vec<SocketAddr> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(|e| bad(&self.to_string(), format!("cannot resolve host: {e}")))?
                    .collect();
                if v.is_empty() {
                    return Err(bad(&self.to_string(), "host resolves to no address"));
                }
                Ok(v)
            }
        }
    }

    /// Whether every address is local to this machine (Unix, or loopback TCP).
    pub fn is_local(&self) -> Result<bool, NbdError> {
        Ok(self.resolve()?.iter().all(|a| a.ip().is_loopback()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_command_line_forms() {
        assert_eq!(
            ListenAddr::parse("unix:/tmp/n.sock").unwrap(),
            ListenAddr::Unix("/tmp/n.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("127.0.0.1:10810").unwrap(),
            ListenAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(
            ListenAddr::parse("[::1]:5").unwrap(),
            ListenAddr::Tcp {
                host: "::1".into(),
                port: 5
            }
        );
        assert_eq!(
            ListenAddr::parse("localhost").unwrap(),
            ListenAddr::Tcp {
                host: "localhost".into(),
                port: 10809
            }
        );
        assert!(ListenAddr::parse("unix:").is_err());
        assert!(ListenAddr::parse("host:99999").is_err());
        assert!(ListenAddr::parse("::1:5").is_err());
    }

    #[test]
    fn parses_qmp_forms() {
        let a = ListenAddr::from_qmp(&json!({"type": "unix", "data": {"path": "/x"}})).unwrap();
        assert_eq!(a, ListenAddr::Unix("/x".into()));
        let a =
            ListenAddr::from_qmp(&json!({"type": "inet", "host": "127.0.0.1", "port": "10809"}))
                .unwrap();
        assert_eq!(
            a,
            ListenAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            }
        );
        let a = ListenAddr::from_qmp(&json!({"type": "inet", "data": {"host": "::1", "port": 7}}))
            .unwrap();
        assert_eq!(
            a,
            ListenAddr::Tcp {
                host: "::1".into(),
                port: 7
            }
        );
        assert!(ListenAddr::from_qmp(&json!({"type": "vsock", "cid": "3"})).is_err());
        assert!(ListenAddr::from_qmp(&json!({"type": "inet", "host": "h"})).is_err());
    }

    #[test]
    fn loopback_detection() {
        assert!(ListenAddr::parse("127.0.0.1:1")
            .unwrap()
            .is_local()
            .unwrap());
        assert!(ListenAddr::parse("unix:/a").unwrap().is_local().unwrap());
        assert!(!ListenAddr::parse("0.0.0.0:1").unwrap().is_local().unwrap());
    }
}
