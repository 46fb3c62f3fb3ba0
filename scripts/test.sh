#!/usr/bin/env bash
# The project's single test command.
#
#   bash scripts/test.sh
#
# Runs every test step even if an earlier one fails, then prints the failed
# steps (if any) and, as the last line, `N passed, N failed` summed over every
# `test result:` line cargo test printed. Exits non-zero if any step failed.
# The full output is also written to target/test-logs/test.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The facade features whose examples and doc tests run here (each adapter adds
# itself when it lands). `.ci/run` lints with the same set.
FEATURES="postbox/memory,postbox/postgres,postbox/sqs,postbox/rabbitmq,postbox/kafka"
if [ "${1:-}" = "--print-features" ]; then
    echo "$FEATURES"
    exit 0
fi

LOG_DIR="$ROOT/target/test-logs"
LOG="$LOG_DIR/test.log"
QUICKSTART_TIMEOUT="${QUICKSTART_TIMEOUT:-300}" # seconds, build included

mkdir -p "$LOG_DIR"
: >"$LOG"

FAILED_STEPS=()

# Bring the brokers up and export the addresses the tests read.
#
# With a Docker engine that answers: `docker compose up --wait` (the
# docker-compose.yml brokers, same ports and credentials). Otherwise natively:
# `scripts/brokers.sh up` installs what is missing and starts RabbitMQ, a
# Kafka-protocol broker, an SQS/SNS emulator and PostgreSQL on loopback.
# Either way the tests then require every broker (POSTBOX_REQUIRE_BROKERS=1):
# one that is unreachable fails its tests, it is never skipped. A broker that
# does not come up fails this script before any test runs.
# POSTBOX_SKIP_BROKERS=1 runs without bringing brokers up (broker tests then
# fail, unless brokers are already running).
brokers_up() {
    if [ "${POSTBOX_SKIP_BROKERS:-0}" = "1" ]; then
        echo "==> brokers: not started (POSTBOX_SKIP_BROKERS=1)" | tee -a "$LOG"
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        echo "==> brokers: docker compose up --wait" | tee -a "$LOG"
        if ! docker compose up --detach --wait 2>&1 | tee -a "$LOG"; then
            echo "FAILED: brokers (docker compose up)"
            exit 1
        fi
    else
        echo "==> brokers: scripts/brokers.sh up (no Docker engine here)" | tee -a "$LOG"
        if ! bash scripts/brokers.sh up 2>&1 | tee -a "$LOG"; then
            echo "FAILED: brokers (scripts/brokers.sh up); see the log tail above"
            exit 1
        fi
    fi
    eval "$(bash scripts/brokers.sh env)"
    export POSTBOX_REQUIRE_BROKERS=1
    echo "==> brokers: exported $(bash scripts/brokers.sh env | sed -n 's/^export \([A-Z_]*\)=.*/\1/p' | tr '\n' ' ')" | tee -a "$LOG"
}

# run_step NAME COMMAND...: runs COMMAND, showing and logging its output; a
# failure is recorded and the script carries on with the next step.
run_step() {
    local name="$1"
    shift
    echo "==> $name: $*" | tee -a "$LOG"
    if "$@" 2>&1 | tee -a "$LOG"; then
        echo "==> $name: ok" | tee -a "$LOG"
    else
        echo "==> $name: FAILED" | tee -a "$LOG"
        FAILED_STEPS+=("$name")
    fi
}

brokers_up

# --no-fail-fast: run every test binary even after one fails, so the summary
# counts everything.
run_step "unit and integration tests" cargo test --workspace --all-targets --features "$FEATURES" --no-fail-fast
run_step "doc tests" cargo test --workspace --doc --features "$FEATURES" --no-fail-fast
run_step "quickstart example" timeout "$QUICKSTART_TIMEOUT" cargo run --features "$FEATURES" --example quickstart
# The same service on every broker: only the URL changes.
for url in "memory://" "${POSTBOX_KAFKA_URL:-}" "${POSTBOX_AMQP_URL:-}" "${POSTBOX_SQS_URL:-}"; do
    if [ -z "$url" ]; then
        echo "==> any_broker example: a broker URL is missing from scripts/brokers.sh env" | tee -a "$LOG"
        FAILED_STEPS+=("any_broker example (missing URL)")
        continue
    fi
    run_step "any_broker example on ${url%%://*}://" env POSTBOX_URL="$url" \
        timeout "$QUICKSTART_TIMEOUT" cargo run --features "$FEATURES" --example any_broker
done

# Sum "test result: ok. 12 passed; 0 failed; ..." (or "FAILED.") lines.
read -r passed failed < <(
    awk '/test result:/ {
            for (i = 1; i < NF; i++) {
                if ($(i + 1) ~ /^passed;/) p += $i
                if ($(i + 1) ~ /^failed;/) f += $i
            }
        }
        END { print p + 0, f + 0 }' "$LOG"
)

echo
echo "full log: $LOG"
for step in "${FAILED_STEPS[@]}"; do
    echo "FAILED: $step"
done
echo "$passed passed, $failed failed"

if [ "${#FAILED_STEPS[@]}" -gt 0 ] || [ "$failed" -gt 0 ]; then
    exit 1
fi
