//! The client's connection: plain TCP, or TLS that pglb terminates. One type so that the
//! session path (startup → pick → relay) is written once for both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use crate::counters::Counter;
use crate::refusal::Refusal;
use crate::startup::StartupError;
use crate::state::ListenState;

pub enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
    /// Sends a refusal as the client's ErrorResponse and closes. Best effort: the client
    /// may be gone already.
    pub(crate) async fn refuse(&mut self, refusal: &Refusal) {
        let bytes = refusal.to_error_response();
        let _ = timeout(Duration::from_secs(1), async {
            self.write_all(&bytes).await?;
            self.shutdown().await
        })
        .await;
    }

    /// Answers a malformed startup packet with the error it deserves (counted and
    /// logged); a client that left gets nothing.
    pub(crate) async fn refuse_bad_startup(&mut self, listen: &ListenState, e: StartupError) {
        if matches!(e, StartupError::Closed | StartupError::Io(_)) {
            debug!(listen = %listen.name, "client left during startup");
            return;
        }
        listen.counters.ereq.inc();
        warn!(listen = %listen.name, error = %e, "bad startup packet");
        let refusal = Refusal::BadStartup {
            sqlstate: e.sqlstate(),
            message: e.to_string(),
        };
        self.refuse(&refusal).await;
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Client::Tls(_))
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_flush(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
