#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Works on a fresh machine with
# the Rust toolchain; installs or starts anything else it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --all-targets --locked -- -D warnings

step "build"
cargo build --all-targets --locked

step "PostgreSQL for the backend tests"
KNUTEPUNKT_TEST_PG=$(./scripts/pg-test-server.sh)
export KNUTEPUNKT_TEST_PG
echo "using: $KNUTEPUNKT_TEST_PG"
drop_test_databases() {
  psql "$KNUTEPUNKT_TEST_PG dbname=test" -Atqc \
    "select datname from pg_database where datname like 'kp_t_%'" |
    while read -r db; do psql "$KNUTEPUNKT_TEST_PG dbname=test" -qc "drop database if exists $db" || true; done
}
drop_test_databases
trap drop_test_databases EXIT

step "Chromium and playwright-core for the console browser test (tests/console.rs)"
./tests/browser/setup.sh

step "the pinned FHIR R4 validator (npm ci in conformance-tests/; tests/subscriptions.rs uses it)"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq nodejs npm
fi
(cd conformance-tests && npm ci --no-audit --no-fund --prefer-offline)
# Without this the subscriptions validation test would skip instead of failing.
export KNUTEPUNKT_REQUIRE_VALIDATOR=1

step "tests on the embedded store (unit, integration over real sockets and processes, property, crash)"
cargo test --locked --all-targets -- --test-threads 2

step "independent FHIR R4 validation of every golden output (@medplum/core, pinned)"
./conformance-tests/run-validator.sh

step "memory stays flat under a 200k backlog (release build: debug is too slow for 200k events)"
cargo test --locked --release --test memory -- --nocapture

step "the storage suites again on PostgreSQL"
KNUTEPUNKT_TEST_STORAGE=postgres cargo test --locked \
  --test ingest --test delivery --test crash --test journal_model --test lifecycle --test devices \
  --test metrics --test audit_chain --test escalation --test deactivation --test no_contact \
  --test subscriptions --test hostile --test auth --test outbound_auth --test adapters \
  --test journal_batches \
  -- --test-threads 2
