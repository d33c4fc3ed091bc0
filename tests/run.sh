#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs the system packages the tests need,
# checks formatting, lints and the supply chain (cargo deny), then runs every unit and
# integration test (real PostgreSQL, PgBouncers and clients on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/apt-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
bash tests/supply-chain.sh
# deploy/apt-deps.sh installed cargo-nextest where it was missing.
cargo nextest run --locked --no-fail-fast
