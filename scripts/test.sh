#!/usr/bin/env bash
# The whole test suite: lint, Rust unit and integration tests (including the Metal kernels on the
# MSL emulator, in both fiber orders), the Metal backend type-check, then the Python suite against
# an installed build. Installs what it needs (Python packages from PyPI, crates from crates.io).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n== %s\n' "$*"; }

step "install the package and the test dependencies"
python3 -m pip install --quiet --upgrade pip
# The wheel includes the MSL emulator backend so the op and model tests also run on `metal-emu`.
MATURIN_PEP517_ARGS="--features metal-emu" python3 -m pip install --quiet '.[test]'

step "lint"
cargo fmt --check
cargo clippy --quiet --no-default-features --features metal-emu --all-targets -- -D warnings
cargo clippy --quiet --lib -- -D warnings
cargo check --quiet --no-default-features --features metal
python3 -m ruff check python tests scripts benches

step "Rust tests"
cargo test --quiet --release --no-default-features --features metal-emu
MOEFLUX_EMU_SCHED=reverse cargo test --quiet --release --no-default-features --features metal-emu \
    --test emu_harness

step "Python tests"
# The references must be present here: without them the model and quantizer tests would only skip.
python3 -c "import mlx.core, mlx_lm; import moeflux; moeflux.Backend('metal-emu')"
python3 -m pytest -q
