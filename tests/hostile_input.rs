//! Generated and mutated input through every parser a client, a server or an operator can
//! feed: the startup codec, the message scanners and the config parser. No panic, no hang,
//! and answers that do not depend on how the bytes were split.
//!
//! `PGLB_FUZZ_CASES` sets the number of generated cases per property (default 20,000 in
//! CI, which keeps this file under a minute; run with 1000000 for the long run).
//! `tests/corpus/` keeps interesting inputs as regression cases.

use std::path::Path;

use bytes::Bytes;
use pglb::scanner::Scanner;
use pglb::startup::{self, Packet, StartupError};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};

fn cases() -> u32 {
    std::env::var("PGLB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn runner() -> TestRunner {
    TestRunner::new(RunnerConfig {
        cases: cases(),
        failure_persistence: None,
        ..RunnerConfig::default()
    })
}

/// A plausible startup packet: a length (right or wrong), a code, then parameters.
fn startup_like() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        Just(0x0003_0000u32),
        Just(0x0003_0002),
        Just(80_877_103),
        Just(80_877_104),
        Just(80_877_102),
        any::<u32>()
    ];
    let params = prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..12),
            prop::collection::vec(any::<u8>(), 0..12),
        ),
        0..6,
    );
    (
        code,
        params,
        any::<bool>(),
        any::<i32>(),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(code, params, honest, lie, tail)| {
            let mut body = code.to_be_bytes().to_vec();
            for (k, v) in params {
                body.extend(k);
                body.push(0);
                body.extend(v);
                body.push(0);
            }
            body.push(0);
            body.extend(tail);
            let len = if honest { (body.len() + 4) as i32 } else { lie };
            let mut p = len.to_be_bytes().to_vec();
            p.extend(body);
            p
        })
}

fn check_decode(bytes: &[u8]) {
    match startup::decode(Bytes::copy_from_slice(bytes)) {
        Ok(Packet::Startup(m)) => {
            assert_eq!(
                &m.raw[..],
                bytes,
                "a startup message is forwarded unchanged"
            );
            assert!(m.param("user").is_some_and(|u| !u.is_empty()));
        }
        Ok(Packet::Cancel(k)) => assert!((4..=256).contains(&k.secret.len())),
        Ok(Packet::Ssl | Packet::GssEnc) => assert_eq!(bytes.len(), 8),
        Err(e) => assert!(!e.to_string().is_empty() && !e.sqlstate().is_empty()),
    }
}

#[test]
fn startup_codec_never_panics_and_checks_lengths() {
    runner()
        .run(
            &prop_oneof![startup_like(), prop::collection::vec(any::<u8>(), 0..64)],
            |bytes| {
                check_decode(&bytes);
                // Through the async reader too: it must refuse claimed lengths outside 8..10000
                // before reading (and allocating) the body.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                let read = rt.block_on(async {
                    let mut r: &[u8] = &bytes;
                    startup::read_packet(&mut r).await
                });
                if let Ok(packet) = read {
                    assert!((startup::MIN_PACKET..=startup::MAX_PACKET).contains(&packet.len()));
                } else if bytes.len() >= 4 {
                    let claimed = i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                    let in_range = (8..=10_000).contains(&claimed);
                    let err = read.expect_err("checked");
                    assert!(
                        in_range == matches!(err, StartupError::Closed),
                        "claimed {claimed}: {err}"
                    );
                }
                Ok(())
            },
        )
        .expect("property");
}

/// A backend stream: well-formed messages with a sprinkle of damage.
fn backend_stream() -> impl Strategy<Value = Vec<u8>> {
    let message = (
        prop_oneof![
            Just(b'R'),
            Just(b'S'),
            Just(b'K'),
            Just(b'Z'),
            Just(b'D'),
            Just(b'T'),
            Just(b'E'),
            any::<u8>()
        ],
        prop::collection::vec(any::<u8>(), 0..300),
        any::<Option<u32>>(),
    )
        .prop_map(|(kind, body, bad_len)| {
            let mut m = vec![kind];
            m.extend(bad_len.unwrap_or((body.len() + 4) as u32).to_be_bytes());
            m.extend(body);
            m
        });
    prop::collection::vec(message, 0..12).prop_map(|ms| ms.concat())
}

#[test]
fn scanners_never_panic_and_ignore_how_bytes_are_split() {
    runner()
        .run(
            &(backend_stream(), prop::collection::vec(1usize..64, 1..8)),
            |(stream, cuts)| {
                let mut whole = Scanner::backend();
                let seen_whole = whole.feed(&stream);
                let mut split = Scanner::backend();
                let (mut keys, mut readies, mut last_ready) = (Vec::new(), 0, None);
                let mut rest: &[u8] = &stream;
                let mut cut = cuts.iter().cycle();
                while !rest.is_empty() {
                    let n = (*cut.next().unwrap_or(&1)).min(rest.len());
                    let seen = split.feed(&rest[..n]);
                    keys.extend(seen.key);
                    readies += seen.readies;
                    last_ready = seen.ready;
                    rest = &rest[n..];
                }
                assert_eq!(whole.lost(), split.lost());
                assert_eq!(seen_whole.readies, readies);
                assert_eq!(
                    seen_whole.key,
                    keys.last().cloned(),
                    "the last key found is the session's"
                );
                if !stream.is_empty() {
                    assert_eq!(seen_whole.ready, last_ready);
                }
                let mut front = Scanner::frontend();
                let _ = front.feed(&stream);
                Ok(())
            },
        )
        .expect("property");
}

const CONFIG: &str = r#"[global]
maxconn = 100
[[listen]]
name = "postgres"
bind = "127.0.0.1:5432"
balance = "leastconn"
[listen.timeouts]
connect = "5s"
[listen.check]
type = "tcp"
rise = 2
[[listen.server]]
name = "pgb1"
addr = "127.0.0.1:6432"
weight = 100
"#;

#[test]
fn config_parser_refuses_mutations_with_a_line() {
    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases() / 10,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let mutation = (0..CONFIG.len(), 0usize..4, any::<char>());
    runner
        .run(&mutation, |(at, how, c)| {
            let mut text: Vec<char> = CONFIG.chars().collect();
            let at = at.min(text.len().saturating_sub(1));
            match how {
                0 => {
                    text.remove(at);
                }
                1 => text.insert(at, c),
                2 => text[at] = c,
                _ => text.truncate(at),
            }
            let text: String = text.into_iter().collect();
            if let Err(e) = pglb::Config::parse(Path::new("m.toml"), &text) {
                let lines = text.lines().count().max(1);
                assert!(e.line <= lines + 1, "line {} of {lines}: {e}", e.line);
                assert!(e.to_string().starts_with("m.toml"), "{e}");
            }
            Ok(())
        })
        .expect("property");
}

#[test]
fn corpus_inputs_stay_handled() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if name.starts_with("backend-") {
            let mut sc = Scanner::backend();
            let seen = sc.feed(&bytes);
            match name.as_str() {
                "backend-login.bin" => assert_eq!(
                    (seen.key.map(|k| k.pid), seen.ready),
                    (Some(42), Some(b'I'))
                ),
                _ => assert!(sc.lost() || seen.key.is_none(), "{name}"),
            }
        } else {
            check_decode(&bytes);
            let ok = startup::decode(Bytes::from(bytes)).is_ok();
            let expected_ok = matches!(
                name.as_str(),
                "startup-ok.bin" | "startup-3.2.bin" | "cancel-long-key.bin" | "utf8-invalid.bin"
            );
            assert_eq!(ok, expected_ok, "{name}");
        }
        seen += 1;
    }
    assert!(seen >= 16, "corpus has {seen} files");
}
