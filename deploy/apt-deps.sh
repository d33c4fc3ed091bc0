#!/usr/bin/env bash
# Installs, through apt, the Debian 12 packages that pglb's tests and demo run for real:
# PostgreSQL 15 (server and client tools, pgbench), PgBouncer, Chromium (dashboard test).
# Packages already installed are skipped, so this is cheap to run every time.
set -euo pipefail
packages=(postgresql-15 postgresql-client-15 pgbouncer chromium)
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
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
