#!/usr/bin/env bash
# Benchmark harness (prints figures; see bench/run.py). Builds the release binary in its own
# target directory, prepares a Python environment with the official client, tpchgen-cli and
# matplotlib, and the peers (DuckDB, PySpark with Java 17), then runs bench/run.py with the given arguments (e.g. --scales 1 10).
set -euo pipefail
cd "$(dirname "$0")/.."
polars-source/fetch.sh
export CARGO_TARGET_DIR="${POLARS_NODE_RELEASE_TARGET:-$HOME/.cache/polars-node/target-release}"
# The CPU level the client's Polars wheel is built for (AVX2 and friends, CPUs since 2013), so
# both sides run the same machine code; POLARS_NODE_TARGET_CPU=x86-64 builds for any x86-64.
export RUSTFLAGS="${RUSTFLAGS:-} -C target-cpu=${POLARS_NODE_TARGET_CPU:-x86-64-v3}"
cargo build --release --locked
venv="${POLARS_NODE_CACHE:-$HOME/.cache/polars-node}/venv-bench"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check polars-cloud==0.12.0 tpchgen-cli==4.0.0 matplotlib \
  duckdb==2.0.1 pyspark==4.0.5
# Spark (a peer in the run) needs a Java runtime: 17 from Debian.
command -v java >/dev/null || { apt-get update -q && apt-get install -y -q openjdk-17-jre-headless; }
POLARS_NODE_BIN="$CARGO_TARGET_DIR/release/polars-node" exec "$venv/bin/python" bench/run.py "$@"
