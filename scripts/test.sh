#!/usr/bin/env bash
# The whole test suite: lint, Rust unit and integration tests, then the Python suite against an
# installed build. Installs what it needs (Python packages from PyPI, crates from crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --upgrade pip
python3 -m pip install --quiet '.[test]'

cargo fmt --check
cargo clippy --no-default-features --all-targets --quiet -- -D warnings
python3 -m ruff check python tests scripts benches

cargo test --release --no-default-features --quiet
python3 -m pytest -q
