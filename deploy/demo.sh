#!/usr/bin/env bash
# Local demo: builds pglb, sets up PostgreSQL 15 and three PgBouncers on loopback (in
# temporary directories, stopped on Ctrl-C) and runs pglb in front of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/apt-deps.sh --demo
cargo build --release --locked
exec cargo run --release --locked --example demo -- "$PWD/target/release/pglb"
