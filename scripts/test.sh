#!/usr/bin/env bash
# Install what is missing, check formatting, lints and dependencies (cargo fmt, clippy, machete),
# build everything in release, and run every test: the Rust unit and
# black-box tests (`cargo test`), then the Python suite in tests/python: the real ipyparallel
# 9.2.0 client against rpx, and the `rpx` Jupyter kernel through jupyter_kernel_test,
# jupyter_client, nbclient (notebooks/) and JupyterLab in headless chromium. Exits non-zero on
# any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> toolchain"
if command -v rustup >/dev/null 2>&1 && ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src
fi
for component in rustfmt clippy; do
    if command -v rustup >/dev/null 2>&1 && ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
        rustup component add "$component"
    fi
done
cargo --version

# Gates before any test: one formatting (rustfmt.toml), no clippy warning, no unused dependency.
echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings
echo "==> unused dependencies (cargo machete)"
command -v cargo-machete >/dev/null 2>&1 || cargo install cargo-machete --version 0.9.2 --locked
cargo machete

echo "==> python venv (.venv)"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
reqs=(ipyparallel==9.2.0 pytest)
if [ -f tests/python/requirements.txt ]; then
    reqs+=(-r tests/python/requirements.txt)
fi
.venv/bin/python -m pip install -q "${reqs[@]}"

echo "==> cargo build --release --workspace"
cargo build --release --workspace

echo "==> cargo test --release --workspace"
cargo test --release --workspace

if compgen -G "tests/python/test_*.py" >/dev/null || compgen -G "tests/python/*_test.py" >/dev/null; then
    echo "==> pytest tests/python"
    .venv/bin/python -m pytest tests/python -q
else
    echo "==> tests/python has no tests yet: skipped"
fi
echo "==> all tests passed"
