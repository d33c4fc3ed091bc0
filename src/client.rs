//! The client's connection: plain TCP, or TLS that pglb terminates. One type so that the
//! session path (startup → pick → relay) is written once for both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum Client {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
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
