#!/usr/bin/env python3
"""pglb vs HAProxy vs one PgBouncer directly, on loopback. Run through bench/run.sh.

Stands up PostgreSQL 15, three PgBouncers (transaction pooling, SCRAM), pglb and HAProxy
over the same PgBouncers, runs pgbench workloads against the three targets interleaved
(pglb, HAProxy, direct; repeated for BENCH_ROUNDS rounds), measures the proxies' CPU
time per transaction, other processes' CPU (noise), and the proxies' memory per idle
authenticated client. Prints a markdown table of medians and writes it, with every
single run, to bench/results/latest.md. Standard library only.
"""

import base64
import hashlib
import hmac
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PGBOUNCER = "/usr/sbin/pgbouncer"
APP_USER, APP_PASSWORD, APP_DB = "app", "app-secret", "bench"
# The memory test's clients log in as IDLE_USER, whose userlist entry is a SCRAM secret
# (the same one PostgreSQL has): PgBouncer then verifies a login with a few HMACs instead
# of deriving a fresh salted password (4096 PBKDF2 rounds, ~4.5 ms) per login as it does
# for a plaintext entry, and the client derives its key once. Thousands of logins take
# seconds instead of a minute; the proxies relay the same bytes either way.
IDLE_USER, IDLE_PASSWORD = "idle", "idle-secret"


def scram_secret(password, iterations=4096):
    """PostgreSQL's stored form of a SCRAM-SHA-256 password."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda b: base64.b64encode(b).decode()
    return (f"SCRAM-SHA-256${iterations}:{b64(salt)}"
            f"${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}")


IDLE_SECRET = scram_secret(IDLE_PASSWORD)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------- settings


def env_int(name, default):
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


@dataclass
class Settings:
    quick: bool
    rounds: int
    duration: int
    memory_counts: list
    workloads: list
    pglb_binary: Path
    pglb_log_level: str
    threads: int
    perf: str
    targets: list
    out: Path
    tmp: Path

    @staticmethod
    def from_env(tmp):
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
        counts = os.environ.get("BENCH_MEMORY_CLIENTS", "2000" if quick else "2000,12000")
        return Settings(
            quick=quick,
            rounds=env_int("BENCH_ROUNDS", 1 if quick else 5),
            duration=env_int("BENCH_DURATION", 5 if quick else 9),
            memory_counts=[int(c) for c in counts.split(",") if c.strip() and c.strip() != "0"],
            workloads=[w for w in os.environ.get("BENCH_WORKLOADS", "").split(",") if w],
            pglb_binary=Path(os.environ.get("BENCH_PGLB", REPO / "target/release/pglb")),
            pglb_log_level=os.environ.get("BENCH_PGLB_LOG_LEVEL", "warn"),
            threads=env_int("BENCH_THREADS", 2),
            perf="" if os.environ.get("BENCH_PERF", "0") == "0" else os.environ["BENCH_PERF"],
            targets=[t for t in os.environ.get("BENCH_TARGETS", ",".join(ALL_TARGETS)).split(",")
                     if t in ALL_TARGETS],
            out=Path(os.environ.get("BENCH_OUT", REPO / "bench/results/latest.md")),
            tmp=Path(tmp),
        )


@dataclass
class Workload:
    key: str
    label: str
    pgbench_args: list
    per_connection: bool = False
    writes: bool = False
    # pgbench threads. 2 ("bursty"): two threads multiplex every connection, so one
    # proxy wake-up serves many sessions. Many ("fleet-shaped"): like many application
    # processes with a connection each, few sessions per wake-up.
    threads: int = 2
    # Extra seconds of -T for connecting every client first: pgbench counts them in -T,
    # and each login costs a PgBouncer ~4.5 ms of CPU (SCRAM), ~40 s for 8,000 here.
    connect_s: int = 0

    @property
    def fleet(self):
        return self.threads > 2


def largest_fleet():
    """The seed's 10,500 clients where the descriptor limit allows, else what it allows:
    the proxy holds 2 descriptors per client and pgbench 1, each under the same limit;
    40 % of the limit leaves room for the proxy's own (8,000 at 20,000 here)."""
    return min(10_500, int(open_files_limit() * 0.4) // 500 * 500)


def workloads_list():
    big = largest_fleet()
    return [
        Workload("select-c8", "select-only -c 8", ["-S", "-c", "8"]),
        Workload("select-c64", "select-only -c 64", ["-S", "-c", "64"]),
        Workload("select-c256", "select-only -c 256", ["-S", "-c", "256"]),
        Workload("tpcb-c32", "TPC-B-like -c 32", ["-c", "32"], writes=True),
        Workload("connect-c16", "select-only -C -c 16", ["-C", "-S", "-c", "16"],
                 per_connection=True),
        Workload("fleet-select-c256", "select-only -c 256 -j 100", ["-S", "-c", "256"],
                 threads=100),
        Workload("fleet-select-c1000", "select-only -c 1,000 -j 100", ["-S", "-c", "1000"],
                 threads=100, connect_s=5),
        Workload(f"fleet-select-c{big}", f"select-only -c {big:,} -j 100",
                 ["-S", "-c", str(big)], threads=100, connect_s=big // 200),
        Workload("fleet-tpcb-c256", "TPC-B-like -c 256 -j 50", ["-c", "256"], writes=True,
                 threads=50),
    ]

# "kernel" is a second pglb whose listen has relay = "kernel" (BPF sockmap relay).
ALL_TARGETS = ["pglb", "kernel", "haproxy", "direct"]
# The first tables compare these three, as before the kernel relay existed.
TARGETS = ["pglb", "haproxy", "direct"]
TARGET_NAMES = {"pglb": "pglb", "kernel": "pglb relay=kernel", "haproxy": "HAProxy",
                "direct": "PgBouncer direct"}


def log(text):
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------- processes


def is_root():
    return os.geteuid() == 0


def as_service_user(argv):
    """Servers run as postgres when we are root (PostgreSQL refuses to run as root)."""
    if is_root():
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"] + argv
    return argv


def give_to_service_user(path):
    if is_root():
        shutil.chown(path, "postgres", "postgres")


def make_service_dir(path):
    path.mkdir(parents=True, exist_ok=True)
    give_to_service_user(path)
    return path


class Processes:
    """Everything we start, stopped by pid on exit. Pids also go to <tmp>/pids so that
    run.sh's EXIT trap can stop leftovers if this script itself dies."""

    def __init__(self, tmp):
        self.started = []  # (name, Popen, stop signal)
        self.pid_file = tmp / "pids"

    def start(self, name, argv, log_path, stop_signal=signal.SIGTERM, as_service=True, **kw):
        log_file = open(log_path, "ab")
        give_to_service_user(log_path)
        comm = Path(argv[0]).name[:15]  # what /proc/<pid>/comm will say once it runs
        argv = as_service_user(argv) if as_service else argv
        kw.setdefault("stdout", log_file)
        proc = subprocess.Popen(argv, stderr=log_file, start_new_session=True, **kw)
        log_file.close()
        self.started.append((name, proc, stop_signal))
        with open(self.pid_file, "a") as f:
            f.write(f"{proc.pid} {comm}\n")
        return proc

    def stop(self, proc, timeout=15):
        for i, (name, p, sig) in enumerate(self.started):
            if p is proc:
                del self.started[i]
                stop_process(p, sig, timeout)
                return

    def stop_all(self):
        while self.started:
            name, p, sig = self.started.pop()
            stop_process(p, sig, 15)


def stop_process(proc, sig, timeout):
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_checked(argv, what, env=None, as_service=False):
    argv = as_service_user(argv) if as_service else argv
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, timeout=30, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {timeout}s")


def client_env():
    return dict(os.environ, PGPASSWORD=APP_PASSWORD, PGCONNECT_TIMEOUT="5")


def can_query(port):
    result = subprocess.run(
        ["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", APP_USER, "-d", APP_DB,
         "-c", "SELECT 1"], capture_output=True, text=True, env=client_env())
    return result.returncode == 0 and result.stdout.strip() == "1"


# ---------------------------------------------------------------- the stack


@dataclass
class Stack:
    postgres: subprocess.Popen = None
    pg_port: int = 0
    pg_dir: Path = None
    bouncers: list = field(default_factory=list)  # (port, Popen)
    pglb: subprocess.Popen = None
    pglb_port: int = 0
    kernel: subprocess.Popen = None
    kernel_port: int = 0
    haproxy: subprocess.Popen = None
    haproxy_port: int = 0

    def target_port(self, target):
        return {"pglb": self.pglb_port, "kernel": self.kernel_port,
                "haproxy": self.haproxy_port, "direct": self.bouncers[0][0]}[target]

    def target_process(self, target):
        return {"pglb": self.pglb, "kernel": self.kernel, "haproxy": self.haproxy,
                "direct": self.bouncers[0][1]}[target]


def start_postgres(procs, settings, stack):
    pg_dir = make_service_dir(settings.tmp / "pg")
    data = pg_dir / "data"
    run_checked([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                 "--auth-local=trust", "--auth-host=scram-sha-256"], "initdb", as_service=True)
    stack.pg_port = free_port()
    with open(data / "postgresql.auto.conf", "a") as f:
        f.write(f"port = {stack.pg_port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{pg_dir}'\nmax_connections = 400\n"
                "shared_buffers = 128MB\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nlog_min_messages = warning\n"
                # Vacuumed by the script between runs instead (settle_database), so no run
                # shares the machine with an autovacuum worker.
                "autovacuum = off\n")
    stack.postgres = procs.start("postgres", [str(PG_BIN / "postgres"), "-D", str(data)],
                                 pg_dir / "postgres.log", stop_signal=signal.SIGINT)
    wait_until("postgres", lambda: subprocess.run(
        [str(PG_BIN / "pg_isready"), "-q", "-h", str(pg_dir), "-p", str(stack.pg_port)]
    ).returncode == 0, proc=stack.postgres)
    stack.pg_dir = pg_dir
    psql_local(stack, "postgres", f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
    psql_local(stack, "postgres", f"CREATE ROLE {IDLE_USER} LOGIN PASSWORD '{IDLE_SECRET}'")
    psql_local(stack, "postgres", f"CREATE DATABASE {APP_DB} OWNER {APP_USER}")
    run_checked(["pgbench", "-i", "-q", "-s", "10", "-h", str(pg_dir), "-p", str(stack.pg_port),
                 "-U", APP_USER, APP_DB], "pgbench -i")


def psql_local(stack, db, sql):
    """Runs SQL as the superuser over PostgreSQL's own socket (not through any proxy)."""
    run_checked(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(stack.pg_dir),
                 "-p", str(stack.pg_port), "-U", "postgres", "-d", db, "-c", sql], "psql")


def settle_database(stack):
    """After a writing run: vacuum what it updated and checkpoint, so the next run (of
    whichever target) starts from the same table state and no background writer is busy."""
    psql_local(stack, APP_DB, "VACUUM")
    psql_local(stack, APP_DB, "CHECKPOINT")


def start_pgbouncers(procs, settings, stack, count=3):
    for n in range(1, count + 1):
        d = make_service_dir(settings.tmp / f"pgb{n}")
        port = free_port()
        (d / "userlist.txt").write_text(
            f'"{APP_USER}" "{APP_PASSWORD}"\n"{IDLE_USER}" "{IDLE_SECRET}"\n')
        (d / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"{APP_DB} = host=127.0.0.1 port={stack.pg_port} dbname={APP_DB}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {d}/userlist.txt\n"
            "pool_mode = transaction\ndefault_pool_size = 20\nmax_client_conn = 20000\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {d}/pgbouncer.log\nlog_connections = 0\nlog_disconnections = 0\n")
        for name in ("userlist.txt", "pgbouncer.ini"):
            give_to_service_user(d / name)
        proc = procs.start("pgbouncer", [PGBOUNCER, str(d / "pgbouncer.ini")], d / "stdout.log",
                           stop_signal=signal.SIGTERM)
        stack.bouncers.append((port, proc))
    for port, proc in stack.bouncers:
        wait_until(f"pgbouncer :{port}", lambda: can_query(port), proc=proc)


def write_pglb_config(settings, stack, path, port, relay="user"):
    servers = "".join(
        f'\n[[listen.server]]\nname = "pgb{n}"\naddr = "127.0.0.1:{port}"\n'
        for n, (port, _) in enumerate(stack.bouncers, 1))
    path.write_text(
        "[global]\nmaxconn = 20000\ngrace = \"2s\"\n"
        f'log_level = "{settings.pglb_log_level}"\nthreads = {settings.threads}\n\n'
        f'[[listen]]\nname = "bench"\nbind = "127.0.0.1:{port}"\n'
        f'balance = "leastconn"\nmaxconn = 15000\nrelay = "{relay}"\n\n'
        '[listen.timeouts]\nconnect = "5s"\nclient = "30m"\nserver = "30m"\n\n'
        '[listen.check]\ntype = "tcp"\ninterval = "2s"\n' + servers)
    give_to_service_user(path)


def start_pglb(procs, settings, stack, relay="user"):
    """pglb (relay "user") or the kernel-relay pglb (relay "kernel"), which runs as
    root: loading BPF programs needs CAP_BPF and CAP_NET_ADMIN (deploy/kernel-relay.conf)."""
    kernel = relay == "kernel"
    name = "pglb-kernel" if kernel else "pglb"
    d = make_service_dir(settings.tmp / name)
    port = (stack.kernel_port if kernel else stack.pglb_port) or free_port()
    config = d / "pglb.toml"
    write_pglb_config(settings, stack, config, port, relay)
    check = run_checked([str(settings.pglb_binary), "--config", str(config), "--check"],
                        f"{name} --check")
    if kernel and "kernel relay: ready" not in check:
        raise SystemExit(f"the kernel relay is unavailable here: {check.strip()}")
    proc = procs.start(name, [str(settings.pglb_binary), "--config", str(config)],
                       d / "pglb.log", stop_signal=signal.SIGTERM, as_service=not kernel)
    if kernel:
        stack.kernel, stack.kernel_port = proc, port
    else:
        stack.pglb, stack.pglb_port = proc, port
    wait_until(name, lambda: can_query(port), proc=proc)


def write_haproxy_config(settings, stack, path):
    # The same thread count for both proxies (BENCH_THREADS, default 2: one per core on
    # this machine, both proxies' default), so both may use the whole box.
    servers = "".join(f"    server pgb{n} 127.0.0.1:{port} check\n"
                      for n, (port, _) in enumerate(stack.bouncers, 1))
    # maxconn 20000 makes HAProxy want ~40,000 descriptors and refuse to start when it
    # cannot raise its limit that far; "no strict-limits" lets it run with what there is
    # (pglb runs with the same limit and its maxconn beyond it too).
    relax = "    no strict-limits\n" if open_files_limit() < 2 * 20000 + 100 else ""
    path.write_text(
        f"global\n    maxconn 20000\n    nbthread {settings.threads}\n" + relax + "\n"
        "defaults\n    mode tcp\n    timeout client 30m\n    timeout server 30m\n"
        "    timeout connect 5s\n\n"
        f"listen postgres\n    bind 127.0.0.1:{stack.haproxy_port}\n    maxconn 20000\n"
        "    balance leastconn\n    option pgsql-check user app\n"
        "    default-server inter 2s fall 3 rise 2\n" + servers)
    give_to_service_user(path)


def start_haproxy(procs, settings, stack):
    d = make_service_dir(settings.tmp / "haproxy")
    stack.haproxy_port = stack.haproxy_port or free_port()
    config = d / "haproxy.cfg"
    write_haproxy_config(settings, stack, config)
    run_checked(["haproxy", "-c", "-q", "-f", str(config)], "haproxy -c")
    stack.haproxy = procs.start("haproxy", ["haproxy", "-db", "-f", str(config)],
                                d / "haproxy.log", stop_signal=signal.SIGTERM)
    wait_until("haproxy", lambda: can_query(stack.haproxy_port), proc=stack.haproxy)


# ---------------------------------------------------------------- measuring


def process_ticks(pid, with_children=False):
    """utime+stime of a process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime of reaped children
    return ticks


def children_of(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def postgres_ticks(stack):
    """The postmaster, its live backends, and (cutime) the backends that exited."""
    pid = stack.postgres.pid
    return process_ticks(pid, with_children=True) + sum(process_ticks(k) for k in children_of(pid))


def busy_ticks():
    """All CPUs' non-idle time from /proc/stat: user nice system irq softirq steal."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq + steal


def open_files_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reachable_idle_clients(wanted):
    """A proxy holds two descriptors per client (client side, server side); beyond its
    open-files limit it cannot hold more, whatever its maxconn says."""
    cap = (open_files_limit() - 200) // 2 // 100 * 100
    return min(wanted, cap)


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class CpuSnapshot:
    at: float
    target: int
    bouncers: int
    ours: int
    busy: int
    children_s: float
    self_s: float
    segments: int
    switches: int
    machine_switches: int


def tcp_segments():
    """Segments the kernel has sent (all of loopback: every hop, ACKs included)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")]) if len(rows) >= 2 else 0


def cpu_snapshot(stack, target_proc):
    proxies = sum(process_ticks(p.pid) for p in (stack.pglb, stack.kernel, stack.haproxy) if p)
    bouncers = sum(process_ticks(p.pid) for _, p in stack.bouncers)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSnapshot(
        at=time.monotonic(), target=process_ticks(target_proc.pid), bouncers=bouncers,
        ours=proxies + bouncers + postgres_ticks(stack), busy=busy_ticks(),
        children_s=kids.ru_utime + kids.ru_stime, self_s=me.ru_utime + me.ru_stime,
        segments=tcp_segments(), switches=context_switches(target_proc.pid),
        machine_switches=machine_context_switches())


def machine_context_switches():
    """Context switches of the whole machine since boot (/proc/stat ctxt)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    return 0


def context_switches(pid):
    """Voluntary + involuntary context switches of every thread of a process."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if line.endswith("ctxt_switches:") or "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total


# ---------------------------------------------------------------- pgbench runs


@dataclass
class Run:
    round: int
    workload: str
    target: str
    tps: float = float("nan")
    txns: int = 0
    lat_avg_ms: float = float("nan")
    lat_p50_ms: float = float("nan")
    lat_p99_ms: float = float("nan")
    conn_ms: float = float("nan")
    rss_kib: float = float("nan")  # the proxy's largest VmRSS during the run
    target_cpu_us: float = float("nan")  # per transaction (= per connection under -C)
    bouncers_cpu_us: float = float("nan")
    noise_cores: float = float("nan")
    segments: float = float("nan")  # TCP segments sent on the machine per transaction
    switches: float = float("nan")  # the proxy's context switches per transaction
    # Every CPU's busy time per transaction (/proc/stat): pgbench, PostgreSQL, the
    # PgBouncers, the proxy, and kernel work wherever it ran (softirqs, kworkers): what
    # the kernel relay moves out of the proxy process shows here.
    machine_cpu_us: float = float("nan")
    machine_switches: float = float("nan")  # all context switches on the machine per txn
    error: str = ""


def pgbench_argv(settings, workload, port, log_prefix):
    return (["pgbench", "-n", "-M", "simple", "-j", str(workload.threads),
             "-T", str(settings.duration + workload.connect_s),
             "-h", "127.0.0.1", "-p", str(port), "-U", APP_USER,
             "--log", f"--log-prefix={log_prefix}"] + workload.pgbench_args + [APP_DB])


def parse_pgbench_output(text, run):
    def number(pattern):
        m = re.search(pattern, text, re.MULTILINE)
        return float(m.group(1)) if m else float("nan")
    run.tps = number(r"^tps = ([0-9.]+)")
    run.conn_ms = number(r"^average connection time = ([0-9.]+) ms")
    if run.conn_ms != run.conn_ms:
        # Without -C pgbench reports the time to open every client's connection.
        run.conn_ms = number(r"^initial connection time = ([0-9.]+) ms")
    processed = re.search(r"number of transactions actually processed: (\d+)", text)
    run.txns = int(processed.group(1)) if processed else 0
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if failed and int(failed.group(1)):
        run.error = f"{failed.group(1)} failed transactions"


def latencies_from_logs(log_dir):
    """Per-transaction latencies (µs), third column of pgbench's --log files."""
    values = []
    for path in log_dir.iterdir():
        with open(path) as f:
            for line in f:
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(int(parts[2]))
    return values


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def run_pgbench(settings, stack, workload, target, round_no):
    run = Run(round_no, workload.key, target)
    target_proc = stack.target_process(target)
    if target_proc.poll() is not None:
        run.error = f"{target} is not running (exit {target_proc.returncode})"
        return run
    log_dir = settings.tmp / "pgbench-logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir()
    argv = pgbench_argv(settings, workload, stack.target_port(target), log_dir / "txn")
    profiler = start_profile(settings, target, target_proc, workload, round_no)
    before = cpu_snapshot(stack, target_proc)
    rss = RssSampler(target_proc.pid)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, env=client_env(),
                                timeout=(settings.duration + workload.connect_s) * 4 + 180)
    except subprocess.TimeoutExpired:
        finish_profile(settings, profiler, 0)
        run.error = "pgbench did not finish in time (killed)"
        return run
    finally:
        after = cpu_snapshot(stack, target_proc)
        run.rss_kib = rss.stop()
    parse_pgbench_output(result.stdout, run)
    finish_profile(settings, profiler, run.txns)
    if result.returncode != 0 or run.tps != run.tps:
        tail = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines()
                or ["no output"])[-1]
        run.error = (run.error + "; " if run.error else "") + f"pgbench exit {result.returncode}: {tail}"
    latencies = sorted(latencies_from_logs(log_dir))
    shutil.rmtree(log_dir, ignore_errors=True)
    if latencies:
        run.lat_avg_ms = sum(latencies) / len(latencies) / 1000
        run.lat_p50_ms = percentile(latencies, 0.50) / 1000
        run.lat_p99_ms = percentile(latencies, 0.99) / 1000
    if run.txns:
        run.target_cpu_us = (after.target - before.target) / CLK_TCK / run.txns * 1e6
        run.bouncers_cpu_us = (after.bouncers - before.bouncers) / CLK_TCK / run.txns * 1e6
    wall = after.at - before.at
    ours = ((after.ours - before.ours) / CLK_TCK + (after.children_s - before.children_s)
            + (after.self_s - before.self_s))
    run.noise_cores = max(0.0, (after.busy - before.busy) / CLK_TCK - ours) / wall
    if run.txns:
        run.segments = (after.segments - before.segments) / run.txns
        run.switches = (after.switches - before.switches) / run.txns
        run.machine_cpu_us = (after.busy - before.busy) / CLK_TCK / run.txns * 1e6
        run.machine_switches = (after.machine_switches - before.machine_switches) / run.txns
    return run


class RssSampler:
    """The largest VmRSS of a process, sampled every 0.5 s on a thread until stop()."""

    def __init__(self, pid):
        self.pid, self.peak = pid, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, rss_kib(self.pid))
            if self.done.wait(0.5):
                return

    def stop(self):
        self.done.set()
        self.thread.join(5)
        return float(self.peak) if self.peak else float("nan")


def start_profile(settings, target, target_proc, workload, round_no):
    """BENCH_PERF=1: `perf record` the proxy (pglb or HAProxy) during its runs of the
    first round; the report (top symbols by self time, kernel included) goes beside the
    results. Software clock sampling: it works where hardware counters do not.
    BENCH_PERF=syscalls: `perf trace -s` instead, a count of every syscall per thread."""
    if not settings.perf or target == "direct" or round_no != 1 or not shutil.which("perf"):
        return None
    stem = f"perf-{workload.key}-{target}"
    if settings.perf == "syscalls":
        data = settings.tmp / f"{stem}.trace"
        argv = ["perf", "trace", "-s", "-p", str(target_proc.pid), "-o", str(data)]
        stem += "-syscalls"
    else:
        data = settings.tmp / f"{stem}.data"
        argv = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-g", "-p",
                str(target_proc.pid), "-o", str(data)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the first transaction
    return proc, data, settings.out.parent / f"{stem}.txt"


def finish_profile(settings, profiler, txns):
    if profiler is None:
        return
    proc, data, report = profiler
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    report.parent.mkdir(parents=True, exist_ok=True)
    if data.suffix == ".trace":
        report.write_text(syscall_summary(data.read_text(errors="replace"), txns))
        data.unlink(missing_ok=True)
        return
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--stdio", "-g", "none",
         "--percent-limit", "0.25", "--sort", "symbol"],
        capture_output=True, text=True)
    report.write_text("\n".join(line for line in out.stdout.splitlines()
                                if line and not line.startswith("#")) + "\n")
    data.unlink(missing_ok=True)


def syscall_summary(trace, txns):
    """Sums `perf trace -s` per-thread tables into calls per transaction by syscall."""
    calls = {}
    for line in trace.splitlines():
        m = re.match(r"\s+([a-z_0-9]+)\s+(\d+)\s+\d+\s+[\d.]+", line)
        if m and m.group(1) not in ("syscall",):
            calls[m.group(1)] = calls.get(m.group(1), 0) + int(m.group(2))
    total = sum(calls.values())
    lines = [f"transactions: {txns}", f"syscalls: {total} ({total / max(txns, 1):.2f} per txn)"]
    for name, n in sorted(calls.items(), key=lambda kv: -kv[1]):
        lines.append(f"{name:<20} {n:>10} {n / max(txns, 1):8.3f} per txn")
    return "\n".join(lines) + "\n"


def describe(run):
    text = (f"{run.workload:<12} {run.target:<8} tps={run.tps:9.1f} mcpu={run.machine_cpu_us:6.1f}us/txn avg={run.lat_avg_ms:7.3f}ms "
            f"p99={run.lat_p99_ms:7.3f}ms cpu={run.target_cpu_us:6.1f}us/txn "
            f"bouncers={run.bouncers_cpu_us:6.1f}us/txn segs={run.segments:5.1f}/txn "
            f"cs={run.switches:5.2f}/txn "
            f"noise={run.noise_cores:.2f} cores")
    return text + (f"  ERROR: {run.error}" if run.error else "")


def run_workloads(settings, stack):
    workloads = [w for w in workloads_list()
                 if not settings.workloads or w.key in settings.workloads
                 or (w.fleet and "fleet" in settings.workloads)
                 or (not w.fleet and "bursty" in settings.workloads)]
    runs = []
    for round_no in range(1, settings.rounds + 1):
        for workload in workloads:
            for target in round_order(round_no, settings.targets):
                run = run_pgbench(settings, stack, workload, target, round_no)
                log(f"round {round_no}/{settings.rounds} {describe(run)}")
                runs.append(run)
                if workload.writes:
                    settle_database(stack)
                time.sleep(0.5)
    return workloads, runs


def round_order(round_no, targets):
    """Targets rotated by round (A B C, B C A, C A B, ...): none always runs first after a
    change of workload or last before one."""
    shift = (round_no - 1) % len(targets)
    return targets[shift:] + targets[:shift]


# ---------------------------------------------------------------- idle clients (memory)


@dataclass
class MemoryResult:
    target: str
    rss_before_kib: int = 0
    points: list = field(default_factory=list)  # (wanted, held, rss_kib, note)


def measure_idle_memory(procs, settings, stack, target):
    """Restarts the proxy (fresh process), opens idle authenticated clients through it in
    steps, and reads its VmRSS before and at each step."""
    steps = [(wanted, reachable_idle_clients(wanted)) for wanted in settings.memory_counts]
    restart_proxy(procs, settings, stack, target)
    proc = stack.target_process(target)
    time.sleep(1)
    result = MemoryResult(target, rss_before_kib=rss_kib(proc.pid))
    holder = procs.start(
        "idle", [sys.executable, str(REPO / "bench/idle_clients.py"),
                 "--port", str(stack.target_port(target)), "--user", IDLE_USER,
                 "--password", IDLE_PASSWORD, "--database", APP_DB,
                 "--counts", ",".join(str(count) for _, count in steps)],
        settings.tmp / f"idle-{target}.log", as_service=False,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for wanted, count in steps:
            line = holder.stdout.readline().strip()
            if not line.startswith("HELD"):
                result.points.append((wanted, 0, 0, f"idle_clients.py: {line or 'exited'}"))
                break
            held = int(line.split()[1])
            errors = re.search(r"errors=(\d+) first_error=(.*)", line)
            note = f"{errors.group(1)} failed logins: {errors.group(2)}" if held < count else ""
            if count < wanted:
                note = (f"capped at {count:,}: open files limit {open_files_limit():,} (the hard "
                        "limit here, not raisable without CAP_SYS_RESOURCE), 2 per client. " + note)
            time.sleep(2)  # let the proxy settle (checks, buffers)
            result.points.append((wanted, held, rss_kib(proc.pid), note.strip()))
            log(f"memory {target}: {held} idle clients, RSS {result.points[-1][2]} KiB {note}")
            if held < count:
                break
            holder.stdin.write("next\n")
            holder.stdin.flush()
    finally:
        try:
            holder.stdin.write("quit\n")
            holder.stdin.close()
        except OSError:
            pass
        try:
            holder.wait(60)
        except subprocess.TimeoutExpired:
            pass
        procs.stop(holder)
    return result


def restart_proxy(procs, settings, stack, target):
    if target == "pglb":
        procs.stop(stack.pglb)
        start_pglb(procs, settings, stack)
    elif target == "kernel":
        procs.stop(stack.kernel)
        start_pglb(procs, settings, stack, relay="kernel")
    else:
        procs.stop(stack.haproxy)
        start_haproxy(procs, settings, stack)


# ---------------------------------------------------------------- report


def median(values):
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


def fmt(value, digits=1):
    return "-" if value != value else f"{value:,.{digits}f}"


def paired_ratio(runs, workload, attr, a="pglb", b="haproxy"):
    """a / b (pglb / HAProxy) per round (the two ran seconds apart), as "median (min-max)".
    Pairing within a round keeps slow drift of the machine out of the ratio; the range
    shows how far one round can stray."""
    by_round = {}
    for r in runs:
        if r.workload == workload.key and r.target in (a, b):
            by_round.setdefault(r.round, {})[r.target] = getattr(r, attr)
    ratios = [p[a] / p[b] for p in by_round.values()
              if len(p) == 2 and p[b]
              and not math.isnan(p[a]) and not math.isnan(p[b])]
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def fleet_table(workloads, runs):
    """Fleet-shaped workloads: many pgbench threads, the latency spread, the time to
    connect every client, and the proxy's memory while they run."""
    def med(workload, target, attr):
        return median([getattr(r, attr) for r in runs
                       if r.workload == workload.key and r.target == target])
    three = lambda w, attr, digits: " / ".join(fmt(med(w, t, attr), digits) for t in TARGETS)
    lines = [
        "| workload | TPS pglb / HAProxy / direct | TPS pglb/HAProxy (rounds) "
        "| CPU µs/txn pglb / HAProxy | CPU pglb/HAProxy (rounds) "
        "| lat p50 ms pglb / HAProxy / direct | lat p99 ms pglb / HAProxy / direct "
        "| connection ms pglb / HAProxy / direct | RSS MiB pglb / HAProxy |",
        "|---|---|---:|---|---:|---|---|---|---|",
    ]
    for w in workloads:
        cpu = " / ".join(fmt(med(w, t, "target_cpu_us")) for t in ("pglb", "haproxy"))
        rss = " / ".join(fmt(med(w, t, "rss_kib") / 1024) for t in ("pglb", "haproxy"))
        lines.append(
            f"| {w.label} | {three(w, 'tps', 1)} | {paired_ratio(runs, w, 'tps')} | {cpu} "
            f"| {paired_ratio(runs, w, 'target_cpu_us')} | {three(w, 'lat_p50_ms', 3)} "
            f"| {three(w, 'lat_p99_ms', 3)} | {three(w, 'conn_ms', 1)} | {rss} |")
    return "\n".join(lines)


def kernel_table(workloads, runs):
    """relay = "kernel" beside pglb's user-space relay and HAProxy: throughput, the whole
    machine's CPU and context switches per transaction (the relay's work now happens in
    the kernel, outside the proxy process), and the latency spread."""
    def med(workload, target, attr):
        return median([getattr(r, attr) for r in runs
                       if r.workload == workload.key and r.target == target])
    trio = ("kernel", "pglb", "haproxy")
    each = lambda w, attr, digits: " / ".join(fmt(med(w, t, attr), digits) for t in trio)
    lines = [
        "| workload | TPS kernel / pglb / HAProxy | TPS kernel/HAProxy (rounds) "
        "| machine CPU µs/txn kernel / pglb / HAProxy | machine CPU kernel/HAProxy (rounds) "
        "| proxy process CPU µs/txn kernel / pglb / HAProxy "
        "| context switches/txn, machine: kernel / pglb / HAProxy "
        "| lat p99 ms kernel / pglb / HAProxy |",
        "|---|---|---:|---|---:|---|---|---|",
    ]
    for w in workloads:
        lines.append(
            f"| {w.label} | {each(w, 'tps', 1)} | {paired_ratio(runs, w, 'tps', 'kernel')} "
            f"| {each(w, 'machine_cpu_us', 1)} "
            f"| {paired_ratio(runs, w, 'machine_cpu_us', 'kernel')} "
            f"| {each(w, 'target_cpu_us', 1)} | {each(w, 'machine_switches', 2)} "
            f"| {each(w, 'lat_p99_ms', 3)} |")
    return "\n".join(lines)


def summary_table(workloads, runs, settings):
    def med(workload, target, attr):
        return median([getattr(r, attr) for r in runs
                       if r.workload == workload.key and r.target == target])
    lines = [
        "| workload | TPS pglb | TPS HAProxy | TPS direct | TPS pglb/HAProxy (rounds) "
        "| lat avg ms pglb / HAProxy / direct | lat p99 ms pglb / HAProxy / direct "
        "| CPU µs/txn pglb | CPU µs/txn HAProxy | CPU pglb/HAProxy (rounds) "
        "| PgBouncer CPU µs/txn (direct) | noise, cores (max) |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in workloads:
        tps = {t: med(w, t, "tps") for t in TARGETS}
        cpu = {t: med(w, t, "target_cpu_us") for t in TARGETS}
        avg = " / ".join(fmt(med(w, t, "lat_avg_ms"), 3) for t in TARGETS)
        p99 = " / ".join(fmt(med(w, t, "lat_p99_ms"), 3) for t in TARGETS)
        noise = [r.noise_cores for r in runs if r.workload == w.key]
        label = w.label + (" (CPU per new connection)" if w.per_connection else "")
        lines.append(
            f"| {label} | {fmt(tps['pglb'])} | {fmt(tps['haproxy'])} | {fmt(tps['direct'])} "
            f"| {paired_ratio(runs, w, 'tps')} | {avg} | {p99} | {fmt(cpu['pglb'])} "
            f"| {fmt(cpu['haproxy'])} | {paired_ratio(runs, w, 'target_cpu_us')} "
            f"| {fmt(cpu['direct'])} | {fmt(median(noise), 2)} ({fmt(max(noise, default=float('nan')), 2)}) |")
    errors = [r for r in runs if r.error]
    notes = [f"- run with errors: round {r.round} {r.workload} {r.target}: {r.error}" for r in errors]
    connect = [w for w in workloads if w.per_connection]
    for w in connect:
        times = " / ".join(fmt(med(w, t, "conn_ms"), 3) for t in TARGETS)
        notes.append(f"- {w.label}: pgbench's average connection time, ms, pglb / HAProxy / "
                     f"direct: {times} (its latency columns exclude connecting)")
    return "\n".join(lines + ([""] + notes if notes else []))


def memory_table(results):
    if not results:
        return ""
    lines = ["| proxy | idle clients held | RSS before, KiB | RSS with clients, KiB "
             "| KiB per idle client | note |", "|---|---:|---:|---:|---:|---|"]
    for r in results:
        for wanted, held, rss, note in r.points:
            per = (rss - r.rss_before_kib) / held if held else float("nan")
            lines.append(f"| {TARGET_NAMES[r.target]} | {held:,} of {wanted:,} "
                         f"| {r.rss_before_kib:,} | {rss:,} | {fmt(per, 2)} | {note} |")
    return "\n".join(lines)


def runs_table(runs):
    lines = ["| round | workload | target | TPS | txns | lat avg ms | lat p99 ms "
             "| target CPU µs/txn | PgBouncers CPU µs/txn | TCP segments/txn "
             "| proxy context switches/txn | machine CPU µs/txn | machine context switches/txn "
             "| noise, cores | error |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        lines.append(f"| {r.round} | {r.workload} | {r.target} | {fmt(r.tps)} | {r.txns} "
                     f"| {fmt(r.lat_avg_ms, 3)} | {fmt(r.lat_p99_ms, 3)} | {fmt(r.target_cpu_us)} "
                     f"| {fmt(r.bouncers_cpu_us)} | {fmt(r.segments)} | {fmt(r.switches, 2)} "
                     f"| {fmt(r.machine_cpu_us)} | {fmt(r.machine_switches, 2)} "
                     f"| {fmt(r.noise_cores, 2)} "
                     f"| {r.error} |")
    return "\n".join(lines)


def versions(settings):
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"
    return ", ".join([first_line([str(settings.pglb_binary), "--version"]),
                      first_line(["haproxy", "-v"]).split(" - ")[0],
                      first_line([PGBOUNCER, "--version"]),
                      first_line([str(PG_BIN / "postgres"), "--version"])])


def method_notes(settings):
    return "\n".join([
        f"- {settings.rounds} round(s), each workload against pglb, HAProxy, PgBouncer direct in "
        "turn, the order rotated every round (pglb first, then HAProxy first, then direct "
        f"first, ...); medians over rounds. pgbench -n -M simple -T {settings.duration}, "
        "-j 2 in the first table, the -j named in the fleet table; "
        "scale 10. Autovacuum off; after every TPC-B run the database is vacuumed and "
        "checkpointed (outside the measured time), so every run starts from the same tables.",
        "- pglb/HAProxy columns: the ratio within each round (the two runs seconds apart), "
        "median over rounds, with the lowest and highest round in brackets: a range that "
        "straddles the target means the run cannot tell.",
        "- Topology: PostgreSQL 15 (fsync off) <- 3 PgBouncers (transaction pooling, pool 20, "
        "SCRAM) <- pglb / HAProxy (leastconn). Direct = one PgBouncer (so 20 server "
        "connections instead of 60).",
        f"- pglb: log_level \"{settings.pglb_log_level}\" (no per-session log line), "
        f"threads = {settings.threads}, tcp check 2s. HAProxy 2.6: nbthread {settings.threads}, "
        "no logging, pgsql-check user app.",
        "- Latency: per-transaction pgbench --log, p50/p99 = percentiles of all transactions. "
        "Connection ms: pgbench's initial connection time (every client connects at the "
        "start, each pgbench thread its own in turn). RSS: the proxy's largest VmRSS during the run (sampled every 0.5 s).",
        "- CPU µs/txn: utime+stime delta of the proxy process (all threads) / transactions. "
        "Direct column: the PgBouncer's own CPU (there is no proxy).",
        "- Kernel relay table: a second pglb, identical but for relay = \"kernel\" (run as "
        "root here; in production the systemd drop-in grants CAP_BPF and CAP_NET_ADMIN). Its "
        "relaying happens in softirq context and kernel workers, charged to whatever runs, "
        "so the comparison is by machine CPU: every CPU's busy time (/proc/stat) per "
        "transaction, pgbench and PostgreSQL included, the same for every target. Context "
        "switches likewise: the machine's (/proc/stat ctxt) per transaction.",
        "- noise: CPU-seconds per second used by processes other than PostgreSQL, the "
        "PgBouncers, the proxies, pgbench and this script (from /proc/stat), median (max) over "
        "that workload's runs.",
        "- -C row: TPS includes reconnecting; the latency columns do not include the client's "
        "own connect, but do include waiting behind other clients' connects (pgbench connects "
        "synchronously in its thread, and SCRAM costs ~4.5 ms of PgBouncer CPU per login).",
        "- Memory: each proxy restarted, then idle SCRAM-authenticated clients opened through it "
        "(bench/idle_clients.py); (VmRSS with clients - VmRSS before) / clients. They log in as "
        "user idle, whose userlist entry is a SCRAM secret (app's is plaintext), so logins are "
        "cheap; a proxy's memory does not depend on how PgBouncer stores the password.",
    ])


def write_report(settings, workloads, runs, memory, elapsed):
    bursty = [w for w in workloads if not w.fleet]
    fleet = [w for w in workloads if w.fleet]
    summary = summary_table(bursty, runs, settings) if bursty else ""
    errors = "\n".join(f"- run with errors: round {r.round} {r.workload} {r.target}: {r.error}"
                       for r in runs if r.error and any(w.key == r.workload for w in fleet))
    fleet_summary = (fleet_table(fleet, runs) + ("\n\n" + errors if errors else "")) if fleet else ""
    mem = memory_table(memory)
    kernel = kernel_table(workloads, runs) if "kernel" in settings.targets else ""
    print("\n" + summary + "\n")
    if kernel:
        print(kernel + "\n")
    if fleet_summary:
        print(fleet_summary + "\n")
    if mem:
        print(mem + "\n")
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    with open(settings.out, "w") as f:
        f.write(f"# pglb benchmark: pglb vs HAProxy vs PgBouncer direct\n\n"
                f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, "
                f"{'quick' if settings.quick else 'default'} settings, "
                f"{elapsed / 60:.1f} min. {versions(settings)}.\n\n"
                f"## Throughput, latency, CPU (medians), pgbench -j 2\n\n{summary}\n\n")
        if fleet_summary:
            f.write("## Fleet-shaped: many pgbench threads (medians)\n\n"
                    f"{fleet_summary}\n\n")
        if kernel:
            f.write('## Kernel relay: relay = "kernel" beside pglb and HAProxy (medians)\n\n'
                    f"{kernel}\n\n")
        if mem:
            f.write(f"## Memory per idle client\n\n{mem}\n\n")
        f.write(f"## Method\n\n{method_notes(settings)}\n\n## Every run\n\n{runs_table(runs)}\n")
    log(f"written {settings.out}")


# ---------------------------------------------------------------- main


def raise_on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench.py <temp dir>   (run bench/run.sh instead)")
    signal.signal(signal.SIGTERM, raise_on_signal)
    signal.signal(signal.SIGHUP, raise_on_signal)
    settings = Settings.from_env(sys.argv[1])
    make_service_dir(settings.tmp)
    started = time.monotonic()
    procs = Processes(settings.tmp)
    stack = Stack()
    try:
        log(f"open files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}; "
            f"{settings.rounds} round(s) x {settings.duration}s; temp dir {settings.tmp}")
        log("starting PostgreSQL 15 and pgbench -i -s 10")
        start_postgres(procs, settings, stack)
        log("starting 3 PgBouncers, pglb, HAProxy")
        start_pgbouncers(procs, settings, stack)
        start_pglb(procs, settings, stack)
        if "kernel" in settings.targets:
            start_pglb(procs, settings, stack, relay="kernel")
        start_haproxy(procs, settings, stack)
        workloads, runs = run_workloads(settings, stack)
        memory = []
        if settings.memory_counts:
            for target in [t for t in ("pglb", "kernel", "haproxy") if t in settings.targets]:
                memory.append(measure_idle_memory(procs, settings, stack, target))
        write_report(settings, workloads, runs, memory, time.monotonic() - started)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'Ctrl-C'}); stopping everything")
        sys.exit(130)
    except Exception:
        print_log_tails(settings.tmp)
        raise
    finally:
        procs.stop_all()
    log(f"done in {(time.monotonic() - started) / 60:.1f} min")


def print_log_tails(tmp, lines=8):
    """On failure: the end of every server's log, before the temp dir goes away."""
    for path in sorted(tmp.rglob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            print(f"--- {path.relative_to(tmp)} (last {len(tail)} lines)", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)


if __name__ == "__main__":
    main()
