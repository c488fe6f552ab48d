#!/usr/bin/env bash
# Loopback benchmark of the release binary (see BENCHMARKS.md): builds the gateway and the bench
# in release mode, then runs `knutepunkt-bench` with its defaults. Extra arguments are passed on,
# e.g. `scripts/bench.sh -c 128 -d 20` or `scripts/bench.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bins
target_dir="${CARGO_TARGET_DIR:-target}"

echo "==> $(nproc) CPUs, $(free -h | awk '/^Mem:/ {print $2}') memory; uptime: $(uptime)"
exec "$target_dir/release/knutepunkt-bench" --gateway "$target_dir/release/knutepunkt" "$@"
