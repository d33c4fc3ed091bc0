//! The two TCP_INFO counters the kernel relay's byte accounting needs. The one place in
//! pglb with `unsafe`: neither socket2, nix nor rustix wraps TCP_INFO.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// What a socket's TCP stack has done with the bytes written to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Bytes the peer acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Segments sent and not yet acknowledged (`tcpi_unacked`).
    pub unacked: u32,
    /// Bytes written but not yet sent (`tcpi_notsent_bytes`).
    pub not_sent: u32,
}

impl Sent {
    /// Every byte written so far has been acknowledged.
    pub fn settled(&self) -> bool {
        self.unacked == 0 && self.not_sent == 0
    }
}

// Offsets in `struct tcp_info` (linux/tcp.h; the layout only ever grows at the end).
const UNACKED: usize = 24;
const BYTES_ACKED: usize = 120;
const NOTSENT_BYTES: usize = 144;
const NEEDED: usize = NOTSENT_BYTES + 4;

/// Reads `fd`'s TCP_INFO. Fails on kernels older than 4.6 (no `tcpi_notsent_bytes`).
pub fn sent(fd: BorrowedFd<'_>) -> io::Result<Sent> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes and `len` points at its size; the kernel
    // writes at most `len` bytes and stores the length it wrote back in `len`. `fd` is a
    // live socket for the duration of the call (borrowed).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < NEEDED {
        return Err(io::Error::other(
            "TCP_INFO too short: kernel older than 4.6",
        ));
    }
    let u32_at = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    Ok(Sent {
        acked: u64_at(BYTES_ACKED),
        unacked: u32_at(UNACKED),
        not_sent: u32_at(NOTSENT_BYTES),
    })
}
