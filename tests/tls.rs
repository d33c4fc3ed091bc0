//! TLS termination with a test CA made here: psql with sslmode=require and verify-full,
//! PostgreSQL 17's direct TLS (ALPN `postgresql`) from a rustls client, and passthrough.

mod harness;

use std::process::Command;
use std::sync::Arc;

use harness::{Pglb, Stack, free_port, make_ca, tls_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

fn psql(conninfo: &str) -> (bool, String) {
    let out = Command::new("psql")
        .arg(conninfo)
        .args(["-X", "-At", "-c", "SELECT 'through pglb'"])
        .env("PGPASSWORD", harness::APP_PASSWORD)
        .output()
        .expect("psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_require_and_verify_full_through_terminated_tls() {
    let stack = Stack::start(2);
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path());
    let port = free_port();
    let pglb = Pglb::start(&tls_config(port, certs.path(), &stack.servers_toml()), port);
    let ca = certs.path().join("ca.crt");

    let (ok, out) = psql(&format!(
        "host=127.0.0.1 port={port} user=app dbname=app sslmode=require"
    ));
    assert!(ok && out.contains("through pglb"), "{out}");
    let (ok, out) = psql(&format!(
        "host=localhost port={port} user=app dbname=app sslmode=verify-full sslrootcert={}",
        ca.display()
    ));
    assert!(ok && out.contains("through pglb"), "{out}");
    // A client that trusts another CA refuses pglb's certificate.
    let other = tempfile::tempdir().expect("tempdir");
    make_ca(other.path());
    let (ok, out) = psql(&format!(
        "host=localhost port={port} user=app dbname=app sslmode=verify-full sslrootcert={}",
        other.path().join("ca.crt").display()
    ));
    assert!(!ok && out.contains("certificate verify failed"), "{out}");

    // pglb saw inside: user, database, and that TLS ended at pglb.
    let log = pglb.wait_log(
        &["session closed", "tls=\"terminated\""],
        2,
        std::time::Duration::from_secs(3),
    );
    let line = log
        .lines()
        .find(|l| l.contains("tls=\"terminated\""))
        .expect("session line");
    assert!(line.contains("user=\"app\" database=\"app\""), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_postgresql_is_accepted() {
    let stack = Stack::start(1);
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path());
    let port = free_port();
    let _pglb = Pglb::start(&tls_config(port, certs.path(), &stack.servers_toml()), port);

    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(certs.path().join("ca.crt")).expect("ca");
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.expect("cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let connect = |alpn: Option<&'static [u8]>| {
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("tcp");
            let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await?;
            // A StartupMessage for app/app; PgBouncer answers with an authentication request.
            let mut body = 0x0003_0000u32.to_be_bytes().to_vec();
            body.extend_from_slice(b"user\0app\0database\0app\0\0");
            let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
            packet.extend(body);
            tls.write_all(&packet).await?;
            let mut first = [0u8; 1];
            tls.read_exact(&mut first).await?;
            Ok::<u8, std::io::Error>(first[0])
        }
    };
    assert_eq!(
        connect(Some(b"postgresql")).await.expect("direct TLS"),
        b'R'
    );
    assert!(
        connect(None).await.is_err(),
        "direct TLS without ALPN is refused, as PostgreSQL does"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_config_sslrequests_pass_through() {
    let stack = Stack::start(1);
    let port = free_port();
    let pglb = Pglb::start(&Pglb::config(port, "", &stack.servers_toml()), port);
    // The harness's PgBouncers have no TLS: PgBouncer answers N, the session continues.
    let (ok, out) = psql(&format!(
        "host=127.0.0.1 port={port} user=app dbname=app sslmode=prefer"
    ));
    assert!(ok, "{out}");
    let (ok, out) = psql(&format!(
        "host=127.0.0.1 port={port} user=app dbname=app sslmode=require"
    ));
    assert!(!ok && out.contains("server does not support SSL"), "{out}");
    let log = pglb.wait_log(&["session closed"], 1, std::time::Duration::from_secs(3));
    assert!(log.contains("tls=\"none\""), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_is_end_to_end_and_its_cancels_are_called_best_effort() {
    let certs = tempfile::tempdir().expect("tempdir");
    make_ca(certs.path());
    let stack = Stack::start_with(
        1,
        harness::BouncerOpts {
            tls: Some(certs.path().to_owned()),
            ..harness::BouncerOpts::default()
        },
    );
    let (port, stats) = (free_port(), free_port());
    let config = format!(
        "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\n",
        Pglb::config(port, "", &stack.servers_toml())
    );
    let pglb = Pglb::start(&config, port);
    // PgBouncer's own certificate reaches psql: TLS end to end through pglb.
    let (ok, out) = psql(&format!(
        "host=localhost port={port} user=app dbname=app sslmode=verify-full sslrootcert={}",
        certs.path().join("ca.crt").display()
    ));
    assert!(ok, "{out}");
    let log = pglb.wait_log(&["session closed"], 1, std::time::Duration::from_secs(3));
    let line = log
        .lines()
        .find(|l| l.contains("session closed"))
        .unwrap_or_default();
    assert!(
        line.contains("tls=\"passthrough\"") && line.contains("cancel=\"best-effort\""),
        "{line}"
    );
    let (_, page) = harness::http_get(stats, "/stats").await;
    assert!(
        page.contains("TLS passed through (cancels of TLS clients: best effort)"),
        "the dashboard says so"
    );
}
