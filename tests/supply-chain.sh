#!/usr/bin/env bash
# Supply chain: `cargo deny check` (advisories, bans, licenses, sources; see deny.toml).
# Run by tests/run.sh. The RustSec advisory database is taken, in this order, from:
#   1. the full offline snapshot beside the project (../shared/advisory-db on this
#      project's machines);
#   2. GitHub (`cargo deny fetch db`), where the machine can reach it;
#   3. tests/advisory-db/, the advisories of every crate in Cargo.lock cut from a snapshot
#      and kept in the repository, so a fresh clone with no network is still checked.
#      If Cargo.lock names a crate that cut was not made for, the check fails: refresh it
#      with `bash tests/supply-chain.sh refresh` where a full snapshot is available.
# The output says which database was used and how old it is.
set -euo pipefail
cd "$(dirname "$0")/.."
snapshot=../shared/advisory-db
vendored=tests/advisory-db
# cargo-deny keeps a database in a git checkout named after its URL.
db=target/advisory-dbs/advisory-db-3157b0e258782691

lock_crates() {
  sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u
}

# The snapshot's date (its SNAPSHOT.md names it), else today's.
snapshot_date() {
  local d
  d=$(grep -o '[0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\}' "$1/SNAPSHOT.md" 2>/dev/null | head -n 1 || true)
  echo "${d:-$(date -u +%F)}"
}

# Cut tests/advisory-db from the full snapshot: the advisories of the crates in
# Cargo.lock and of the standard library, and the list of crates the cut covers.
refresh() {
  [ -d "$snapshot/crates" ] || { echo "refresh: no snapshot at $snapshot" >&2; exit 2; }
  local date
  date=$(snapshot_date "$snapshot")
  rm -rf "$vendored"
  mkdir -p "$vendored/crates"
  cp -r "$snapshot/rust" "$vendored/rust"
  local c
  for c in $(lock_crates); do
    if [ -d "$snapshot/crates/$c" ]; then cp -r "$snapshot/crates/$c" "$vendored/crates/$c"; fi
  done
  lock_crates >"$vendored/covers.txt"
  cat >"$vendored/SNAPSHOT.md" <<EOF
# Advisories for this project's crates

Cut on $(date -u +%F) by \`bash tests/supply-chain.sh refresh\` from a full copy of the
RustSec advisory database (github.com/rustsec/advisory-db, CC0-1.0) dated $date: the
advisories of every crate listed in covers.txt (the crates of Cargo.lock then) and of
the standard library. tests/supply-chain.sh uses it only when neither a full snapshot
nor the network is reachable.
EOF
  echo "refresh: $(ls "$vendored/crates" | wc -l) crates with advisories, $(wc -l <"$vendored/covers.txt") covered, database of $date"
}

# Make $1 (plain files) the git checkout cargo-deny reads, committed on the date $2
# (cargo-deny reports the database's age from the commit), and check against it.
check_with() {
  rm -rf "$db"
  mkdir -p "$(dirname "$db")"
  cp -r "$1" "$db"
  chmod -R u+w "$db"
  (
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="$2T00:00:00Z" GIT_COMMITTER_DATE="$2T00:00:00Z" \
      git -c user.name=snapshot -c user.email=snapshot@localhost commit -q -m "advisory-db snapshot"
  )
  cargo deny --offline check advisories
}

if [ "${1:-}" = refresh ]; then
  refresh
  exit 0
fi

# cargo-deny reads the metadata of every platform's crates: have them all downloaded.
cargo fetch --locked --quiet
cargo deny check bans licenses sources
if [ -d "$snapshot/crates" ]; then
  date=$(snapshot_date "$snapshot")
  echo "advisories: checked against the offline snapshot $snapshot (files as of $date)"
  check_with "$snapshot" "$date"
elif timeout 300 cargo deny fetch db >/dev/null 2>&1; then
  echo "advisories: checked against the RustSec database fetched from GitHub"
  cargo deny check advisories
else
  uncovered=$(lock_crates | comm -23 - "$vendored/covers.txt")
  if [ -n "$uncovered" ]; then
    echo "advisories: $vendored was cut for an older Cargo.lock; not covered:" $uncovered >&2
    echo "  run 'bash tests/supply-chain.sh refresh' where a full snapshot is available" >&2
    exit 1
  fi
  date=$(grep -o 'dated [0-9-]*' "$vendored/SNAPSHOT.md" | cut -d' ' -f2)
  echo "advisories: checked against $vendored (every crate of Cargo.lock; database of $date)"
  check_with "$vendored" "$date"
fi
