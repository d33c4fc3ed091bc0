#!/usr/bin/env bash
# Benchmark: pglb vs HAProxy vs one PgBouncer directly, on loopback (127.0.0.1 only).
#
#   bash bench/run.sh                 # default: 5 rounds x 9 s runs, memory at 2,000 and 12,000 clients (~35 min)
#   BENCH_QUICK=1 bash bench/run.sh   # smoke run, ~2 min: 1 round x 5 s, memory at 2,000 clients
#
# Sets up PostgreSQL 15, three PgBouncers, pglb and HAProxy in a temporary directory (as
# the postgres user when run as root), runs pgbench through each, prints a markdown table
# of medians and writes it, with every single run, to bench/results/latest.md.
# Everything started is stopped by pid on exit (also on failure or Ctrl-C) and the
# temporary directory removed.
#
# Environment:
#   BENCH_QUICK=1             quick smoke settings (below are the defaults they change)
#   BENCH_ROUNDS=N            rounds of every workload x target (default 5, quick 1)
#   BENCH_DURATION=S          pgbench -T seconds per run (default 9, quick 5)
#   BENCH_MEMORY_CLIENTS=a,b  idle-client counts for the memory table (default 2000,12000,
#                             quick 2000; 0 skips it)
#   BENCH_WORKLOADS=k,...     only these: select-c8 select-c64 select-c256 tpcb-c32 connect-c16
#                             (pgbench -j 2), fleet-select-c256 fleet-select-c1000
#                             fleet-select-c<N> fleet-tpcb-c256 (-j 50-100; N = 8000 under a
#                             20,000-descriptor limit, 10500 where it allows); "bursty" or
#                             "fleet" name a whole group
#   BENCH_PGLB=path           use this pglb binary instead of building target/release/pglb
#   BENCH_PGLB_LOG_LEVEL=lvl  pglb log_level (default warn: no per-session line, like HAProxy here)
#   BENCH_TARGETS=a,b         targets, of pglb kernel haproxy direct (default all; kernel =
#                             a pglb with relay = "kernel", started as root)
#   BENCH_THREADS=N           pglb threads and HAProxy nbthread (default 2, one per core here)
#   BENCH_OUT=path            where to write the report (default bench/results/latest.md)
#   BENCH_PERF=1              perf-record the proxies in round 1; top symbols to
#                             bench/results/perf-<workload>-<proxy>.txt
#   BENCH_PERF=syscalls       instead count the proxies' syscalls per transaction (perf trace -s)
#                             to bench/results/perf-<workload>-<proxy>-syscalls.txt
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/apt-deps.sh
if [ -z "${BENCH_PGLB:-}" ]; then
  cargo build --release --locked
fi

# 12,000 idle clients need ~24,000 descriptors in the proxy and 12,000 in the client;
# the limit is inherited by everything started below (PgBouncers included).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

tmp=$(mktemp -d /tmp/pglb-bench.XXXXXX)
cleanup() {
  # bench.py stops what it started; this catches leftovers if it could not (killed).
  if [ -f "$tmp/pids" ]; then
    while read -r pid comm; do
      if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        sleep 1
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] && kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$tmp/pids"
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 bench/bench.py "$tmp"
