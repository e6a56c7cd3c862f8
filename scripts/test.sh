#!/usr/bin/env bash
# The test command of ferrite: prepares the machine (scripts/setup.sh), then runs every
# test of the workspace in release mode (one ggml build shared by demo, tests and benches).
# Extra arguments go to `cargo test`, e.g.  scripts/test.sh -p gguf  or  scripts/test.sh NAME -- --nocapture
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh

# Tests that compare with the PyPI gguf package run `$FERRITE_PYTHON tests/py/gguf_ref.py ...`.
export FERRITE_PYTHON="$root/.venv/bin/python"

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "test: error: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }

exec cargo test --release --workspace "$@"
