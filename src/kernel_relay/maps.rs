//! The BPF side as pglb sees it: the program loaded and attached to its socket map, and
//! the per-socket `flows` it keeps (layout: `struct flow` in relay.bpf.c).

use std::io;
use std::os::fd::AsFd;
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};

/// Words of `struct flow`, in order.
const WORDS: usize = 10;
const PEER: usize = 0;
const SESSION: usize = 1;
const BYTES: usize = 2;
const LAST_NS: usize = 3;
const MESSAGES: usize = 4;
const SKIP: usize = 5;
const HAVE: usize = 7;
const STATUS: usize = 8;
const FLAGS: usize = 9;

/// `flow.flags`.
const F_SERVER: u64 = 1;
const F_OPAQUE: u64 = 2;
const F_BACK: u64 = 4;
const F_LOST_PEER: u64 = 8;
const F_AT_REST: u64 = 16;

/// Control words (`control`, per session).
pub const C_DRAIN: u64 = 1;
pub const C_PASS: u64 = 2;

/// One socket's flow as the BPF program last left it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Bytes redirected to the peer.
    pub bytes: u64,
    /// CLOCK_MONOTONIC (ns) of the last data; 0 before any.
    pub last_ns: u64,
    /// Client: requests sent (plus those pending at the hand-over); server: ReadyForQuery.
    pub messages: u64,
    /// Status of the server's last ReadyForQuery.
    pub status: u8,
    /// Between messages (nothing of a message pending).
    pub at_boundary: bool,
    /// Server: its last data ended right after a ReadyForQuery.
    pub at_rest: bool,
    /// Framing given up (not PostgreSQL as expected).
    pub opaque: bool,
    /// Handed back: data now goes up to pglb's reads.
    pub back: bool,
    /// A redirect failed: the peer is gone from the map.
    pub lost_peer: bool,
}

impl Flow {
    fn from_words(w: [u64; WORDS]) -> Flow {
        let flags = w[FLAGS];
        Flow {
            bytes: w[BYTES],
            last_ns: w[LAST_NS],
            messages: w[MESSAGES],
            status: w[STATUS] as u8,
            at_boundary: w[SKIP] == 0 && w[HAVE] == 0,
            at_rest: flags & F_AT_REST != 0,
            opaque: flags & F_OPAQUE != 0,
            back: flags & F_BACK != 0,
            lost_peer: flags & F_LOST_PEER != 0,
        }
    }
}

/// A session's two sockets as the maps know them (their socket cookies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub client: u64,
    pub server: u64,
}

/// The loaded program and its maps. The maps are shared by every session of the
/// process; each operation is one bpf() call, made under the lock.
pub struct Loaded {
    maps: Mutex<Maps>,
    /// How many sessions the maps hold at once (fixed when the program loads).
    pub sessions: u32,
    /// Keeps the program loaded and attached for the life of the process.
    _ebpf: Mutex<Ebpf>,
}

struct Maps {
    socks: SockHash<MapData, u64>,
    flows: HashMap<MapData, u64, [u64; WORDS]>,
    control: HashMap<MapData, u64, u64>,
}

/// Why the kernel cannot relay for pglb.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this pglb was built without its BPF program ({0})")]
    NotBuilt(&'static str),
    #[error("loading the BPF program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF map {0}: {1}")]
    Map(&'static str, String),
    #[error("BPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
}

/// The compiled program (empty when the build had no clang).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

impl Loaded {
    /// Loads the program, sizes the maps for `sessions` relayed sessions and attaches the
    /// verdict program to the socket map.
    pub fn load(sessions: u32) -> Result<Loaded, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NotBuilt(env!("PGLB_BPF_BUILD")));
        }
        let sockets = sessions.saturating_mul(2).max(2);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("socks", sockets)
            .map_max_entries("flows", sockets)
            .map_max_entries("control", sessions.max(1))
            .load(OBJECT)?;
        let socks: SockHash<MapData, u64> = take(&mut ebpf, "socks")?;
        let flows = take(&mut ebpf, "flows")?;
        let control = take(&mut ebpf, "control")?;
        let program: &mut SkSkb = ebpf
            .program_mut("pglb_verdict")
            .ok_or(LoadError::Map("pglb_verdict", "no such program".into()))?
            .try_into()?;
        program.load()?;
        program.attach(socks.fd())?;
        Ok(Loaded {
            maps: Mutex::new(Maps {
                socks,
                flows,
                control,
            }),
            sessions,
            _ebpf: Mutex::new(ebpf),
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a session's sockets in the relay: their flows first, then the server's
    /// socket, then the client's (the client is waiting for its ReadyForQuery: nothing
    /// arrives from it before). `pending`: requests the server has yet to answer.
    pub fn insert(&self, client: &impl AsFd, server: &impl AsFd, pending: u64) -> io::Result<Pair> {
        let pair = Pair {
            client: cookie(client)?,
            server: cookie(server)?,
        };
        let mut c = [0u64; WORDS];
        c[PEER] = pair.server;
        c[SESSION] = pair.client;
        c[MESSAGES] = pending;
        let mut s = [0u64; WORDS];
        s[PEER] = pair.client;
        s[SESSION] = pair.client;
        s[FLAGS] = F_SERVER;
        let mut maps = self.maps();
        let done = (|| {
            maps.control.insert(pair.client, 0, 0)?;
            maps.flows.insert(pair.client, c, 0)?;
            maps.flows.insert(pair.server, s, 0)?;
            maps.socks.insert(pair.server, server.as_fd(), 0)?;
            maps.socks.insert(pair.client, client.as_fd(), 0)
        })();
        if let Err(e) = done {
            maps.forget(pair);
            return Err(io::Error::other(e));
        }
        Ok(pair)
    }

    /// Both flows of a session, client's first.
    pub fn flows(&self, pair: Pair) -> io::Result<(Flow, Flow)> {
        let maps = self.maps();
        let get = |k| {
            maps.flows
                .get(&k, 0)
                .map(Flow::from_words)
                .map_err(io::Error::other)
        };
        Ok((get(pair.client)?, get(pair.server)?))
    }

    /// Sets a session's control word (`C_DRAIN`, `C_PASS`).
    pub fn control(&self, pair: Pair, word: u64) -> io::Result<()> {
        self.maps()
            .control
            .insert(pair.client, word, 0)
            .map_err(io::Error::other)
    }

    /// Takes the sockets out of the relay (any data the kernel still queued for them
    /// is dropped: call once nothing is in flight) and forgets their flows.
    pub fn remove(&self, pair: Pair) {
        self.maps().forget(pair);
    }

    /// Forgets the flows only; the sockets leave the map when they close. (After a hand
    /// back: taking a socket out of the map would drop the data passed up to it.)
    pub fn forget_flows(&self, pair: Pair) {
        let mut maps = self.maps();
        let _ = maps.flows.remove(&pair.client);
        let _ = maps.flows.remove(&pair.server);
        let _ = maps.control.remove(&pair.client);
    }
}

#[cfg(test)]
impl Loaded {
    /// Sockets with a flow (two per session in the kernel).
    pub fn flow_count(&self) -> usize {
        self.maps().flows.keys().filter(Result::is_ok).count()
    }
}

impl Maps {
    fn forget(&mut self, pair: Pair) {
        let _ = self.socks.remove(&pair.client);
        let _ = self.socks.remove(&pair.server);
        let _ = self.flows.remove(&pair.client);
        let _ = self.flows.remove(&pair.server);
        let _ = self.control.remove(&pair.client);
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(LoadError::Map(name, "missing from the object".into()))?;
    T::try_from(map).map_err(|e| LoadError::Map(name, e.to_string()))
}

fn cookie(s: &impl AsFd) -> io::Result<u64> {
    socket2::SockRef::from(s).cookie()
}
