#!/usr/bin/env bash
# CI: `scripts/brokers.sh up` from a fresh clone in a directory no other user can
# enter (like a clone in root's home, mode 0700). PostgreSQL runs as the OS user
# postgres, which cannot reach into such a checkout; brokers.sh must keep its
# cluster elsewhere and still come up.
#
# The clone runs `up` for every broker. One already answering on its fixed port
# (the main checkout's, after the test step) is reused and left alone, exactly as
# `up` does for any second checkout. PostgreSQL gets a free port of its own
# (POSTBOX_PG_PORT), so the clone initialises, starts, checks and stops a
# cluster of its own without touching the main checkout's. Everything the clone
# started is stopped and its files removed on exit, pass or fail.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
unset POSTBOX_PG_DIR POSTBOX_BROKERS # test the defaults

say() { echo "clone-check: $*"; }
fail() {
    echo "clone-check: FAILED: $*" >&2
    exit 1
}

# A port nothing listens on, for the clone's PostgreSQL.
free_port() {
    local p
    for ((p = 55432; p < 55532; p++)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

PARENT=$(mktemp -d /tmp/postbox-0700.XXXXXX)
chmod 0700 "$PARENT"
CLONE="$PARENT/postbox"
POSTBOX_PG_PORT=$(free_port) || fail "no free port in 127.0.0.1:55432-55531"
export POSTBOX_PG_PORT

brokers() { (cd "$CLONE" && bash scripts/brokers.sh "$@"); }

cleanup() {
    local rc=$? pg_dir=""
    if [[ -d "$CLONE/.state" ]]; then
        pg_dir=$(cat "$CLONE/.state/brokers/postgres.dir" 2>/dev/null || true)
        say "cleanup: scripts/brokers.sh down (stops only what the clone started)"
        brokers down || rc=1
        # the clone's cluster directory, /var/lib/postbox-brokers/<hash>/postgres
        if [[ "$pg_dir" == /var/lib/postbox-brokers/*/postgres ]]; then
            rm -rf "$(dirname "$pg_dir")"
        fi
    fi
    rm -rf "$PARENT"
    exit "$rc"
}
trap cleanup EXIT

say "git clone --no-hardlinks $ROOT $CLONE (parent mode $(stat -c %a "$PARENT"))"
git clone --quiet --no-hardlinks "$ROOT" "$CLONE"
if runuser -u nobody -- test -x "$CLONE" 2>/dev/null; then
    fail "user nobody can enter $CLONE: the parent directory does not keep other users out"
fi

say "scripts/brokers.sh up (PostgreSQL on 127.0.0.1:$POSTBOX_PG_PORT)"
brokers up || fail "scripts/brokers.sh up in a clone under a 0700 directory"

say "scripts/brokers.sh status of the clone's PostgreSQL"
POSTBOX_BROKERS=postgres brokers status || fail "the clone's PostgreSQL is not up"

pg_dir=$(cat "$CLONE/.state/brokers/postgres.dir")
[[ "$pg_dir" != "$CLONE"/* ]] || fail "the PostgreSQL cluster is inside the checkout ($pg_dir)"
say "cluster in $pg_dir ($(stat -c '%U %a' "$pg_dir/data") for the data directory)"

say "scripts/brokers.sh up again (idempotent)"
brokers up || fail "a second scripts/brokers.sh up"

say "ok"
