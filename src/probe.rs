//! Health probes: one check of one server, returning HAProxy's status codes.
//!
//! - `tcp`: connect, then close with an RST (SO_LINGER 0) so PgBouncer logs nothing.
//! - `ssl`: SSLRequest, pass on `S` or `N`; no login, no log line.
//! - `pgsql`: HAProxy's pgsql-check: a StartupMessage with only `user`, pass on any
//!   authentication request, fail on ErrorResponse. Never logs in.
//! - `query`: a real login (cleartext, md5 or SCRAM-SHA-256), the configured query, and
//!   with `expect_role` a `pg_is_in_recovery()`; then Terminate. Only this one sees
//!   "PgBouncer up, PostgreSQL behind it down" or the wrong role.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::config::{Check, CheckKind, Role};
use crate::health::{CheckResult, CheckStatus};

/// Largest backend message a probe accepts; a check never needs more.
const MAX_MESSAGE: usize = 64 * 1024;

/// Runs one check of `addr` within `check.timeout`.
pub async fn probe(check: &Check, addr: SocketAddr) -> CheckResult {
    let started = Instant::now();
    let mut result = match timeout(check.timeout, TcpStream::connect(addr)).await {
        Err(_) => CheckResult::new(CheckStatus::L4Tout, "Connection timed out"),
        Ok(Err(e)) => connect_error(&e),
        Ok(Ok(stream)) => {
            let left = check.timeout.saturating_sub(started.elapsed());
            let (timeout_status, timeout_text) = match check.kind {
                CheckKind::Ssl => (CheckStatus::L6Tout, "no answer to SSLRequest"),
                _ => (CheckStatus::L7Tout, "no answer in time"),
            };
            match timeout(left, converse(check, stream)).await {
                Ok(r) => r,
                Err(_) => CheckResult::new(timeout_status, timeout_text),
            }
        }
    };
    result.duration = started.elapsed();
    result
}

fn connect_error(e: &io::Error) -> CheckResult {
    let status = match e.kind() {
        io::ErrorKind::TimedOut => CheckStatus::L4Tout,
        io::ErrorKind::ConnectionRefused
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable => CheckStatus::L4Con,
        _ => CheckStatus::SockErr,
    };
    CheckResult::new(status, describe_io(e))
}

/// "Connection refused" rather than "Connection refused (os error 111)".
fn describe_io(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// Closes with an RST: the server never sees an orderly session to log.
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn converse(check: &Check, mut stream: TcpStream) -> CheckResult {
    match check.kind {
        CheckKind::None | CheckKind::Tcp => {
            reset(stream);
            CheckResult::new(CheckStatus::L4Ok, "")
        }
        CheckKind::Ssl => {
            let r = ssl(&mut stream).await;
            reset(stream);
            r
        }
        CheckKind::Pgsql => {
            let r = pgsql(check, &mut stream).await;
            reset(stream);
            r
        }
        CheckKind::Query => query(check, &mut Conn::new(&mut stream))
            .await
            .unwrap_or_else(ProbeError::into_result),
    }
}

async fn ssl(stream: &mut TcpStream) -> CheckResult {
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    if let Err(e) = stream.write_all(&req).await {
        return CheckResult::new(CheckStatus::SockErr, describe_io(&e));
    }
    let mut answer = [0u8; 1];
    match stream.read(&mut answer).await {
        Ok(1) if answer[0] == b'S' => CheckResult::new(CheckStatus::L6Ok, "SSLRequest answered S"),
        Ok(1) if answer[0] == b'N' => CheckResult::new(CheckStatus::L6Ok, "SSLRequest answered N"),
        Ok(1) => CheckResult::new(
            CheckStatus::L6Rsp,
            format!("unexpected answer {:?} to SSLRequest", answer[0] as char),
        ),
        Ok(_) => CheckResult::new(
            CheckStatus::L6Rsp,
            "connection closed before answering SSLRequest",
        ),
        Err(e) => CheckResult::new(CheckStatus::L6Rsp, describe_io(&e)),
    }
}

async fn pgsql(check: &Check, stream: &mut TcpStream) -> CheckResult {
    let mut conn = Conn::new(stream);
    let answer = async {
        conn.send_startup(&[("user", check.user.as_str())]).await?;
        match conn.next().await? {
            Message::AuthenticationOk
            | Message::AuthenticationCleartextPassword
            | Message::AuthenticationMd5Password(_)
            | Message::AuthenticationSasl(_)
            | Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential => Ok(CheckResult::new(
                CheckStatus::L7Ok,
                "PostgreSQL server is ok",
            )),
            other => Err(unexpected(other)),
        }
    };
    answer.await.unwrap_or_else(ProbeError::into_result)
}

/// Why a protocol conversation failed.
#[derive(Debug)]
enum ProbeError {
    /// The server said no (ErrorResponse).
    Server {
        code: String,
        message: String,
    },
    /// The server said something a PostgreSQL server would not.
    Protocol(String),
    /// The role does not match `expect_role`.
    Role {
        primary: bool,
        expected: Role,
    },
    Io(io::Error),
}

impl ProbeError {
    fn into_result(self) -> CheckResult {
        match self {
            ProbeError::Server { code, message } => {
                let mut r = CheckResult::new(CheckStatus::L7Sts, message);
                r.code = Some(code);
                r
            }
            ProbeError::Protocol(m) => CheckResult::new(CheckStatus::L7Rsp, m),
            ProbeError::Role { primary, expected } => {
                let mut r = CheckResult::new(
                    CheckStatus::L7Sts,
                    format!(
                        "server is a {}, expected a {}",
                        if primary { "primary" } else { "replica" },
                        if expected == Role::Primary {
                            "primary"
                        } else {
                            "replica"
                        }
                    ),
                );
                r.primary = Some(primary);
                r
            }
            ProbeError::Io(e) => CheckResult::new(CheckStatus::L7Rsp, describe_io(&e)),
        }
    }
}

impl From<io::Error> for ProbeError {
    fn from(e: io::Error) -> Self {
        ProbeError::Io(e)
    }
}

fn unexpected(m: Message) -> ProbeError {
    let what = match m {
        Message::ErrorResponse(body) => return server_error(&body),
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::DataRow(_) => "DataRow",
        Message::NoticeResponse(_) => "NoticeResponse",
        _ => "message",
    };
    ProbeError::Protocol(format!("unexpected {what} from server"))
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> ProbeError {
    let (mut code, mut message) = (String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    ProbeError::Server { code, message }
}

/// A minimal frontend connection: framed reads with a size cap, writes of encoded messages.
struct Conn<'a> {
    stream: &'a mut TcpStream,
    buf: BytesMut,
}

impl<'a> Conn<'a> {
    fn new(stream: &'a mut TcpStream) -> Self {
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn send(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> io::Result<()>,
    ) -> Result<(), ProbeError> {
        let mut out = BytesMut::new();
        encode(&mut out)?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn send_startup(&mut self, params: &[(&str, &str)]) -> Result<(), ProbeError> {
        let params = params.to_vec();
        self.send(|b| frontend::startup_message(params.iter().copied(), b))
            .await
    }

    /// The next backend message. The length is checked before postgres-protocol sees
    /// the bytes, so a lying server cannot make us reserve gigabytes.
    async fn next(&mut self) -> Result<Message, ProbeError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(ProbeError::Protocol(format!(
                        "invalid message length {len}"
                    )));
                }
                if let Some(m) = Message::parse(&mut self.buf)
                    .map_err(|e| ProbeError::Protocol(e.to_string()))?
                {
                    return Ok(m);
                }
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(ProbeError::Protocol("server closed the connection".into()));
            }
        }
    }

    /// Reads until ReadyForQuery, skipping status messages. ErrorResponse fails.
    async fn until_ready(&mut self, mut on_row: impl FnMut(&[u8])) -> Result<(), ProbeError> {
        loop {
            match self.next().await? {
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                Message::DataRow(row) => {
                    let mut ranges = row.ranges();
                    if let Ok(Some(Some(r))) = ranges.next() {
                        on_row(row.buffer().get(r).unwrap_or_default());
                    }
                }
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_)
                | Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse => {}
                other => return Err(unexpected(other)),
            }
        }
    }
}

async fn query(check: &Check, conn: &mut Conn<'_>) -> Result<CheckResult, ProbeError> {
    conn.send_startup(&[
        ("user", check.user.as_str()),
        ("database", check.database.as_str()),
        ("application_name", "pglb-check"),
    ])
    .await?;
    authenticate(check, conn).await?;
    conn.until_ready(|_| {}).await?;
    let q = check.query.clone();
    conn.send(|b| frontend::query(&q, b)).await?;
    conn.until_ready(|_| {}).await?;
    let mut primary = None;
    if check.expect_role != Role::Any {
        conn.send(|b| frontend::query("SELECT pg_is_in_recovery()", b))
            .await?;
        let mut in_recovery = None;
        conn.until_ready(|v| in_recovery = Some(v == b"t")).await?;
        let is_primary = match in_recovery {
            Some(r) => !r,
            None => {
                return Err(ProbeError::Protocol(
                    "pg_is_in_recovery() returned no row".into(),
                ));
            }
        };
        primary = Some(is_primary);
        if is_primary != (check.expect_role == Role::Primary) {
            conn.send(|b| {
                frontend::terminate(b);
                Ok(())
            })
            .await?;
            return Err(ProbeError::Role {
                primary: is_primary,
                expected: check.expect_role,
            });
        }
    }
    conn.send(|b| {
        frontend::terminate(b);
        Ok(())
    })
    .await?;
    let _ = conn.stream.shutdown().await;
    let detail = match primary {
        Some(true) => "PostgreSQL server is ok (primary)",
        Some(false) => "PostgreSQL server is ok (replica)",
        None => "PostgreSQL server is ok",
    };
    let mut r = CheckResult::new(CheckStatus::L7Ok, detail);
    r.primary = primary;
    Ok(r)
}

async fn authenticate(check: &Check, conn: &mut Conn<'_>) -> Result<(), ProbeError> {
    let password = check.password.expose().as_bytes().to_vec();
    let mut scram: Option<ScramSha256> = None;
    loop {
        match conn.next().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                conn.send(|b| frontend::password_message(&password, b))
                    .await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(check.user.as_bytes(), &password, body.salt());
                conn.send(|b| frontend::password_message(hash.as_bytes(), b))
                    .await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut has_scram = false;
                while let Ok(Some(m)) = mechanisms.next() {
                    has_scram |= m == SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(ProbeError::Protocol(
                        "server offers no SCRAM-SHA-256".into(),
                    ));
                }
                let s = ScramSha256::new(&password, ChannelBinding::unsupported());
                let first = s.message().to_vec();
                conn.send(|b| frontend::sasl_initial_response(SCRAM_SHA_256, &first, b))
                    .await?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram.as_mut().ok_or_else(|| {
                    ProbeError::Protocol("SASL continue before SASL start".into())
                })?;
                s.update(body.data())
                    .map_err(|e| ProbeError::Protocol(e.to_string()))?;
                let msg = s.message().to_vec();
                conn.send(|b| frontend::sasl_response(&msg, b)).await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| ProbeError::Protocol("SASL final before SASL start".into()))?;
                s.finish(body.data())
                    .map_err(|e| ProbeError::Protocol(format!("SCRAM server signature: {e}")))?;
            }
            Message::ErrorResponse(body) => return Err(server_error(&body)),
            Message::NoticeResponse(_) => {}
            other => return Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each check kind against fake servers that answer right, wrong, or not at all.
    use super::*;
    use crate::pick::tests::server;
    use crate::testing::{Fake, fake};

    fn check(kind: CheckKind) -> Check {
        let mut c = server("s", 0, false).check;
        c.kind = kind;
        c.timeout = Duration::from_secs(2);
        c.user = "pglb_check".into();
        c.database = "postgres".into();
        c.query = "SELECT 1".into();
        c
    }

    async fn run(kind: CheckKind, behavior: Fake) -> CheckResult {
        probe(&check(kind), fake(behavior).await).await
    }

    /// A loopback port nobody listens on.
    async fn closed_port() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        l.local_addr().expect("addr")
    }

    #[tokio::test]
    async fn tcp_checks_tell_a_listening_port_from_a_closed_one() {
        assert_eq!(
            run(CheckKind::Tcp, Fake::Hang).await.status,
            CheckStatus::L4Ok
        );
        let r = probe(&check(CheckKind::Tcp), closed_port().await).await;
        assert_eq!(r.status, CheckStatus::L4Con);
        assert_eq!(r.detail, "Connection refused");
    }

    #[tokio::test]
    async fn ssl_checks_want_s_or_n() {
        let r = run(CheckKind::Ssl, Fake::DeclineSsl).await;
        assert_eq!(
            (r.status, r.detail.as_str()),
            (CheckStatus::L6Ok, "SSLRequest answered N")
        );
        let r = run(CheckKind::Ssl, Fake::Http).await;
        assert_eq!(r.status, CheckStatus::L6Rsp);
        assert!(r.detail.contains("unexpected answer 'H'"), "{}", r.detail);
        let r = run(CheckKind::Ssl, Fake::CloseAfterFirst).await;
        assert_eq!(r.status, CheckStatus::L6Rsp);
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_fails_at_the_check_timeout() {
        for (kind, status) in [
            (CheckKind::Ssl, CheckStatus::L6Tout),
            (CheckKind::Pgsql, CheckStatus::L7Tout),
            (CheckKind::Query, CheckStatus::L7Tout),
        ] {
            let t0 = Instant::now();
            let r = run(kind, Fake::Hang).await;
            assert_eq!(r.status, status, "{kind:?}");
            let waited = t0.elapsed();
            assert!(
                waited >= Duration::from_secs(2) && waited < Duration::from_millis(2100),
                "{kind:?}: {waited:?}"
            );
            assert_eq!(r.duration, waited, "the result says how long it took");
        }
    }

    #[tokio::test]
    async fn pgsql_checks_pass_on_an_authentication_request_and_report_errors() {
        assert_eq!(
            run(CheckKind::Pgsql, Fake::Accept).await.status,
            CheckStatus::L7Ok
        );
        for kind in [CheckKind::Pgsql, CheckKind::Query] {
            let r = run(kind, Fake::Refuse("no more connections allowed")).await;
            assert_eq!(r.status, CheckStatus::L7Sts, "{kind:?}");
            assert_eq!(r.code.as_deref(), Some("08P01"));
            assert_eq!(r.detail, "no more connections allowed");
        }
    }

    #[tokio::test]
    async fn a_server_speaking_another_protocol_is_a_bad_response() {
        for kind in [CheckKind::Pgsql, CheckKind::Query] {
            let r = run(kind, Fake::Http).await;
            assert_eq!(r.status, CheckStatus::L7Rsp, "{kind:?}: {}", r.detail);
        }
        let r = run(CheckKind::Query, Fake::Close).await;
        assert_eq!(r.status, CheckStatus::L7Rsp, "{}", r.detail);
    }
}
