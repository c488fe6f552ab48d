#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Works on a fresh machine with
# the Rust toolchain; installs anything else it needs itself.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --all-targets --locked -- -D warnings

step "build"
cargo build --all-targets --locked

step "tests (unit, integration over real sockets and processes, property, crash)"
cargo test --locked --all-targets -- --test-threads 2
