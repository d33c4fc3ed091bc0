//! The startup phase: the first packet(s) a client sends before any server is involved.
//!
//! Protocol reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html>
//! (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest). These packets have no type
//! byte: a 4-byte length (including itself) then a 4-byte code or protocol version.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Shortest startup-phase packet: length + code.
pub const MIN_PACKET: usize = 8;
/// Longest startup-phase packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`, pqcomm.h).
pub const MAX_PACKET: usize = 10_000;

const CANCEL_REQUEST_CODE: u32 = 1234 << 16 | 5678;
const SSL_REQUEST_CODE: u32 = 1234 << 16 | 5679;
const GSSENC_REQUEST_CODE: u32 = 1234 << 16 | 5680;

/// One decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// SSLRequest: the client asks for TLS.
    Ssl,
    /// GSSENCRequest: the client asks for GSSAPI encryption.
    GssEnc,
    /// CancelRequest, arriving on its own connection.
    Cancel(CancelKey),
    /// StartupMessage: the session proper.
    Startup(StartupMessage),
}

/// The (pid, secret) pair a server hands out in BackendKeyData and a CancelRequest echoes.
/// The secret is 4 bytes in protocol 3.0 and up to 256 bytes in 3.2.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: Bytes,
}

impl std::fmt::Debug for CancelKey {
    // The secret is what makes a cancel legitimate: keep it out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelKey {{ pid: {}, secret: MASKED }}", self.pid)
    }
}

impl CancelKey {
    /// The CancelRequest packet carrying this key, as a client would send it.
    pub fn to_packet(&self) -> Vec<u8> {
        let len = 12 + self.secret.len();
        let mut p = Vec::with_capacity(len);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        p.extend_from_slice(&self.pid.to_be_bytes());
        p.extend_from_slice(&self.secret);
        p
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// The packet as received, forwarded unchanged to the server. Its parameters were
    /// checked when it was decoded and are read from it on demand: a session keeps only
    /// these bytes, not a map of strings, for its whole life.
    pub raw: Bytes,
}

impl StartupMessage {
    /// The protocol version the client asked for (3.0, or 3.2 from libpq 18).
    pub fn version(&self) -> (u16, u16) {
        let at = |i: usize| {
            let b = self.raw.get(i..i + 2).unwrap_or(&[0, 0]);
            u16::from_be_bytes([b[0], b[1]])
        };
        (at(4), at(6))
    }

    /// A parameter's value (the last one when the client sent it twice, as PostgreSQL
    /// reads it); bytes that are not UTF-8 are shown as U+FFFD.
    pub fn param(&self, key: &str) -> Option<Cow<'_, str>> {
        self.params()
            .filter(|(k, _)| *k == key)
            .last()
            .map(|(_, v)| v)
    }

    /// The name/value pairs in packet order.
    pub fn params(&self) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
        let mut fields = self.raw.get(8..).unwrap_or_default().split(|&b| b == 0);
        std::iter::from_fn(move || {
            let name = fields.next().filter(|n| !n.is_empty())?;
            let value = fields.next()?;
            Some((
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(value),
            ))
        })
    }
}

/// Why a startup packet was refused. Each maps to the ErrorResponse the client gets.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    BadLength(i64),
    #[error("unsupported frontend protocol {0}.{1}: pglb supports 3.0 to 3.2")]
    UnsupportedVersion(u16, u16),
    #[error("invalid startup packet: {0}")]
    Malformed(&'static str),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("client closed the connection during startup")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl StartupError {
    /// SQLSTATE of the ErrorResponse that reports this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedVersion(..) => "0A000",
            StartupError::NoUser => "28000",
            _ => "08P01",
        }
    }
}

/// Reads one length-prefixed startup-phase packet. The claimed length is checked against
/// [`MIN_PACKET`]..=[`MAX_PACKET`] before anything is allocated for it.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R) -> Result<Bytes, StartupError> {
    let mut len_bytes = [0u8; 4];
    match r.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(StartupError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    let len = i32::from_be_bytes(len_bytes);
    let len = check_length(len)?;
    let mut packet = BytesMut::zeroed(len);
    packet[..4].copy_from_slice(&len_bytes);
    match r.read_exact(&mut packet[4..]).await {
        Ok(_) => Ok(packet.freeze()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StartupError::Closed),
        Err(e) => Err(e.into()),
    }
}

fn check_length(len: i32) -> Result<usize, StartupError> {
    match usize::try_from(len) {
        Ok(n) if (MIN_PACKET..=MAX_PACKET).contains(&n) => Ok(n),
        _ => Err(StartupError::BadLength(len.into())),
    }
}

/// Decodes a whole packet as returned by [`read_packet`].
pub fn decode(packet: Bytes) -> Result<Packet, StartupError> {
    if packet.len() < MIN_PACKET {
        return Err(StartupError::BadLength(packet.len() as i64));
    }
    let len = check_length(i32::from_be_bytes([
        packet[0], packet[1], packet[2], packet[3],
    ]))?;
    if len != packet.len() {
        return Err(StartupError::Malformed("length does not match the packet"));
    }
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if len != 8 => {
            Err(StartupError::Malformed("encryption request with a body"))
        }
        SSL_REQUEST_CODE => Ok(Packet::Ssl),
        GSSENC_REQUEST_CODE => Ok(Packet::GssEnc),
        CANCEL_REQUEST_CODE => decode_cancel(&packet).map(Packet::Cancel),
        _ => decode_startup(packet, code),
    }
}

fn decode_cancel(packet: &Bytes) -> Result<CancelKey, StartupError> {
    // 3.0 sends a 4-byte secret; 3.2 allows up to 256 bytes.
    if !(16..=12 + 256).contains(&packet.len()) {
        return Err(StartupError::Malformed(
            "cancel request of the wrong length",
        ));
    }
    let mut buf = BytesMut::from(&packet[..]);
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
    match CancelRequest::decode(&mut buf, &ctx) {
        Ok(Some(req)) => Ok(CancelKey {
            pid: req.pid,
            secret: req.secret_key.to_bytes(),
        }),
        _ => Err(StartupError::Malformed("cancel request")),
    }
}

fn decode_startup(packet: Bytes, code: u32) -> Result<Packet, StartupError> {
    let (major, minor) = ((code >> 16) as u16, code as u16);
    // PostgreSQL accepts any 3.x and negotiates the minor version down; so do we (the
    // server behind us does the negotiating).
    if major != 3 {
        return Err(StartupError::UnsupportedVersion(major, minor));
    }
    if !well_formed_parameters(&packet[8..]) {
        return Err(StartupError::Malformed(
            "parameters must be name/value pairs ending with one empty name",
        ));
    }
    let mut buf = BytesMut::from(&packet[..]);
    let ctx = DecodeContext::default();
    let startup = match Startup::decode(&mut buf, &ctx) {
        Ok(Some(s)) => s,
        _ => return Err(StartupError::Malformed("cannot decode parameters")),
    };
    if startup.parameters.get("user").is_none_or(|u| u.is_empty()) {
        return Err(StartupError::NoUser);
    }
    Ok(Packet::Startup(StartupMessage { raw: packet }))
}

/// Parameters are NUL-terminated name/value pairs; an empty name ends the list and must
/// be the last byte (as PostgreSQL requires).
fn well_formed_parameters(mut rest: &[u8]) -> bool {
    loop {
        let Some(name_end) = rest.iter().position(|&b| b == 0) else {
            return false;
        };
        if name_end == 0 {
            return rest.len() == 1;
        }
        rest = &rest[name_end + 1..];
        let Some(value_end) = rest.iter().position(|&b| b == 0) else {
            return false;
        };
        rest = &rest[value_end + 1..];
    }
}

/// What the client asked for once encryption negotiation that pglb itself answers is done.
#[derive(Debug)]
pub enum Hello {
    /// SSLRequest: forwarded to the server (TLS passthrough). Carries the raw request.
    Ssl(Bytes),
    Cancel(CancelKey),
    Startup(StartupMessage),
}

/// Reads the client's opening packets. GSSENCRequest is answered `N` here (pglb cannot
/// pass GSSAPI encryption through meaningfully), after which the client sends its next
/// packet, as libpq does.
pub async fn read_hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Hello, StartupError> {
    let mut gss_refused = false;
    loop {
        let raw = read_packet(s).await?;
        match decode(raw.clone())? {
            Packet::Ssl => return Ok(Hello::Ssl(raw)),
            Packet::Cancel(key) => return Ok(Hello::Cancel(key)),
            Packet::Startup(m) => return Ok(Hello::Startup(m)),
            Packet::GssEnc if !gss_refused => {
                gss_refused = true;
                s.write_all(b"N").await?;
            }
            Packet::GssEnc => return Err(StartupError::Malformed("GSSENCRequest sent twice")),
        }
    }
}

/// What a client may send once its SSLRequest was answered `N` (by pglb or by the
/// server), as PostgreSQL accepts it: a StartupMessage or a CancelRequest, after at most
/// one GSSENCRequest (answered `N` here).
#[derive(Debug)]
pub enum AfterSsl {
    Startup(StartupMessage),
    Cancel(CancelKey),
}

/// Reads the client's next packet after its SSLRequest was answered `N`: as the first
/// one, but a second SSLRequest is an error.
pub async fn read_after_ssl_refused<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<AfterSsl, StartupError> {
    match read_hello(s).await? {
        Hello::Startup(m) => Ok(AfterSsl::Startup(m)),
        Hello::Cancel(key) => Ok(AfterSsl::Cancel(key)),
        Hello::Ssl(_) => Err(StartupError::Malformed("SSLRequest sent twice")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    fn decode_bytes(b: &[u8]) -> Result<Packet, StartupError> {
        decode(Bytes::copy_from_slice(b))
    }

    #[test]
    fn decodes_startup_3_0_and_3_2() {
        for version in [0x0003_0000, 0x0003_0002] {
            let p = startup_packet(version, &[("user", "app"), ("database", "db")]);
            let Packet::Startup(m) = decode_bytes(&p).expect("valid") else {
                panic!("not a startup message")
            };
            assert_eq!(m.param("user").as_deref(), Some("app"));
            assert_eq!(m.param("database").as_deref(), Some("db"));
            assert_eq!(m.param("application_name"), None);
            let pairs: Vec<(String, String)> = m
                .params()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(
                pairs,
                [
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            );
            assert_eq!(m.version(), (3, (version & 0xffff) as u16));
            assert_eq!(&m.raw[..], &p[..], "raw bytes are kept for forwarding");
        }
    }

    #[test]
    fn a_repeated_parameter_reads_as_its_last_value() {
        let p = startup_packet(0x0003_0000, &[("user", "first"), ("user", "app")]);
        let Packet::Startup(m) = decode_bytes(&p).expect("valid") else {
            panic!("not a startup message")
        };
        assert_eq!(
            m.param("user").as_deref(),
            Some("app"),
            "as PostgreSQL reads it"
        );
    }

    #[test]
    fn decodes_ssl_gss_and_cancel() {
        assert_eq!(
            decode_bytes(&[0, 0, 0, 8, 4, 210, 22, 47]).ok(),
            Some(Packet::Ssl)
        );
        assert_eq!(
            decode_bytes(&[0, 0, 0, 8, 4, 210, 22, 48]).ok(),
            Some(Packet::GssEnc)
        );
        let key = CancelKey {
            pid: 4242,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        assert_eq!(
            decode_bytes(&key.to_packet()).ok(),
            Some(Packet::Cancel(key))
        );
        // Protocol 3.2: a 32-byte secret.
        let long = CancelKey {
            pid: 7,
            secret: Bytes::from(vec![9u8; 32]),
        };
        assert_eq!(
            decode_bytes(&long.to_packet()).ok(),
            Some(Packet::Cancel(long))
        );
    }

    #[test]
    fn refuses_bad_lengths() {
        assert!(matches!(
            decode_bytes(&[0, 0, 0, 4, 0, 3, 0, 0]),
            Err(StartupError::BadLength(4))
        ));
        assert!(matches!(
            decode_bytes(&[0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
            Err(StartupError::BadLength(-16))
        ));
        assert!(matches!(
            decode_bytes(&[0, 0, 0x27, 0x11, 0, 3, 0, 0]),
            Err(StartupError::BadLength(10001))
        ));
        assert!(matches!(
            decode_bytes(&[0, 0, 0]),
            Err(StartupError::BadLength(3))
        ));
        // Length field disagrees with the bytes given.
        let mut p = startup_packet(0x0003_0000, &[("user", "a")]);
        p.push(0);
        assert!(matches!(decode_bytes(&p), Err(StartupError::Malformed(_))));
        // A cancel request with a 2-byte secret.
        assert!(decode_bytes(&[0, 0, 0, 14, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0]).is_err());
        assert!(decode_bytes(&[0, 0, 0, 9, 4, 210, 22, 47, 0]).is_err());
    }

    #[test]
    fn refuses_garbage_and_missing_user() {
        assert!(matches!(
            decode_bytes(&startup_packet(0x0002_0000, &[("user", "a")])),
            Err(StartupError::UnsupportedVersion(2, 0))
        ));
        assert!(matches!(
            decode_bytes(&startup_packet(0x0003_0000, &[("database", "a")])),
            Err(StartupError::NoUser)
        ));
        let mut unterminated = startup_packet(0x0003_0000, &[("user", "a")]);
        unterminated.pop();
        unterminated.push(b'x');
        assert!(matches!(
            decode_bytes(&unterminated),
            Err(StartupError::Malformed(_))
        ));
        // Invalid UTF-8 and odd shapes must not panic.
        let weird = startup_packet(0x0003_0000, &[("user", "\u{fffd}"), ("x", "")]);
        let _ = decode_bytes(&weird);
        let mut p = vec![0, 0, 0, 12, 0, 3, 0, 0, 0xff, 0xfe, 0, 0];
        assert!(
            matches!(decode_bytes(&p), Err(StartupError::Malformed(_))),
            "value without terminator"
        );
        p[8] = 0;
        assert!(
            matches!(decode_bytes(&p), Err(StartupError::Malformed(_))),
            "bytes after the terminator"
        );
    }

    #[tokio::test]
    async fn read_packet_checks_before_allocating() {
        // Claims 2 GB: refused from the 4 length bytes alone.
        let mut r: &[u8] = &[0x7f, 0xff, 0xff, 0xff, 0, 3];
        assert!(matches!(
            read_packet(&mut r).await,
            Err(StartupError::BadLength(_))
        ));
        // Truncated: announces 16 bytes, sends 10, then closes.
        let mut r: &[u8] = &[0, 0, 0, 16, 0, 3, 0, 0, b'u', 0];
        assert!(matches!(
            read_packet(&mut r).await,
            Err(StartupError::Closed)
        ));
        let mut r: &[u8] = &[];
        assert!(matches!(
            read_packet(&mut r).await,
            Err(StartupError::Closed)
        ));
        let p = startup_packet(0x0003_0000, &[("user", "app")]);
        let mut r: &[u8] = &p;
        assert_eq!(
            &read_packet(&mut r).await.expect("whole packet")[..],
            &p[..]
        );
    }

    #[tokio::test]
    async fn gssenc_is_refused_then_startup_read() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut sent = vec![0, 0, 0, 8, 4, 210, 22, 48];
        sent.extend(startup_packet(0x0003_0000, &[("user", "app")]));
        client.write_all(&sent).await.expect("write");
        let hello = read_hello(&mut server).await.expect("hello");
        assert!(matches!(hello, Hello::Startup(m) if m.param("user").as_deref() == Some("app")));
        let mut answer = [0u8; 1];
        client.read_exact(&mut answer).await.expect("answer");
        assert_eq!(&answer, b"N");
    }

    #[tokio::test]
    async fn after_a_declined_sslrequest_every_legal_packet_order_is_read() {
        let startup = startup_packet(0x0003_0000, &[("user", "app")]);
        let cancel = CancelKey {
            pid: 9,
            secret: Bytes::from_static(&[5, 6, 7, 8]),
        }
        .to_packet();
        let gss = vec![0, 0, 0, 8, 4, 210, 22, 48];
        let ssl = vec![0, 0, 0, 8, 4, 210, 22, 47];
        // (what the client sends, is it a cancel, the `N`s pglb must write)
        let cases: [(Vec<u8>, Option<bool>, usize); 5] = [
            (startup.clone(), Some(false), 0),
            (cancel.clone(), Some(true), 0),
            ([gss.clone(), startup.clone()].concat(), Some(false), 1),
            ([gss.clone(), cancel.clone()].concat(), Some(true), 1),
            (ssl.clone(), None, 0),
        ];
        for (sent, cancel_expected, ns) in cases {
            let (mut client, mut server) = tokio::io::duplex(4096);
            client.write_all(&sent).await.expect("write");
            let got = read_after_ssl_refused(&mut server).await;
            match (got, cancel_expected) {
                (Ok(AfterSsl::Cancel(_)), Some(true)) | (Ok(AfterSsl::Startup(_)), Some(false)) => {
                }
                (Err(StartupError::Malformed(_)), None) => {}
                (other, want) => panic!("{other:?}, expected cancel={want:?}"),
            }
            drop(server);
            let mut answers = Vec::new();
            client.read_to_end(&mut answers).await.expect("read");
            assert_eq!(answers, vec![b'N'; ns], "only the requested answers");
        }
    }
}
