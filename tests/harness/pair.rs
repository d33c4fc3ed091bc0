//! The keepalived pair for the failover tests (tests/failover_*.rs): two pglb nodes
//! (lb1, lb2) under keepalived with the shipped deploy/keepalived configs, a db node
//! (PostgreSQL + three PgBouncers from the harness) and a client node, each in its own
//! network namespace, joined by a Linux bridge in a "switch" namespace. A test builds the
//! lab with [`Lab::run`], injects faults on the master and measures how long the VIP takes
//! to move and how long new client connections fail.
//!
//! Needs root (network namespaces, keepalived); CI runs as root. Everything the lab makes
//! — namespaces (`pglbfo<pid>-*`), links, processes — is removed when it ends, also when
//! it fails. The measured times are printed and written to
//! target/failover-times-<test>.txt. One lab runs at a time on a machine (a file lock),
//! so that the failover tests, which nextest runs in parallel, do not measure each other.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::deploy::repo;
use super::{
    APP_DB, APP_PASSWORD, APP_USER, ConfigText, Proc, Stack, is_root, pglb_bin, run, stop_pid,
    successor_pid, text,
};

// The private test network: exists only inside the namespaces made here.
pub const DB_IP: &str = "10.213.0.10";
pub const LB_IPS: [&str; 2] = ["10.213.0.11", "10.213.0.12"];
pub const CLIENT_IP: &str = "10.213.0.20";
pub const VIP: &str = "10.213.0.100";
/// The failover target for unplanned failures (README / keepalived config header).
pub const TARGET: Duration = Duration::from_millis(1500);

// ---------------------------------------------------------------------------------------
// Small process helpers

/// Runs `ip ARGS` and insists on success.
pub fn ip(args: &[&str]) -> String {
    let out = run(Command::new("ip").args(args));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip netns exec NS PROGRAM`.
pub fn ns_cmd(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// [`ns_cmd`] whose process gets SIGKILL when the thread that spawned it dies: a test
/// process killed by a timeout leaves no keepalived or pglb behind. (Spawned from the
/// test's own thread, which lives until every guard has run.) `setpriv --pdeathsig` sets
/// PR_SET_PDEATHSIG and execs `ip`, which execs `program`: one process, one parent.
fn ns_cmd_dying_with_parent(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--", "ip", "netns", "exec", ns])
        .arg(program);
    c
}

/// A signal to a keepalived VRRP child, which no `Proc` holds (keepalived forked it).
fn signal(pid: i32, sig: Signal) {
    // A keepalived child of this lab (checked by the caller).
    let _ = kill(Pid::from_raw(pid), sig);
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it opens and
/// processes it spawns live there (setns(CLONE_NEWNET) is per thread and inherited).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter_netns(ns);
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        }
    })
}

pub fn enter_netns(ns: &str) {
    let f = File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    // Affects only the calling thread.
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// The 1-minute load average: timings on a busy machine are longer.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}

pub fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

// ---------------------------------------------------------------------------------------
// The network

/// Namespaces `pglbfo<pid>-{sw,db,lb1,lb2,client}`; the switch holds a bridge and one
/// veth per node, whose other end is `iface` inside the node. Deleted on drop (deleting
/// the namespaces deletes the bridge, the veths and any address on them).
pub struct Net {
    pub prefix: String,
    /// Interface name prefix (interface names are limited to 15 characters).
    pub short: String,
    made: Vec<String>,
}

const NODES: [(&str, &str); 4] = [
    ("db", DB_IP),
    ("lb1", LB_IPS[0]),
    ("lb2", LB_IPS[1]),
    ("client", CLIENT_IP),
];

impl Net {
    pub fn create() -> Net {
        let pid = std::process::id();
        let mut net = Net {
            prefix: format!("pglbfo{pid}"),
            short: format!("fo{pid}"),
            made: Vec::new(),
        };
        for node in ["sw", "db", "lb1", "lb2", "client"] {
            let ns = net.ns(node);
            ip(&["netns", "add", &ns]);
            net.made.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let sw = net.ns("sw");
        let br = format!("{}br", net.short);
        ip(&["-n", &sw, "link", "add", &br, "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", &br, "up"]);
        let iface = net.iface();
        for (node, addr) in NODES {
            let ns = net.ns(node);
            let port = format!("{}{}", net.short, &node[..node.len().min(3)]);
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", &iface, "netns",
                &ns,
            ]);
            ip(&["-n", &sw, "link", "set", &port, "master", &br, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &iface,
            ]);
            ip(&["-n", &ns, "link", "set", &iface, "up"]);
        }
        net
    }

    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// The node side of every veth (the "eth1" of the shipped keepalived configs).
    pub fn iface(&self) -> String {
        format!("{}e", self.short)
    }

    /// Whether the VIP is configured on `node` (getifaddrs in the namespace: polling
    /// every 20 ms must not itself load the machine with `ip` processes).
    pub fn vip_on(&self, node: &str) -> bool {
        let vip: std::net::Ipv4Addr = VIP.parse().unwrap();
        in_netns(&self.ns(node), || {
            nix::ifaddrs::getifaddrs().expect("getifaddrs").any(|a| {
                a.address
                    .as_ref()
                    .and_then(|a| a.as_sockaddr_in())
                    .is_some_and(|sin| sin.ip() == vip)
            })
        })
    }

    /// The MAC address of `node`'s interface.
    pub fn mac(&self, node: &str) -> String {
        let out = ip(&[
            "-n",
            &self.ns(node),
            "-br",
            "link",
            "show",
            "dev",
            &self.iface(),
        ]);
        out.split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC in {out:?}"))
            .to_owned()
    }

    /// The client's ARP entry for the VIP (its MAC), if complete.
    pub fn client_arp(&self) -> Option<String> {
        in_netns(&self.ns("client"), || {
            // thread-self: /proc/self/net would show the main thread's namespace.
            let arp = std::fs::read_to_string("/proc/thread-self/net/arp").unwrap_or_default();
            arp.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 4 && f[0] == VIP && f[2] != "0x0").then(|| f[3].to_owned())
            })
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

// ---------------------------------------------------------------------------------------
// pglb and keepalived on an lb node

/// Node `node`'s pglb: the lab's PgBouncers, tcp checks, and the other node as its peer
/// (operator actions are shared).
pub fn pglb_config(bouncer_ports: &[u16], node: usize) -> String {
    let mut c = format!(
        "[global]\nmaxconn = 2000\ngrace = \"5s\"\nnode = \"lb{}\"\n\n\
         [[listen]]\nname = \"postgres\"\nbind = \"0.0.0.0:5432\"\nbalance = \"leastconn\"\nretries = 3\n\n\
         [listen.timeouts]\nconnect = \"1s\"\n\n\
         [listen.check]\ntype = \"tcp\"\ninterval = \"200ms\"\nfastinter = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 2\n\n",
        node + 1
    );
    for (i, port) in bouncer_ports.iter().enumerate() {
        let _ = writeln!(
            c,
            "[[listen.server]]\nname = \"pgb{}\"\naddr = \"{DB_IP}:{port}\"\n",
            i + 1
        );
    }
    let _ = write!(
        c,
        "[stats]\nbind = \"0.0.0.0:8404\"\n[stats.auth]\nuser = \"admin\"\npassword = \"lab-admin\"\n\n\
         [[peer]]\nname = \"lb{}\"\nurl = \"http://{}:8404\"\n",
        2 - node,
        LB_IPS[1 - node]
    );
    c
}

/// keepalived in the foreground (`-n`) inside an lb namespace. `ip netns exec` gives it
/// a private mount namespace, where /var/log is bound to the node's directory: the
/// shipped notify script then logs transitions there instead of the host's /var/log.
/// `proc` holds the main process; on drop the VRRP child it forked is reaped too.
pub struct Keepalived {
    pub proc: Proc,
    conf: PathBuf,
    vrrp_pidfile: PathBuf,
}

impl Keepalived {
    /// The VRRP child process, if it is still a live keepalived of this config.
    fn vrrp_pid(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(&self.vrrp_pidfile)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let conf = self.conf.to_string_lossy();
        String::from_utf8_lossy(&cmdline)
            .contains(conf.as_ref())
            .then_some(pid)
    }

    /// Graceful stop: SIGTERM (keepalived sends priority-0 adverts and removes the VIP).
    pub fn terminate(&mut self) {
        let vrrp = self.vrrp_pid();
        self.proc.stop();
        self.reap_vrrp(vrrp);
    }

    /// A crash: every keepalived process of the node dies by SIGKILL. The parent is
    /// stopped first so that it can neither respawn the VRRP child nor, by dying first,
    /// let the child stop gracefully (the child gets SIGTERM when its parent dies).
    pub fn crash(&mut self) {
        let vrrp = self.vrrp_pid().expect("keepalived VRRP child pid");
        self.proc.signal(Signal::SIGSTOP);
        signal(vrrp, Signal::SIGKILL);
        self.proc.signal(Signal::SIGKILL);
        assert!(self.proc.wait_exit(Duration::from_secs(5)).is_some());
        self.reap_vrrp(Some(vrrp));
    }

    /// SIGKILL to the main keepalived process only (the pid in keepalived's pid file).
    pub fn kill_main(&mut self) {
        let vrrp = self.vrrp_pid();
        self.proc.signal(Signal::SIGKILL);
        assert!(self.proc.wait_exit(Duration::from_secs(5)).is_some());
        self.reap_vrrp(vrrp);
    }

    /// Waits up to 5 s for the (reparented) VRRP child to go, then SIGKILLs it.
    fn reap_vrrp(&self, vrrp: Option<i32>) {
        let Some(pid) = vrrp else { return };
        let alive = || {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(self.conf.to_string_lossy().as_ref()))
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive() {
            signal(pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// An lb node: its namespace, directory, pglb and keepalived.
pub struct Node {
    pub name: &'static str,
    pub ns: String,
    pub keepalived: Option<Keepalived>,
    /// The real pglb binary in the node's namespace (SIGTERM, then SIGKILL, on drop).
    pub pglb: Option<Proc>,
    /// The stderr log of the newest `pglb`.
    pglb_log: PathBuf,
    keepalived_conf: PathBuf,
    pglb_conf: PathBuf,
    starts: usize,
    pub dir: tempfile::TempDir,
}

impl Node {
    /// Sends `sig` to this node's pglb (which must be running).
    pub fn signal_pglb(&self, sig: Signal) {
        self.pglb.as_ref().expect("pglb running").signal(sig)
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    pub fn start_pglb(&mut self) {
        assert!(self.pglb.is_none());
        self.starts += 1;
        let log = self.dir.path().join(format!("pglb-{}.log", self.starts));
        let p = Proc::spawn(
            ns_cmd_dying_with_parent(&self.ns, pglb_bin())
                .arg("--config")
                .arg(&self.pglb_conf)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("pglb log")),
            "pglb",
            Signal::SIGTERM,
        );
        // Serving with every PgBouncer checked: /health answers 200.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.health_ok() {
            assert!(
                Instant::now() < deadline,
                "{}: pglb /health not 200 within 10 s:\n{}",
                self.name,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.pglb = Some(p);
        self.pglb_log = log;
    }

    /// The running pglb's log.
    pub fn pglb_log(&self) -> String {
        assert!(self.pglb.is_some(), "{}: no pglb", self.name);
        std::fs::read_to_string(&self.pglb_log).unwrap_or_default()
    }

    pub fn servers_ok(&self) -> bool {
        run(ns_cmd(&self.ns, "curl").args([
            "-fsS",
            "-m",
            "1",
            "http://127.0.0.1:8404/health?servers",
        ]))
        .status
        .success()
    }

    fn health_ok(&self) -> bool {
        run(ns_cmd(&self.ns, "curl").args(["-fsS", "-m", "1", "http://127.0.0.1:8404/health"]))
            .status
            .success()
    }

    pub fn start_keepalived(&mut self) {
        assert!(self.keepalived.is_none());
        self.starts += 1;
        let d = self.dir.path();
        let n = self.starts;
        let pid = d.join(format!("keepalived-{n}.pid"));
        let vrrp_pidfile = d.join(format!("vrrp-{n}.pid"));
        let checkers = d.join(format!("checkers-{n}.pid"));
        let log = File::create(d.join(format!("keepalived-{n}.log"))).expect("log");
        let script = format!(
            "mount --bind '{}' /var/log && exec keepalived -n -l -D -f '{}' -p '{}' -r '{}' -c '{}'",
            self.log_dir().display(),
            self.keepalived_conf.display(),
            pid.display(),
            vrrp_pidfile.display(),
            checkers.display()
        );
        let proc = Proc::spawn(
            ns_cmd_dying_with_parent(&self.ns, "sh")
                .args(["-c", &script])
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
            "keepalived",
            Signal::SIGTERM,
        );
        self.keepalived = Some(Keepalived {
            proc,
            conf: self.keepalived_conf.clone(),
            vrrp_pidfile,
        });
    }

    /// The VRRP states the shipped notify script logged, oldest first.
    pub fn states(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_dir().join("pglb-keepalived.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(" is now ").nth(1))
            .filter_map(|s| s.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the notify script logged `state` as the newest of more than `seen`
    /// transitions.
    pub fn wait_state(&self, state: &str, seen: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.states();
            if s.len() > seen && s.last().map(String::as_str) == Some(state) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: keepalived not {state} within {limit:?}; transitions: {s:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sessions the running pglb logged as closed (0 when none runs).
    pub fn sessions(&self) -> usize {
        self.pglb
            .as_ref()
            .and_then(|_| std::fs::read_to_string(&self.pglb_log).ok())
            .map(|l| l.matches("session closed").count())
            .unwrap_or(0)
    }
}

/// Where keepalived may run the scripts from. With enable_script_security it refuses a
/// script that a non-root user could modify (through the file or any directory above
/// it); when the checkout is such a place, the scripts are copied to a root-owned
/// directory (unchanged).
fn script_dir(repo_scripts: &Path, tmp: &Path) -> PathBuf {
    let secure = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
            m.uid() == 0 && (m.mode() & 0o022 == 0 || sticky_dir)
        })
    };
    let all_secure = ["check-pglb", "keepalived-notify"]
        .iter()
        .all(|s| secure(&repo_scripts.join(s)))
        && repo_scripts.ancestors().all(secure);
    if all_secure {
        return repo_scripts.to_path_buf();
    }
    let dir = tmp.join("scripts");
    std::fs::create_dir(&dir).expect("scripts dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for s in ["check-pglb", "keepalived-notify"] {
        std::fs::copy(repo_scripts.join(s), dir.join(s)).expect("copy script");
        std::fs::set_permissions(dir.join(s), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    println!(
        "note: {} is writable by non-root; keepalived runs copies from {}",
        repo_scripts.display(),
        dir.display()
    );
    dir
}

/// deploy/keepalived/keepalived-lbN.conf with the Vagrant network replaced by the test
/// network (interface, node addresses, VIP) and the scripts' install path by `scripts`.
/// Nothing else changes.
fn render_keepalived(node: usize, iface: &str, scripts: &Path) -> String {
    let path = repo().join(format!("deploy/keepalived/keepalived-lb{}.conf", node + 1));
    let conf = std::fs::read_to_string(&path).expect("keepalived config");
    let rendered = ConfigText::new(conf)
        .edit("192.168.1.100", VIP) // before the node addresses it starts with
        .edit("192.168.1.10", LB_IPS[0])
        .edit("192.168.1.11", LB_IPS[1])
        .edit("eth1", iface)
        // The stats address given, not read from this machine's /etc/pglb.
        .edit("check-pglb alive\"", "check-pglb alive 127.0.0.1:8404\"")
        .edit(
            "check-pglb servers\"",
            "check-pglb servers 127.0.0.1:8404\"",
        )
        .edit("/usr/local/lib/pglb/", &format!("{}/", scripts.display()))
        .build();
    for line in rendered.lines() {
        let code = line.split('#').next().unwrap_or("");
        assert!(
            !code.contains("192.168.") && !code.contains("/usr/local/lib/pglb"),
            "{}: not rendered: {line}",
            path.display()
        );
    }
    for needle in [
        format!("{VIP}/24 dev {iface}"),
        format!("interface {iface}"),
        format!("unicast_src_ip {}", LB_IPS[node]),
        LB_IPS[1 - node].to_string(),
    ] {
        assert!(
            rendered.contains(&needle),
            "rendered config lacks {needle:?}"
        );
    }
    rendered
}

// ---------------------------------------------------------------------------------------
// Clients

fn vip_dsn() -> String {
    format!(
        "host={VIP} port=5432 user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} connect_timeout=3"
    )
}

/// Starts one short psql session at the VIP (in the calling thread's namespace).
fn psql_vip_spawn() -> std::io::Result<Child> {
    Command::new("psql")
        .args(["-X", "-At", "-c", "SELECT 1"])
        .arg(vip_dsn())
        .env("PGPASSWORD", APP_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// (ok, error) of a finished psql from `psql_vip_spawn`.
fn psql_result(child: &mut Child) -> (bool, String) {
    use std::io::Read;
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    let success = child.wait().map(|s| s.success()).unwrap_or(false);
    if success && out.trim() == "1" {
        return (true, String::new());
    }
    // "psql: error: connection to server at "10.213.0.100", port 5432 failed: Connection refused"
    let err = err.lines().next().unwrap_or("").trim();
    let err = err.rsplit("failed: ").next().unwrap_or(err);
    (false, err.chars().take(100).collect())
}

struct Attempt {
    /// Start, since the probe started.
    at: Duration,
    took: Duration,
    ok: bool,
    err: String,
}

/// Short connections to the VIP from the client namespace — psql connects, runs SELECT 1
/// and disconnects — one started every `every` whether or not the previous ones have
/// finished (clients arrive on their own schedule), bounded by `max_attempts` and
/// `max_time`; each is given 5 s. (psql rather than tokio-postgres: in the unoptimized
/// test build a tokio-postgres connection with SCRAM took ~0.5 s, psql ~0.1 s.)
pub struct Probe {
    t0: Instant,
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Attempt>>,
}

impl Probe {
    pub fn start(
        client_ns: &str,
        every: Duration,
        max_attempts: usize,
        max_time: Duration,
    ) -> Probe {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let ns = client_ns.to_owned();
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            enter_netns(&ns);
            let mut done = Vec::new();
            let mut running: Vec<(Duration, Instant, Option<Child>)> = Vec::new();
            let mut next = t0;
            let mut started = 0;
            loop {
                let spawning = started < max_attempts
                    && !stop2.load(Ordering::SeqCst)
                    && t0.elapsed() < max_time;
                if !spawning && running.is_empty() {
                    break;
                }
                if spawning && Instant::now() >= next {
                    let child = psql_vip_spawn();
                    running.push((t0.elapsed(), Instant::now(), child.ok()));
                    started += 1;
                    next += every;
                }
                running.retain_mut(|(at, began, child)| {
                    let Some(c) = child else {
                        done.push(Attempt {
                            at: *at,
                            took: Duration::ZERO,
                            ok: false,
                            err: "cannot run psql".into(),
                        });
                        return false;
                    };
                    let took = began.elapsed();
                    match c.try_wait() {
                        Ok(None) if took < Duration::from_secs(5) => true,
                        Ok(None) | Err(_) => {
                            let _ = c.kill();
                            let _ = c.wait();
                            done.push(Attempt {
                                at: *at,
                                took,
                                ok: false,
                                err: "no answer within 5 s".into(),
                            });
                            false
                        }
                        Ok(Some(_)) => {
                            let (ok, err) = psql_result(c);
                            done.push(Attempt {
                                at: *at,
                                took,
                                ok,
                                err,
                            });
                            false
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(5));
            }
            done.sort_by_key(|a| a.at);
            done
        });
        Probe { t0, stop, handle }
    }

    pub fn finish(self, fault: Instant) -> ProbeStats {
        self.stop.store(true, Ordering::SeqCst);
        let attempts = self.handle.join().expect("probe thread");
        ProbeStats::of(&attempts, fault.duration_since(self.t0))
    }
}

#[derive(Default)]
pub struct ProbeStats {
    pub attempts: usize,
    pub failed: usize,
    /// From the first failure of a run to the start of the next success.
    pub longest_fail_run: Duration,
    pub slowest_ok: Duration,
    /// From the fault to the end of the first success after the last failure.
    pub back_after: Option<Duration>,
    pub errors: Vec<String>,
    /// Each failure: its start relative to the fault (ms, negative = before) and its length.
    pub fails: Vec<(i128, u128)>,
}

impl ProbeStats {
    fn of(attempts: &[Attempt], fault: Duration) -> ProbeStats {
        let mut s = ProbeStats {
            attempts: attempts.len(),
            ..ProbeStats::default()
        };
        for a in attempts.iter().filter(|a| a.at + a.took < fault) {
            assert!(a.ok, "probe failed before the fault: {}", a.err);
        }
        let mut run: Option<Duration> = None;
        for a in attempts {
            if a.ok {
                s.slowest_ok = s.slowest_ok.max(a.took);
                if let Some(start) = run.take() {
                    s.longest_fail_run = s.longest_fail_run.max(a.at - start);
                }
            } else {
                s.failed += 1;
                run.get_or_insert(a.at);
                s.fails.push((
                    a.at.as_millis() as i128 - fault.as_millis() as i128,
                    a.took.as_millis(),
                ));
                if !s.errors.contains(&a.err) && s.errors.len() < 4 {
                    s.errors.push(a.err.clone());
                }
            }
        }
        if let Some(last_fail) = attempts.iter().rev().find(|a| !a.ok) {
            s.back_after = attempts
                .iter()
                .filter(|a| a.ok && a.at > last_fail.at)
                .map(|a| (a.at + a.took).saturating_sub(fault))
                .min();
        }
        assert!(
            run.is_none(),
            "clients still fail at the end of the probe ({} of {} failed): {:?}",
            s.failed,
            s.attempts,
            s.errors
        );
        let tail = attempts.iter().rev().take(3).filter(|a| a.ok).count();
        assert!(tail == 3, "the last probes did not all succeed");
        s
    }
}

/// psql at the VIP from the client namespace.
pub fn psql_vip(client_ns: &str, sql: &str) -> Result<String, String> {
    let out = run(ns_cmd(client_ns, "psql")
        .args(["-X", "-At", "-c", sql])
        .arg(vip_dsn())
        .env("PGPASSWORD", APP_PASSWORD));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(text(&out))
    }
}

pub fn pgbench(client_ns: &str, seconds: u32) -> Command {
    let mut c = ns_cmd(client_ns, "pgbench");
    c.args(["-n", "-S", "-c", "4", "-j", "2", "-T", &seconds.to_string()])
        .args(["-h", VIP, "-p", "5432", "-U", APP_USER, APP_DB])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

pub fn pgbench_value(out: &str, key: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------
// The test

/// One measured failover.
pub struct Row {
    pub case: &'static str,
    /// Fault to VIP on the new master.
    pub vip: Duration,
    /// Fault to VIP gone from the old master (None: it stayed).
    pub off: Option<Duration>,
    /// Fault to the client's ARP entry for the VIP naming the new master.
    pub arp: Option<Duration>,
    pub probe: ProbeStats,
    pub note: String,
}

/// The lab: fields drop in order, so the nodes' processes stop before the db node's
/// servers, and the namespaces go last.
pub struct Lab {
    pub nodes: Vec<Node>,
    pub db: Stack,
    pub net: Net,
    /// The client's namespace.
    pub client: String,
    macs: [String; 2],
    /// The measured failovers, for the table.
    pub rows: Vec<Row>,
}

impl Lab {
    /// Index of the node holding the VIP (and only that one).
    pub fn master(&self) -> usize {
        let on: Vec<bool> = ["lb1", "lb2"].iter().map(|n| self.net.vip_on(n)).collect();
        match on[..] {
            [true, false] => 0,
            [false, true] => 1,
            _ => panic!("VIP on lb1: {}, on lb2: {}", on[0], on[1]),
        }
    }

    /// Runs `fault` against master `from` while the client probe runs (a connection every
    /// `every`), and measures until the VIP has been on the other node for 2 s: when the
    /// VIP left `from`, reached the other node, and the client's ARP entry followed.
    pub fn failover(
        &mut self,
        case: &'static str,
        from: usize,
        every: Duration,
        fault: impl FnOnce(&mut Lab),
    ) -> Row {
        let to = 1 - from;
        let (from_name, to_name) = (self.nodes[from].name, self.nodes[to].name);
        assert_eq!(self.master(), from, "{case}: {from_name} must be master");
        let probe = Probe::start(&self.client, every, 200, Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(500));
        let t0 = Instant::now();
        fault(self);
        let (mut vip, mut off, mut arp) = (None, None, None);
        loop {
            let now = t0.elapsed();
            if off.is_none() && !self.net.vip_on(from_name) {
                off = Some(now);
            }
            if vip.is_none() && self.net.vip_on(to_name) {
                vip = Some(now);
            }
            if arp.is_none() && self.net.client_arp().as_deref() == Some(&self.macs[to]) {
                arp = Some(now);
            }
            match vip {
                Some(v) if now > v + Duration::from_secs(2) => break,
                None => assert!(
                    now < Duration::from_secs(5),
                    "{case}: VIP not on {to_name} after 5 s"
                ),
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let vip = vip.unwrap();
        let probe = probe.finish(t0);
        let row = Row {
            case,
            vip,
            off,
            arp,
            probe,
            note: String::new(),
        };
        println!(
            "{case}: VIP on {to_name} after {} ms, off {from_name} after {}, client ARP after {}; \
             {} of {} connections failed, longest failure run {} ms, back after {}, slowest success \
             {} ms; errors: {:?}; failures (start ms after the fault, took ms): {:?}",
            ms(row.vip),
            opt_ms(row.off),
            opt_ms(row.arp),
            row.probe.failed,
            row.probe.attempts,
            ms(row.probe.longest_fail_run),
            opt_ms(row.probe.back_after),
            ms(row.probe.slowest_ok),
            row.probe.errors,
            row.probe.fails
        );
        row
    }

    /// Restarts keepalived on `node` and waits until it is BACKUP and stays so.
    pub fn restart_keepalived(&mut self, node: usize) {
        let master = 1 - node;
        self.nodes[node].keepalived = None;
        let seen = self.nodes[node].states().len();
        self.nodes[node].start_keepalived();
        self.nodes[node].wait_state("BACKUP", seen, Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            self.nodes[node].states().last().map(String::as_str),
            Some("BACKUP")
        );
        assert_eq!(
            self.master(),
            master,
            "{} stays BACKUP",
            self.nodes[node].name
        );
    }

    fn print_diagnostics(&self) {
        for n in &self.nodes {
            eprintln!("--- {} transitions: {:?}", n.name, n.states());
            let mut logs: Vec<PathBuf> = std::fs::read_dir(n.dir.path())
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.sort();
            for p in logs
                .iter()
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
            {
                let log = std::fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .filter(|l| {
                        !l.contains("Sending gratuitous ARP") && !l.contains("session closed")
                    })
                    .rev()
                    .take(40)
                    .collect();
                eprintln!("--- {}:", p.display());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

pub fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()))
}

/// One failover lab on the machine at a time: `Lab::run` holds this until its lab is gone.
fn exclusive() -> Flock<File> {
    let path = std::env::temp_dir().join("pglb-failover-lab.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lock = match Flock::lock(lock, FlockArg::LockExclusiveNonblock) {
        Ok(held) => return held,
        Err((lock, _)) => lock,
    };
    println!(
        "waiting for another failover test's lab ({})",
        path.display()
    );
    let t0 = Instant::now();
    let held =
        Flock::lock(lock, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("flock: {e}"));
    println!("waited {} s for the other lab", t0.elapsed().as_secs());
    held
}

impl Lab {
    /// Builds the lab, starts pglb on both nodes and keepalived on lb1 (MASTER) then lb2
    /// (BACKUP), checks the steady state (a client at the VIP is served by lb1), then runs
    /// `scenario`. Prints the measured failovers as a table, also written to
    /// target/failover-times-`test`.txt; on failure (or with PGLB_FAILOVER_LOGS set)
    /// prints the nodes' transitions and log tails.
    pub fn run(test: &str, scenario: impl FnOnce(&mut Lab)) {
        assert!(
            is_root(),
            "the failover tests need root: they create network namespaces and run keepalived \
             (CI runs the suite as root; run `sudo -E cargo nextest run --test {test}`)"
        );
        for tool in ["ip", "keepalived", "curl", "psql", "pgbench", "mount"] {
            let found = std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|d| d.join(tool).is_file());
            assert!(
                found,
                "{tool} not found (bash deploy/apt-deps.sh; apt-get install curl iproute2)"
            );
        }
        let _lock = exclusive();
        let started = Instant::now();
        let load_before = loadavg();

        let net = Net::create();
        println!(
            "network: namespaces {}-{{sw,db,lb1,lb2,client}}, bridge {}br, node interface {}",
            net.prefix,
            net.short,
            net.iface()
        );

        // PostgreSQL and three PgBouncers in the db namespace, the PgBouncers listening on
        // every address there (the harness starts them on 127.0.0.1; restart on 0.0.0.0).
        let db = in_netns(&net.ns("db"), || {
            let mut stack = Stack::start(3);
            for b in &mut stack.bouncers {
                let ini = b.dir.path().join("pgbouncer.ini");
                let conf = std::fs::read_to_string(&ini).expect("pgbouncer.ini");
                std::fs::write(
                    &ini,
                    ConfigText::new(conf)
                        .edit("listen_addr = 127.0.0.1\n", "listen_addr = 0.0.0.0\n")
                        .build(),
                )
                .expect("pgbouncer.ini");
                b.restart();
            }
            stack.pg.pgbench_init();
            stack
        });
        let ports: Vec<u16> = db.bouncers.iter().map(|b| b.port).collect();

        let tmp = tempfile::Builder::new()
            .prefix("pglb-failover-")
            .tempdir()
            .expect("tempdir");
        let scripts = script_dir(&repo().join("deploy/keepalived"), tmp.path());
        let mut nodes = Vec::new();
        for (i, name) in ["lb1", "lb2"].into_iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix(&format!("pglb-failover-{name}-"))
                .tempdir()
                .expect("tempdir");
            std::fs::create_dir(dir.path().join("log")).expect("log dir");
            let keepalived_conf = dir.path().join("keepalived.conf");
            std::fs::write(
                &keepalived_conf,
                render_keepalived(i, &net.iface(), &scripts),
            )
            .expect("keepalived.conf");
            // keepalived's own check, in the namespace where the interface exists.
            let t = run(ns_cmd(&net.ns(name), "keepalived")
                .arg("-t")
                .arg("-f")
                .arg(&keepalived_conf));
            assert!(
                t.status.success()
                    && !text(&t).contains("Disabling")
                    && !text(&t).contains("WARNING"),
                "{name}: keepalived -t: {}",
                text(&t)
            );
            let pglb_conf = dir.path().join("pglb.toml");
            std::fs::write(&pglb_conf, pglb_config(&ports, i)).expect("pglb.toml");
            let check = run(Command::new(pglb_bin())
                .arg("--config")
                .arg(&pglb_conf)
                .arg("--check"));
            assert!(check.status.success(), "pglb --check: {}", text(&check));
            nodes.push(Node {
                name,
                ns: net.ns(name),
                keepalived: None,
                pglb: None,
                pglb_log: PathBuf::new(),
                keepalived_conf,
                pglb_conf,
                starts: 0,
                dir,
            });
        }
        let mut lab = Lab {
            nodes,
            db,
            client: net.ns("client"),
            macs: [net.mac("lb1"), net.mac("lb2")],
            net,
            rows: Vec::new(),
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lab.steady_state();
            scenario(&mut lab)
        }));
        lab.stop_successors();
        if result.is_err() || std::env::var_os("PGLB_FAILOVER_LOGS").is_some() {
            lab.print_diagnostics();
        }
        let mut table = String::new();
        let _ = writeln!(
            table,
            "{:<42} {:>6} {:>6} {:>6} {:>7} {:>8} {:>7} {:>7}  note",
            format!("{test} (deploy/keepalived)"),
            "VIP",
            "off",
            "ARP",
            "failed",
            "fail run",
            "back",
            "slow ok"
        );
        for r in &lab.rows {
            let _ = writeln!(
                table,
                "{:<42} {:>6} {:>6} {:>6} {:>7} {:>8} {:>7} {:>7}  {}",
                r.case,
                ms(r.vip),
                r.off.map_or_else(|| "stays".to_owned(), ms),
                r.arp.map_or_else(|| "-".to_owned(), ms),
                format!("{}/{}", r.probe.failed, r.probe.attempts),
                ms(r.probe.longest_fail_run),
                r.probe.back_after.map_or_else(|| "-".to_owned(), ms),
                ms(r.probe.slowest_ok),
                r.note
            );
        }
        let _ = writeln!(
            table,
            "All times in ms from the fault. VIP: VIP on the new master (polled every 20 ms); off: \
             VIP gone from the old master; ARP: the client's ARP entry names the new master; \
             failed: probe connections (psql, SELECT 1) failed/made; fail run: longest run of \
             failed connections; back: first success after the last failure; slow ok: slowest \
             successful connection. Total {} s; load average {} at the start, {} at the end; \
             {} cores.",
            started.elapsed().as_secs(),
            load_before,
            loadavg(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("\n{table}");
        let target = Path::new(pglb_bin())
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("target"));
        let _ = std::fs::write(target.join(format!("failover-times-{test}.txt")), &table);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        drop(lab);
        drop(tmp);
    }

    /// Stops the processes that upgrades (SIGUSR2) on the nodes started: no guard holds
    /// them, and a failed test must not leave one running.
    fn stop_successors(&self) {
        for n in &self.nodes {
            let conf = n.pglb_conf.to_string_lossy().into_owned();
            let mut logs: Vec<PathBuf> = std::fs::read_dir(n.dir.path())
                .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.retain(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("pglb-") && f.ends_with(".log"))
            });
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let Some(pid) = successor_pid(&text) else {
                    continue;
                };
                // Still a pglb of this node (the pid was not reused).
                let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&conf));
                if ours {
                    stop_pid(pid);
                }
            }
        }
    }

    /// The start and the steady state every scenario begins with: pglb on both nodes,
    /// keepalived on lb1 (becomes MASTER), then on lb2; the VIP on lb1 only, and a client
    /// at the VIP is served by lb1.
    fn steady_state(&mut self) {
        let (lb1, lb2) = (0usize, 1usize);
        for n in &mut self.nodes {
            n.start_pglb();
        }
        self.nodes[lb1].start_keepalived();
        self.nodes[lb1].wait_state("MASTER", 0, Duration::from_secs(5));
        self.nodes[lb2].start_keepalived();
        self.nodes[lb2].wait_state("BACKUP", 0, Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(500));

        // ---- a. steady state: VIP on lb1 only, and a client at the VIP is served by lb1.
        assert_eq!(self.master(), lb1, "VIP must start on lb1");
        let before = self.nodes[lb1].sessions();
        assert_eq!(psql_vip(&self.client, "SELECT 40 + 2").as_deref(), Ok("42"));
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.nodes[lb1].sessions() <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            self.nodes[lb1].sessions() > before,
            "lb1's pglb served the VIP"
        );
        println!("a. steady state: VIP on lb1, psql at {VIP}:5432 served by lb1's pglb");
    }
}

/// One runtime-API-like admin action through the JSON API of `node`'s pglb.
pub fn admin(node: &Node, command: &str) -> bool {
    let (b_s, state) = command
        .strip_prefix("set server ")
        .and_then(|r| r.split_once(" state "))
        .unwrap_or(("", ""));
    let url = format!("http://127.0.0.1:8404/api/servers/{b_s}");
    run(ns_cmd(&node.ns, "curl").args([
        "-fsS",
        "-m",
        "2",
        "-u",
        "admin:lab-admin",
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!("{{\"action\": \"{state}\"}}"),
        &url,
    ]))
    .status
    .success()
}

/// New connections fail at most while the VIP is on its way (plus a connection that
/// was open when it moved).
pub fn assert_fail_run(row: &Row) {
    assert!(
        row.probe.longest_fail_run <= row.vip + Duration::from_millis(1000),
        "{}: clients failed for {:?}, longer than the VIP move ({:?}) + 1 s",
        row.case,
        row.probe.longest_fail_run,
        row.vip
    );
}

/// SIGKILL pglb on master `m` with the client probe (and, with `pgbench_secs`, pgbench)
/// running; the VIP must move to the other node within the target.
pub fn kill_pglb(lab: &mut Lab, m: usize, case: &'static str, pgbench_secs: Option<u32>) -> Row {
    let client = lab.client.clone();
    let seen = lab.nodes[m].states().len();
    let bench = pgbench_secs.map(|s| pgbench(&client, s).spawn().expect("pgbench"));
    if bench.is_some() {
        std::thread::sleep(Duration::from_millis(1000));
    }
    let mut row = lab.failover(case, m, Duration::from_millis(100), |lab| {
        lab.nodes[m].signal_pglb(Signal::SIGKILL)
    });
    lab.nodes[m].wait_state("FAULT", seen, Duration::from_secs(1));
    if let Some(b) = bench {
        let out = b.wait_with_output().expect("pgbench");
        let said = text(&out);
        let done = pgbench_value(&said, "number of transactions actually processed:").unwrap_or(0);
        println!(
            "{case}: pgbench -S during the failover: exit {:?}, {done} transactions (its sessions on the killed pglb end)",
            out.status.code()
        );
        row.note = format!("pgbench during it: exit {:?}", out.status.code());
    }
    assert!(
        row.vip < TARGET,
        "{case}: the VIP moved after {:?}, target {TARGET:?}",
        row.vip
    );
    assert_fail_run(&row);
    row
}
