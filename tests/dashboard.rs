//! The dashboard as a person sees it: Debian's Chromium, headless, driven over the
//! DevTools protocol. The page lists the servers, a killed PgBouncer turns red after the
//! page refreshes itself, and the Drain button drains. Screenshots are kept under
//! `target/` (pglb-dashboard.png, pglb-dashboard-drained.png).

mod harness;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use harness::{Pglb, Proc, Stack, free_port, http_get};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHECK: &str = "[listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nfastinter = \"100ms\"\ndowninter = \"200ms\"\nrise = 2\nfall = 2\n";

/// Headless Chromium with a DevTools port, stopped by pid when dropped.
struct Browser {
    _proc: Proc,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromium is not installed: run deploy/apt-deps.sh");
        let proc = Proc::spawn(
            Command::new(binary)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--window-size=1500,700",
                    "--remote-debugging-address=127.0.0.1",
                    "--remote-debugging-port=0",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "chromium",
            Signal::SIGKILL,
        );
        // Chromium writes the port it chose into the profile directory.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.lines().next()?.parse().ok())
            {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        Browser {
            _proc: proc,
            _profile: profile,
            port,
        }
    }
}

/// A DevTools session on one page: send a command, wait for its answer.
struct Page {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Page {
    async fn open(browser: &Browser) -> Page {
        let (_, body) = http_get(browser.port, "/json/list").await;
        let targets: Value = serde_json::from_str(&body).expect("DevTools target list");
        let url = targets
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("DevTools websocket");
        Page { ws, next_id: 1 }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::text(msg))
            .await
            .expect("send DevTools command");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(20), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer"))
                .expect("websocket open")
                .expect("websocket frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it returns `want`.
    async fn wait_for(&mut self, expr: &str, want: Value, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.eval(expr).await;
            if v == want {
                return v;
            }
            assert!(Instant::now() < deadline, "{expr} is {v}, expected {want}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, name: &str) -> PathBuf {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        std::fs::create_dir_all(&dir).expect("target dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

const ROWS: &str = "JSON.stringify(Array.from(document.querySelectorAll('tr[id^=\"server-postgres-\"]')).map(r => [r.id, r.className, getComputedStyle(r.cells[0]).backgroundColor]))";

fn rows(v: &Value) -> Vec<(String, String, String)> {
    serde_json::from_str::<Vec<(String, String, String)>>(v.as_str().unwrap_or("[]"))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_servers_turns_a_killed_one_red_and_drains() {
    let mut stack = Stack::start(3);
    let (port, stats) = (free_port(), free_port());
    let config = format!(
        "{}\n[stats]\nbind = \"127.0.0.1:{stats}\"\nrefresh = \"1s\"\n[stats.auth]\nuser = \"admin\"\npassword = \"s3cret\"\n",
        Pglb::config(port, CHECK, &stack.servers_toml())
    );
    let pglb = Pglb::start(&config, port);
    let browser = Browser::start();
    let mut page = Page::open(&browser).await;
    let token = base64::engine::general_purpose::STANDARD.encode("admin:s3cret");
    page.call("Network.enable", json!({})).await;
    page.call(
        "Network.setExtraHTTPHeaders",
        json!({"headers": {"Authorization": format!("Basic {token}")}}),
    )
    .await;
    page.call(
        "Page.navigate",
        json!({"url": format!("http://127.0.0.1:{stats}/stats")}),
    )
    .await;

    // Three servers, all green once their first checks pass (the page refreshes itself).
    let green = "rgb(192, 255, 192)";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = rows(&page.eval(ROWS).await);
        if r.len() == 3 && r.iter().all(|(_, class, bg)| class == "up" && bg == green) {
            let ids: Vec<&str> = r.iter().map(|(id, _, _)| id.as_str()).collect();
            assert_eq!(
                ids,
                [
                    "server-postgres-pgb1",
                    "server-postgres-pgb2",
                    "server-postgres-pgb3"
                ]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "servers not all up on the page: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let title = page.eval("document.title").await;
    assert_eq!(title, "pglb statistics");

    // Kill pgb2: after the next refresh its row is red.
    stack.bouncers[1].kill();
    page.wait_for(
        "(() => { const r = document.getElementById('server-postgres-pgb2'); return r ? r.className + ' ' + getComputedStyle(r.cells[0]).backgroundColor : '' })()",
        json!("down rgb(255, 144, 144)"),
        Duration::from_secs(10),
    )
    .await;
    let shot = page.screenshot("pglb-dashboard.png").await;
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot {shot:?}"
    );

    // Press pgb1's Drain button: the form posts, the page comes back with pgb1 drained.
    page.eval(
        "document.querySelector('#server-postgres-pgb1 button[value=\"drain\"]').click(); true",
    )
    .await;
    page.wait_for(
        "(() => { const r = document.getElementById('server-postgres-pgb1'); return r ? r.className + ' ' + getComputedStyle(r.cells[0]).backgroundColor : '' })()",
        json!("drain rgb(32, 160, 255)"),
        Duration::from_secs(10),
    )
    .await;
    page.screenshot("pglb-dashboard-drained.png").await;
    let (_, csv) = http_get(stats, "/stats;csv").await;
    assert!(
        csv.lines()
            .any(|l| l.starts_with("postgres,pgb1,") && l.contains(",DRAIN,")),
        "{csv}"
    );
    assert!(
        pglb.log()
            .contains("Server postgres/pgb1 set to DRAIN by admin")
    );
}
