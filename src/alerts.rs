//! Alerts: server state changes posted to a Slack-compatible webhook (`{"text": …}`).
//!
//! The alerter is its own task reading the event channel: it never blocks or slows the
//! proxy (a lagging alerter loses the oldest events and says so). Changes of one server
//! within `coalesce` become one message (flapping shows as a chain of states); delivery
//! is retried with backoff and a final failure is logged.
//!
//! At shutdown nothing queued is dropped silently: the changes still coalescing (and any
//! still in the channel) are sent at once, within [`SHUTDOWN_FLUSH`]; each message that
//! cannot go out in that time is logged as lost, with its text.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config;
use crate::events::Event;
use crate::webclient::{WebClient, client, hostname};

const ATTEMPTS: u32 = 5;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the final flush at shutdown may take.
pub const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// Runs until `stop`; flushes what is pending first.
pub async fn run(
    cfg: config::Alerts,
    mut events: broadcast::Receiver<Event>,
    stop: CancellationToken,
) {
    let host = hostname();
    let client = client();
    let mut pending: Vec<Event> = Vec::new();
    let mut deadline: Option<Instant> = None;
    // Deliveries run beside the loop, so a slow webhook delays neither the next events
    // nor the stop.
    let mut sending = JoinSet::new();
    loop {
        let flush_at = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = events.recv() => match r {
                Ok(e) => {
                    deadline.get_or_insert_with(|| Instant::now() + cfg.coalesce);
                    pending.push(e);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => warn!(lost = n, "alerter fell behind: {n} state changes not alerted"),
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = sleep_until(flush_at), if deadline.is_some() => {
                for text in messages(&pending, &host) {
                    sending.spawn(send(client.clone(), cfg.webhook_url.clone(), text, None));
                }
                pending.clear();
                deadline = None;
            }
            Some(_) = sending.join_next(), if !sending.is_empty() => {}
            _ = stop.cancelled() => break,
        }
    }
    // Shutdown: what is still in the channel joins what was coalescing.
    loop {
        match events.try_recv() {
            Ok(e) => pending.push(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                warn!(
                    lost = n,
                    "alert lost at shutdown: {n} state changes not alerted (the channel overflowed)"
                );
            }
            Err(_) => break,
        }
    }
    let give_up = Instant::now() + SHUTDOWN_FLUSH;
    for text in messages(&pending, &host) {
        sending.spawn(send(
            client.clone(),
            cfg.webhook_url.clone(),
            text,
            Some(give_up),
        ));
    }
    // Deliveries already under way get the same time; what is still going at its end is
    // stopped, and each logs its text as lost.
    let all = async { while sending.join_next().await.is_some() {} };
    let _ = tokio::time::timeout_at(give_up, all).await;
    sending.shutdown().await;
}

/// Delivers one message (see `deliver`); if stopped first, logs it as lost with its text.
async fn send(client: WebClient, url: String, text: String, give_up: Option<Instant>) {
    let mut unsent = Unsent {
        text: &text,
        ended: false,
    };
    deliver(&client, &url, &text, give_up).await;
    unsent.ended = true;
}

/// A delivery that was stopped (its task dropped at shutdown) before it ended.
struct Unsent<'a> {
    text: &'a str,
    ended: bool,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if !self.ended {
            warn!(
                "alert lost at shutdown: delivery still under way when the flush time ran out: {}",
                self.text
            );
        }
    }
}

/// One message per server (or listen) with its chain of states in order.
pub fn messages(events: &[Event], host: &str) -> Vec<String> {
    let mut keys: Vec<(&str, Option<&str>)> = Vec::new();
    for e in events {
        let key = (e.listen.as_str(), e.server.as_deref());
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys.into_iter()
        .map(|(listen, server)| {
            let mine: Vec<&Event> = events.iter().filter(|e| e.listen == listen && e.server.as_deref() == server).collect();
            let mut chain = vec![mine[0].from.as_str()];
            chain.extend(mine.iter().map(|e| e.to.as_str()));
            let last = mine[mine.len() - 1];
            let flaps = if mine.len() > 2 { format!(" (flapping: {} changes)", mine.len()) } else { String::new() };
            let at = humantime::format_rfc3339_seconds(last.at);
            match server {
                Some(s) => format!(
                    "[pglb@{host}] listen '{listen}' server '{s}': {}{flaps} — reason: {} — at {at}",
                    chain.join(" → "),
                    last.reason
                ),
                None if last.to == "available" => format!("[pglb@{host}] listen '{listen}' has servers again — {} — at {at}", last.reason),
                None => format!("[pglb@{host}] listen '{listen}' has no server available! — {} — at {at}", last.reason),
            }
        })
        .collect()
}

/// Posts one message, retrying with exponential backoff; with `give_up`, not past it.
async fn deliver(client: &WebClient, url: &str, text: &str, give_up: Option<Instant>) {
    let bounded = async {
        match give_up {
            Some(at) => tokio::time::timeout_at(at, post(client, url, text))
                .await
                .unwrap_or_else(|_| Err("shutdown flush time over".into())),
            None => post(client, url, text).await,
        }
    };
    if let Err(e) = bounded.await {
        let when = if give_up.is_some() {
            " at shutdown"
        } else {
            ""
        };
        warn!(error = %e, "alert lost{when}: could not be delivered: {text}");
    }
}

/// Posts one message, retrying with exponential backoff.
async fn post(client: &WebClient, url: &str, text: &str) -> Result<(), String> {
    let body = serde_json::json!({ "text": text }).to_string();
    let mut backoff = Duration::from_millis(500);
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        let req = Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())));
        let req = match req {
            Ok(r) => r,
            Err(e) => return Err(format!("invalid webhook URL {url}: {e}")),
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                debug!(attempt, "alert delivered");
                return Ok(());
            }
            Ok(Ok(resp)) => last_error = format!("HTTP {}", resp.status()),
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = "timed out".into(),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    Err(format!("{last_error} after {ATTEMPTS} attempts"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn ev(server: Option<&str>, from: &str, to: &str) -> Event {
        Event {
            listen: "postgres".into(),
            server: server.map(Into::into),
            from: from.into(),
            to: to.into(),
            reason: "Layer4 connection problem: Connection refused".into(),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn flapping_is_coalesced_per_server() {
        let events = [
            ev(Some("pgb1"), "UP", "DOWN"),
            ev(Some("pgb2"), "UP", "DRAIN"),
            ev(Some("pgb1"), "DOWN", "UP"),
            ev(Some("pgb1"), "UP", "DOWN"),
            ev(None, "available", "no server available"),
        ];
        let m = messages(&events, "lb1");
        assert_eq!(m.len(), 3);
        assert!(m[0].starts_with("[pglb@lb1] listen 'postgres' server 'pgb1': UP → DOWN → UP → DOWN (flapping: 3 changes)"), "{}", m[0]);
        assert!(m[0].contains("reason: Layer4 connection problem: Connection refused"));
        assert!(m[1].contains("server 'pgb2': UP → DRAIN —"), "{}", m[1]);
        assert!(m[2].contains("has no server available!"), "{}", m[2]);
    }
}
