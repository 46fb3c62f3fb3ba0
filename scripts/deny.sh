#!/usr/bin/env bash
# Dependency policy check: advisories, licenses, bans, sources (see deny.toml).
#
# Runs fully offline against a RustSec advisory-db snapshot: the one kept in
# .ci/advisory-db, or the folder ADVISORY_DB_SRC names. Exits non-zero on any
# cargo-deny error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The advisory-db folder name cargo-deny 0.20 opens under db-path: the suffix is
# the hash of the default database URL (db-urls is left unset in deny.toml).
DENY_SERIES="0.20"
DB_DIR="$ROOT/target/advisory-dbs/advisory-db-3157b0e258782691"
DB_SRC="${ADVISORY_DB_SRC:-$ROOT/.ci/advisory-db}"
# cargo-deny rejects a database whose last commit is older than 90 days;
# re-create ours well before that.
DB_MAX_AGE_DAYS=30

install_cargo_deny() {
    local version=""
    if command -v cargo-deny >/dev/null 2>&1; then
        version="$(cargo deny --version | awk '{print $2}')"
    fi
    case "$version" in
        "$DENY_SERIES".*) return 0 ;;
        "") echo "==> cargo-deny not found; installing cargo-deny $DENY_SERIES.x (takes a few minutes)" ;;
        *) echo "==> cargo-deny $version found, but the offline setup needs $DENY_SERIES.x; installing it" ;;
    esac
    cargo install cargo-deny --locked --force --version "~$DENY_SERIES"
}

# Fingerprint of the snapshot (paths, sizes, mtimes); stored as the commit
# message of the prepared copy, so a changed snapshot is copied again.
snapshot_fingerprint() {
    (cd "$DB_SRC" && find crates -type f -printf '%P %s %T@\n' | LC_ALL=C sort | sha256sum | cut -c1-16)
}

prepare_advisory_db() {
    command -v git >/dev/null 2>&1 || { echo "error: git is required (apt-get install git)" >&2; exit 1; }

    local want="" have="" head_time=0
    if [ -d "$DB_SRC/crates" ]; then
        want="advisory-db snapshot $(snapshot_fingerprint)"
    fi
    # Check for .git first: otherwise git would find the enclosing repository.
    if [ -d "$DB_DIR/.git" ] && [ -d "$DB_DIR/crates" ]; then
        have="$(git -C "$DB_DIR" log -1 --format=%s 2>/dev/null || true)"
        head_time="$(git -C "$DB_DIR" log -1 --format=%ct 2>/dev/null || echo 0)"
    fi
    local age_days=$(( ($(date +%s) - head_time) / 86400 ))

    # Cheap path: a committed copy of the same snapshot, recent enough.
    if [ -n "$have" ] && [ "$age_days" -lt "$DB_MAX_AGE_DAYS" ] \
        && { [ -z "$want" ] || [ "$have" = "$want" ]; }; then
        echo "==> advisory db: using $DB_DIR"
        return 0
    fi

    if [ -z "$want" ]; then
        echo "error: advisory-db snapshot not found at $DB_SRC/crates (set ADVISORY_DB_SRC)" >&2
        exit 1
    fi
    echo "==> advisory db: preparing $DB_DIR from $DB_SRC"
    rm -rf "$DB_DIR"
    mkdir -p "$DB_DIR"
    cp -R "$DB_SRC/crates" "$DB_DIR/crates"
    git -C "$DB_DIR" init -q
    git -C "$DB_DIR" add -A
    git -C "$DB_DIR" -c user.name="postbox ci" -c user.email="ci@postbox.invalid" \
        -c commit.gpgsign=false commit -q -m "$want"
}

install_cargo_deny
prepare_advisory_db

# cargo-deny runs `cargo metadata --offline`, which needs the sources of every
# crate in Cargo.lock (all platforms) in the local cargo cache.
echo "==> cargo fetch"
cargo fetch

echo "==> cargo deny --offline --workspace check"
# --offline must come before `check`: without it cargo-deny tries to fetch the
# database and resets the local copy. --workspace: the root Cargo.toml is also
# the `postbox` package, and without it cargo-deny would use only that package
# as the graph root (postbox-bench and its dependencies would go unchecked).
cargo deny --offline --workspace check
