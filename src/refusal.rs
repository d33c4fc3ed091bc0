//! Refusals: every time pglb turns a client away it says why, as a PostgreSQL
//! ErrorResponse that drivers print, instead of closing the socket silently.

use std::time::Duration;

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::ErrorResponse;

/// Why a client was refused. The message names the listen so an operator reading a
/// client's error knows which pglb front door said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No active or backup server is usable.
    NoServer { listen: String },
    /// Every usable server is at maxconn and the queue wait ran out.
    QueueTimeout { listen: String, waited: Duration },
    /// Global or listen maxconn reached.
    TooManyClients {
        listen: String,
        scope: &'static str,
        limit: usize,
    },
    /// Every connect attempt failed.
    ConnectFailed {
        listen: String,
        attempts: u32,
        last_error: String,
    },
    /// Every server tried refused the login with its own ErrorResponse (PgBouncer's
    /// "no more connections allowed", an unknown database...): the last one is passed on
    /// as the server sent it.
    ServerRefused {
        listen: String,
        server: String,
        response: Vec<u8>,
    },
    /// The client did not send its startup packet in time.
    StartupTimeout { listen: String, timeout: Duration },
    /// The startup packet was malformed or unsupported.
    BadStartup {
        sqlstate: &'static str,
        message: String,
    },
}

impl Refusal {
    pub fn sqlstate(&self) -> &str {
        if let Refusal::ServerRefused { response, .. } = self {
            return field(response, b'C').unwrap_or("08006");
        }
        match self {
            // cannot_connect_now: try again later, the server side is unavailable.
            Refusal::NoServer { .. } | Refusal::ConnectFailed { .. } => "57P03",
            // too_many_connections.
            Refusal::QueueTimeout { .. } | Refusal::TooManyClients { .. } => "53300",
            Refusal::StartupTimeout { .. } => "08P01",
            Refusal::ServerRefused { .. } => "",
            Refusal::BadStartup { sqlstate, .. } => sqlstate,
            // admin_shutdown.
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::NoServer { listen } => {
                format!("pglb: listen '{listen}' has no server available")
            }
            Refusal::QueueTimeout { listen, waited } => format!(
                "pglb: listen '{listen}': all servers are at maxconn and the queue timed out after {}",
                humantime::format_duration(*waited)
            ),
            Refusal::TooManyClients {
                listen,
                scope,
                limit,
            } => {
                format!(
                    "pglb: listen '{listen}': too many clients ({scope} maxconn {limit} reached)"
                )
            }
            Refusal::ConnectFailed {
                listen,
                attempts,
                last_error,
            } => format!(
                "pglb: listen '{listen}': could not connect to a server after {attempts} attempt(s); last error: {last_error}"
            ),
            Refusal::StartupTimeout { listen, timeout } => format!(
                "pglb: listen '{listen}': no startup packet received within {}",
                humantime::format_duration(*timeout)
            ),
            Refusal::BadStartup { message, .. } => format!("pglb: {message}"),
            Refusal::ServerRefused {
                server, response, ..
            } => format!(
                "{} (from server '{server}')",
                field(response, b'M').unwrap_or("ErrorResponse")
            ),
        }
    }

    /// A short word for the session log line.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::NoServer { .. } => "no-server",
            Refusal::QueueTimeout { .. } => "queue-timeout",
            Refusal::TooManyClients { .. } => "maxconn",
            Refusal::ConnectFailed { .. } => "connect-failed",
            Refusal::StartupTimeout { .. } => "startup-timeout",
            Refusal::ServerRefused { .. } => "server-refused",
            Refusal::BadStartup { .. } => "bad-startup",
        }
    }

    /// The ErrorResponse ('E') bytes for this refusal, severity FATAL.
    pub fn to_error_response(&self) -> BytesMut {
        if let Refusal::ServerRefused { response, .. } = self {
            return BytesMut::from(&response[..]);
        }
        error_response("FATAL", self.sqlstate(), &self.message())
    }
}

/// A field of an ErrorResponse message (type, length, then code-prefixed strings).
pub(crate) fn field(message: &[u8], code: u8) -> Option<&str> {
    message
        .get(5..)?
        .split(|&b| b == 0)
        .find(|f| f.first() == Some(&code))
        .and_then(|f| std::str::from_utf8(&f[1..]).ok())
}

/// Encodes an ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> BytesMut {
    let fields = vec![
        (b'S', severity.to_owned()),
        (b'V', severity.to_owned()),
        (b'C', sqlstate.to_owned()),
        (b'M', message.to_owned()),
    ];
    let mut buf = BytesMut::new();
    // Encoding into a BytesMut cannot fail for these fields; an empty buffer would only
    // mean a bare close, never a panic.
    let _ = ErrorResponse::new(fields).encode(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_is_well_formed() {
        let r = Refusal::NoServer {
            listen: "postgres".into(),
        };
        let b = r.to_error_response();
        assert_eq!(b[0], b'E');
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let text = String::from_utf8_lossy(&b[5..]);
        assert!(text.contains("SFATAL\0"));
        assert!(text.contains("C57P03\0"));
        assert!(text.contains("listen 'postgres' has no server available"));
        assert_eq!(b[b.len() - 1], 0);
    }
}
