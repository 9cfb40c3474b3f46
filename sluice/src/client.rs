//! `sluice rpc`: the command-line JSON-RPC client.
//!
//! `sluice rpc [-s SOCK] METHOD [key=value ...] [--params JSON]` sends one
//! request and prints the result as JSON; on an error it prints the message on
//! stderr and exits non-zero.

mod wait;

use clap::Args;
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;
use thiserror::Error;

/// Options of `sluice rpc`.
#[derive(Debug, Args, Clone)]
pub struct RpcArgs {
    /// JSON-RPC server: a Unix socket path, or HOST:PORT for TCP.
    #[arg(short = 's', long = "socket", default_value = "/var/tmp/sluice.sock")]
    pub socket: String,
    /// Seconds to wait for the reply.
    #[arg(short = 't', long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Parameters as one JSON object (merged under the key=value ones).
    #[arg(long)]
    pub params: Option<String>,
    /// Follow the block job the command starts (`job-id`, else `device`) with a
    /// progress bar on stderr; print its completion event; fail if it failed.
    #[arg(long)]
    pub wait: bool,
    /// The method, e.g. bdev_get_bdevs.
    pub method: String,
    /// Parameters as key=value; a value that reads as JSON (a number, true,
    /// false, null, an array, an object, a quoted string) is taken as such,
    /// anything else is a string.
    #[arg(value_name = "KEY=VALUE")]
    pub args: Vec<String>,
}

/// What can go wrong in the client.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Bad command-line parameters.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached.
    #[error("cannot connect to {addr}: {source} (is sluice serving there?)")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reply was not what JSON-RPC promises.
    #[error("bad reply: {0}")]
    BadReply(String),
    /// The method returned an error.
    #[error("{message} (code {code})")]
    Rpc {
        /// The JSON-RPC error code.
        code: i64,
        /// The error message.
        message: String,
    },
}

/// One `key=value` argument as a JSON member.
pub fn parse_kv(arg: &str) -> Result<(String, Value), ClientError> {
    let (k, v) = arg
        .split_once('=')
        .ok_or_else(|| ClientError::Usage(format!("{arg:?} is not KEY=VALUE")))?;
    if k.is_empty() {
        return Err(ClientError::Usage(format!("{arg:?} has an empty key")));
    }
    let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

/// The `params` object from `--params` and the key=value arguments.
pub fn build_params(params: Option<&str>, kvs: &[String]) -> Result<Option<Value>, ClientError> {
    let mut obj = match params {
        None => Map::new(),
        Some(p) => match serde_json::from_str::<Value>(p) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(ClientError::Usage("--params must be a JSON object".into())),
            Err(e) => return Err(ClientError::Usage(format!("--params is not JSON: {e}"))),
        },
    };
    for kv in kvs {
        let (k, v) = parse_kv(kv)?;
        obj.insert(k, v);
    }
    Ok(if obj.is_empty() && params.is_none() {
        None
    } else {
        Some(Value::Object(obj))
    })
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(addr: &str, timeout: Duration) -> Result<Stream, ClientError> {
        let cerr = |source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let s = match addr.parse::<SocketAddr>() {
            Ok(sa) => {
                let s = TcpStream::connect_timeout(&sa, timeout).map_err(cerr)?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(timeout)).map_err(cerr)?;
                Stream::Tcp(s)
            }
            Err(_) => {
                let s = UnixStream::connect(addr).map_err(cerr)?;
                s.set_read_timeout(Some(timeout)).map_err(cerr)?;
                Stream::Unix(s)
            }
        };
        Ok(s)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Calls `method` on the server at `addr` and returns its result.
pub fn call(
    addr: &str,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let mut s = Stream::connect(addr, timeout)?;
    let mut req = json!({"jsonrpc": "2.0", "method": method, "id": 1});
    if let Some(p) = params {
        req["params"] = p;
    }
    s.write_all(req.to_string().as_bytes())
        .map_err(|source| ClientError::Io {
            what: "sending the request",
            source,
        })?;
    let reply = serde_json::Deserializer::from_reader(&mut s)
        .into_iter::<Value>()
        .next()
        .ok_or_else(|| {
            ClientError::BadReply("the server closed the connection without replying".into())
        })?
        .map_err(|e| match e.io_error_kind() {
            Some(_) => ClientError::Io {
                what: "reading the reply",
                source: e.into(),
            },
            None => ClientError::BadReply(e.to_string()),
        })?;
    if let Some(err) = reply.get("error") {
        return Err(ClientError::Rpc {
            code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_string(),
        });
    }
    reply
        .get("result")
        .cloned()
        .ok_or_else(|| ClientError::BadReply(format!("no result in {reply}")))
}

/// Runs `sluice rpc`.
pub fn run(args: RpcArgs) -> ExitCode {
    let res = (|| {
        if !(args.timeout > 0.0 && args.timeout.is_finite()) {
            return Err(ClientError::Usage(
                "--timeout must be a positive number of seconds".into(),
            ));
        }
        let params = build_params(args.params.as_deref(), &args.args)?;
        let timeout = Duration::from_secs_f64(args.timeout);
        if !args.wait {
            return call(&args.socket, &args.method, params, timeout);
        }
        let id = wait::job_id_of(&params).ok_or_else(|| {
            ClientError::Usage("--wait needs a job-id or device parameter".into())
        })?;
        let after = wait::last_event_id(&args.socket, timeout)?;
        call(&args.socket, &args.method, params, timeout)?;
        let legacy = args.method == "block_stream";
        let (event, ok) = wait::follow(&args.socket, &id, after, legacy, timeout)?;
        if ok {
            Ok(event)
        } else {
            println!(
                "{}",
                serde_json::to_string_pretty(&event).unwrap_or_else(|_| event.to_string())
            );
            Err(ClientError::Rpc {
                code: -1,
                message: format!("job {id} did not complete successfully"),
            })
        }
    })();
    match res {
        Ok(v) => {
            let text = serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string());
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice rpc: {}: {e}", args.method);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values() {
        let p = build_params(
            Some(r#"{"a": 1, "b": "x"}"#),
            &[
                "b=Malloc0".into(),
                "n=1024".into(),
                "f=false".into(),
                "l=[1,2]".into(),
                "s=\"12\"".into(),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            p,
            json!({"a": 1, "b": "Malloc0", "n": 1024, "f": false, "l": [1, 2], "s": "12"})
        );
        assert!(build_params(None, &[]).unwrap().is_none());
        assert!(build_params(None, &["novalue".into()]).is_err());
        assert!(build_params(Some("[1]"), &[]).is_err());
    }
}
