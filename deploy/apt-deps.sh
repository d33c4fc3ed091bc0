#!/usr/bin/env bash
# Installs, through apt, the Debian 12 packages that pglb's tests and demo run for real:
# PostgreSQL 15 (server and client tools, pgbench), PgBouncer, Chromium (dashboard test);
# for tests/deploy_*.rs: keepalived (--config-test), ruby (ruby -c Vagrantfile),
# python3-yaml (docker-compose.yml), systemd (systemd-analyze security); for
# tests/failover_*.rs: keepalived, curl, iproute2 (ip netns); cargo-deb, cargo-nextest
# and cargo-deny (the Debian package, the test runner, the supply chain) from crates.io;
# psycopg 3 with the libpq 18 its wheel bundles (tests/modern_cancel.rs: libpq 17+'s
# cancel API), from PyPI.
# haproxy and linux-perf are for bench/ (the comparison and profiles).
# `--demo` installs only what deploy/demo.sh needs.
# Packages already installed are skipped, so this is cheap to run every time.
set -euo pipefail
# clang and libbpf-dev build the kernel relay's BPF program (build.rs; without them the
# build works and relay = "kernel" is unavailable); src/kernel_relay's tests need it.
packages=(postgresql-15 postgresql-client-15 pgbouncer clang libbpf-dev)
if [ "${1:-}" != "--demo" ]; then
  # socat, hatop, tmux: tests/runtime_api.rs drives the stats socket with them;
  # prometheus (its promtool) lints /metrics; haproxy is also the CSV reference.
  packages+=(chromium keepalived ruby python3-yaml systemd haproxy linux-perf curl iproute2
    socat hatop tmux prometheus)
  # cargo-deb builds the .deb (tests/deploy_debian.rs); compiled from crates.io, ~1.5 min once.
  if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing: cargo-deb"
    cargo install cargo-deb --locked --quiet
  fi
  # cargo-nextest runs the suite (tests/run.sh): its test groups keep the network-namespace
  # labs one at a time, which plain `cargo test` cannot.
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing: cargo-nextest"
    cargo install cargo-nextest --locked --quiet
  fi
  # cargo-deny checks advisories, licenses, bans and sources (tests/supply-chain.sh).
  if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing: cargo-deny"
    cargo install cargo-deny --locked --quiet
  fi
  if ! python3 -c 'import psycopg' >/dev/null 2>&1; then
    echo "installing: psycopg[binary] (PyPI)"
    python3 -m pip install --quiet --root-user-action=ignore 'psycopg[binary]==3.3.9'
  fi
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
# Debian's packages start their own services on 5432/6432; the tests use other ports.
# keepalived does not start: its unit needs a non-empty /etc/keepalived/keepalived.conf.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
