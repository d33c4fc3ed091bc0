//! Message scanner: follows a plaintext session's byte streams without copying them. On the
//! server side it learns the cancel key (BackendKeyData) and the transaction status
//! (ReadyForQuery); on the client side it counts the messages that each end with a
//! ReadyForQuery (Query, Sync, FunctionCall). Only headers are read, plus the tiny bodies
//! of BackendKeyData and ReadyForQuery; everything is bounds-checked, so no input can make
//! it panic or allocate more than 260 bytes. Reference:
//! <https://www.postgresql.org/docs/current/protocol-message-formats.html>

use bytes::Bytes;

use crate::startup::CancelKey;

/// Largest BackendKeyData body: pid (4) + secret (up to 256 bytes in protocol 3.2).
const MAX_KEY_BODY: usize = 4 + 256;

/// What the scanner learnt from one chunk.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// BackendKeyData arrived.
    pub key: Option<CancelKey>,
    /// The chunk ended right after a ReadyForQuery with this status (`I`, `T`, `E`):
    /// the server is waiting for the client, at a message boundary.
    pub ready: Option<u8>,
    /// ReadyForQuery messages in the chunk.
    pub readies: u32,
    /// Client side: Query, Sync and FunctionCall messages in the chunk (each is answered
    /// by one ReadyForQuery).
    pub requests: u32,
}

/// Where in the stream the scanner is.
#[derive(Debug, Clone)]
enum At {
    /// Reading the 5-byte header (type + length); `have` bytes so far.
    Header { buf: [u8; 5], have: u8 },
    /// Skipping the rest of an uninteresting message (a length is 32 bits).
    Skip { left: u32 },
    /// Collecting a small body we want (BackendKeyData, ReadyForQuery): at most
    /// `MAX_KEY_BODY` bytes. (Small fields: two scanners live in every session.)
    Body { kind: u8, want: u16, buf: Vec<u8> },
    /// The stream stopped making sense: stop interpreting it (relaying goes on).
    Lost,
}

#[derive(Debug, Clone)]
pub struct Scanner {
    at: At,
    /// Scanning client → server messages (count requests, read no body).
    frontend: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner::backend()
    }
}

impl Scanner {
    /// A scanner of server → client messages.
    pub fn backend() -> Self {
        Scanner {
            at: At::Header {
                buf: [0; 5],
                have: 0,
            },
            frontend: false,
        }
    }

    /// A scanner of client → server messages, from the first message after the startup.
    pub fn frontend() -> Self {
        Scanner {
            frontend: true,
            ..Scanner::backend()
        }
    }

    /// Between two messages (no header, body or skip under way).
    pub fn at_boundary(&self) -> bool {
        matches!(self.at, At::Header { have: 0, .. })
    }

    /// Whether the scanner gave up on this stream (not PostgreSQL as expected).
    pub fn lost(&self) -> bool {
        matches!(self.at, At::Lost)
    }

    /// Feeds the next chunk of server bytes.
    pub fn feed(&mut self, mut data: &[u8]) -> Seen {
        let mut seen = Seen::default();
        while !data.is_empty() {
            // Any byte after a ReadyForQuery means the server is talking again.
            seen.ready = None;
            match &mut self.at {
                // What was learnt before the damage stands; nothing after it is read.
                At::Lost => return seen,
                At::Header { buf, have } => {
                    let at = usize::from(*have);
                    let take = (5 - at).min(data.len());
                    buf[at..at + take].copy_from_slice(&data[..take]);
                    *have += take as u8;
                    data = &data[take..];
                    if *have == 5 {
                        let kind = buf[0];
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        self.at = if self.frontend {
                            frontend_next(kind, len, &mut seen)
                        } else {
                            backend_next(kind, len)
                        };
                    }
                }
                At::Skip { left } => {
                    let take = (*left as usize).min(data.len());
                    *left -= take as u32;
                    data = &data[take..];
                    if *left == 0 {
                        self.at = NEXT;
                    }
                }
                At::Body { kind, want, buf } => {
                    let take = (usize::from(*want) - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if buf.len() == usize::from(*want) {
                        body_read(*kind, buf, &mut seen);
                        self.at = NEXT;
                    }
                }
            }
        }
        seen
    }
}

/// Waiting for the next message header.
const NEXT: At = At::Header {
    buf: [0; 5],
    have: 0,
};

/// After a client message header: counts requests, skips every body.
fn frontend_next(kind: u8, len: usize, seen: &mut Seen) -> At {
    if matches!(kind, b'Q' | b'S' | b'F') {
        seen.requests += 1;
    }
    match len {
        l if l < 4 => At::Lost,
        4 => NEXT,
        l => At::Skip {
            left: (l - 4) as u32,
        },
    }
}

/// After a server message header: ReadyForQuery and BackendKeyData bodies are read,
/// others skipped; a length that cannot be right loses the stream.
fn backend_next(kind: u8, len: usize) -> At {
    match (kind, len) {
        (_, l) if l < 4 => At::Lost,
        (b'Z', 5) => At::Body {
            kind,
            want: 1,
            buf: Vec::with_capacity(1),
        },
        (b'Z', _) => At::Lost,
        (b'K', l) if (12..=4 + MAX_KEY_BODY).contains(&l) => At::Body {
            kind,
            want: (l - 4) as u16,
            buf: Vec::with_capacity(l - 4),
        },
        (b'K', _) => At::Lost,
        (_, 4) => NEXT,
        (_, l) => At::Skip {
            left: (l - 4) as u32,
        },
    }
}

/// A whole ReadyForQuery or BackendKeyData body.
fn body_read(kind: u8, buf: &[u8], seen: &mut Seen) {
    match kind {
        b'Z' => {
            seen.ready = Some(buf[0]);
            seen.readies += 1;
        }
        _ => {
            seen.key = Some(CancelKey {
                pid: i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                secret: Bytes::copy_from_slice(&buf[4..]),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn login_stream() -> Vec<u8> {
        let mut s = msg(b'R', &0u32.to_be_bytes());
        s.extend(msg(b'S', b"server_version\x0015\x00"));
        s.extend(msg(b'K', &[0, 0, 0, 42, 1, 2, 3, 4]));
        s.extend(msg(b'Z', b"I"));
        s
    }

    #[test]
    fn finds_key_and_idle_status() {
        let mut sc = Scanner::default();
        let seen = sc.feed(&login_stream());
        assert_eq!(
            seen.key,
            Some(CancelKey {
                pid: 42,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            })
        );
        assert_eq!(seen.ready, Some(b'I'));
    }

    #[test]
    fn any_split_gives_the_same_answer() {
        let mut stream = login_stream();
        stream.extend(msg(b'D', &[0; 100]));
        stream.extend(msg(b'Z', b"T"));
        for cut in 0..stream.len() {
            let mut sc = Scanner::default();
            let a = sc.feed(&stream[..cut]);
            let b = sc.feed(&stream[cut..]);
            assert_eq!(a.key.or(b.key).map(|k| k.pid), Some(42), "cut at {cut}");
            assert_eq!(b.ready, Some(b'T'), "cut at {cut}");
        }
    }

    #[test]
    fn ready_only_counts_at_the_end_of_a_chunk() {
        let mut sc = Scanner::default();
        let mut s = msg(b'Z', b"I");
        s.extend(msg(b'T', &[0, 0]));
        assert_eq!(sc.feed(&s).ready, None);
    }

    #[test]
    fn frontend_requests_are_counted() {
        let mut s = msg(b'Q', b"SELECT 1\0");
        s.extend(msg(b'P', b"\0SELECT 1\0\0\0"));
        s.extend(msg(b'B', &[0; 8]));
        s.extend(msg(b'E', &[0; 5]));
        s.extend(msg(b'S', b""));
        let mut sc = Scanner::frontend();
        let (a, b) = s.split_at(7);
        assert_eq!(sc.feed(a).requests + sc.feed(b).requests, 2);
    }

    #[test]
    fn protocol_3_2_long_keys() {
        let mut body = 7i32.to_be_bytes().to_vec();
        body.extend([9u8; 32]);
        let mut sc = Scanner::default();
        let seen = sc.feed(&msg(b'K', &body));
        assert_eq!(seen.key.map(|k| k.secret.len()), Some(32));
    }

    #[test]
    fn nonsense_is_given_up_without_panic() {
        for bad in [
            vec![b'Z', 0, 0, 0, 9, b'I'],
            vec![b'K', 0xff, 0xff, 0xff, 0xff],
            vec![b'D', 0, 0, 0, 1],
        ] {
            let mut sc = Scanner::default();
            let seen = sc.feed(&bad);
            assert_eq!((seen.key, seen.ready), (None, None));
            assert!(sc.lost());
            assert_eq!(sc.feed(&login_stream()), Seen::default());
        }
    }
}
