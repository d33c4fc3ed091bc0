//! Raw bytes at pglb's front door: malformed, truncated, oversized and slow startup
//! packets each get a PostgreSQL ErrorResponse (or a clean close), and never disturb
//! other sessions. No server needs to be up for these.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use harness::{Pglb, free_port};

fn start_pglb() -> Pglb {
    let port = free_port();
    let servers = format!(
        "[[listen.server]]\nname = \"dead\"\naddr = \"127.0.0.1:{}\"\n",
        free_port()
    );
    Pglb::start(
        &Pglb::config(
            port,
            "retries = 0\n[listen.timeouts]\nstartup = \"700ms\"\n",
            &servers,
        ),
        port,
    )
}

fn connect(pglb: &Pglb) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", pglb.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// Reads to EOF and returns (SQLSTATE, message) of the ErrorResponse found there.
fn read_error(s: &mut TcpStream) -> (String, String) {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    parse_error(&got).unwrap_or_else(|| panic!("no ErrorResponse in {got:?}"))
}

fn parse_error(b: &[u8]) -> Option<(String, String)> {
    if b.first() != Some(&b'E') || b.len() < 5 {
        return None;
    }
    let (mut code, mut msg) = (String::new(), String::new());
    for field in b[5..].split(|&c| c == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = text,
            b'M' => msg = text,
            _ => {}
        }
    }
    Some((code, msg))
}

fn startup(params: &[(&str, &str)], version: u32) -> Vec<u8> {
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

#[test]
fn bad_lengths_get_protocol_violation() {
    let pglb = start_pglb();
    for len in [4i32, 7, -16, 0x7fff_ffff, 10_001] {
        let mut s = connect(&pglb);
        s.write_all(&len.to_be_bytes()).expect("write");
        s.write_all(&[0, 3, 0, 0]).expect("write");
        let (code, msg) = read_error(&mut s);
        assert_eq!(code, "08P01", "length {len}");
        assert!(msg.contains("invalid startup packet length"), "{msg}");
    }
}

#[test]
fn unsupported_version_and_missing_user_are_explained() {
    let pglb = start_pglb();
    let mut s = connect(&pglb);
    s.write_all(&startup(&[("user", "app")], 0x0002_0000))
        .expect("write");
    let (code, msg) = read_error(&mut s);
    assert_eq!(code, "0A000");
    assert!(msg.contains("unsupported frontend protocol 2.0"), "{msg}");

    let mut s = connect(&pglb);
    s.write_all(&startup(&[("database", "app")], 0x0003_0000))
        .expect("write");
    let (code, msg) = read_error(&mut s);
    assert_eq!(code, "28000");
    assert!(msg.contains("no PostgreSQL user name"), "{msg}");
}

#[test]
fn truncated_packet_then_silence_times_out_with_an_error() {
    let pglb = start_pglb();
    let mut s = connect(&pglb);
    let started = Instant::now();
    s.write_all(&startup(&[("user", "app")], 0x0003_0000)[..10])
        .expect("write");
    let (code, msg) = read_error(&mut s);
    let waited = started.elapsed();
    assert_eq!(code, "08P01");
    assert!(
        msg.contains("no startup packet received within 700ms"),
        "{msg}"
    );
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn garbage_half_close_and_floods_leave_other_sessions_alone() {
    let pglb = start_pglb();
    // 1 MiB of garbage: refused from its first bytes.
    let mut s = connect(&pglb);
    let garbage: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&garbage);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        got.is_empty() || parse_error(&got).is_some(),
        "an ErrorResponse or a clean close"
    );

    // Half-closed before sending anything: pglb closes too, promptly.
    let mut s = connect(&pglb);
    s.shutdown(Shutdown::Write).expect("shutdown");
    let started = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("clean close");
    assert!(got.is_empty() && started.elapsed() < Duration::from_millis(500));

    // A well-formed client is still served (here: told no server is reachable).
    let mut s = connect(&pglb);
    s.write_all(&startup(
        &[("user", "app"), ("database", "app")],
        0x0003_0000,
    ))
    .expect("write");
    let (code, msg) = read_error(&mut s);
    assert_eq!(code, "57P03");
    assert!(msg.contains("could not connect to a server"), "{msg}");
}

#[test]
fn gssenc_and_ssl_are_declined_before_the_error() {
    let pglb = start_pglb();
    for request in [[0, 0, 0, 8, 4, 210, 22, 48], [0, 0, 0, 8, 4, 210, 22, 47]] {
        let mut s = connect(&pglb);
        s.write_all(&request).expect("write");
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).expect("answer");
        assert_eq!(&answer, b"N", "request {request:?}");
        s.write_all(&startup(&[("user", "app")], 0x0003_0000))
            .expect("write");
        let (code, _) = read_error(&mut s);
        assert_eq!(code, "57P03");
    }
}
