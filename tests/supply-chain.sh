#!/usr/bin/env bash
# Supply chain: `cargo deny check` (advisories, bans, licenses, sources; see deny.toml).
# The RustSec advisory database comes from the offline snapshot beside the project when
# there is one (../shared/advisory-db on this project's machines), else it is fetched
# from GitHub; the output says which. Run by tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
snapshot=../shared/advisory-db
# cargo-deny keeps a database in a git checkout named after its URL.
db=target/advisory-dbs/advisory-db-3157b0e258782691
# cargo-deny reads the metadata of every platform's crates: have them all downloaded.
cargo fetch --locked --quiet
cargo deny check bans licenses sources
if [ -d "$snapshot/crates" ]; then
  # The snapshot is plain files: make it the git checkout cargo-deny reads, dated as its
  # SNAPSHOT.md says (cargo-deny reports the database's age from the commit).
  newest=$(grep -o '[0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\}' "$snapshot/SNAPSHOT.md" 2>/dev/null | head -n 1 || true)
  newest=${newest:-$(date -u +%F)}
  rm -rf "$db"
  mkdir -p "$(dirname "$db")"
  cp -r "$snapshot" "$db"
  chmod -R u+w "$db"
  (
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="${newest}T00:00:00Z" GIT_COMMITTER_DATE="${newest}T00:00:00Z" \
      git -c user.name=snapshot -c user.email=snapshot@localhost commit -q -m "advisory-db snapshot"
  )
  echo "advisories: checked against the offline snapshot $snapshot (files as of $newest)"
  cargo deny --offline check advisories
elif timeout 300 cargo deny fetch db >/dev/null 2>&1; then
  echo "advisories: checked against the RustSec database fetched from GitHub"
  cargo deny check advisories
else
  echo "advisories: NOT CHECKED: no snapshot at $snapshot and the database could not be fetched"
fi
