#!/usr/bin/env bash
# Create .venv with exactly the locked versions (uv.lock), for `make demo` and `make test`.
#
# Needs only python3 (>= 3.11) with its venv module (Debian: apt-get install python3-venv).
# uv is taken from, in order: $UV, `uv` on PATH, ~/.local/bin/uv, or this checkout's
# .bootstrap/uv-venv/bin/uv, which this script creates when there is none: a throw-away venv
# (python3 -m venv) with uv pip-installed into it. Nothing is installed with `pip install --user`
# (Debian's Python refuses it, PEP 668) and nothing outside this checkout is written, except
# uv's download cache (~/.cache/uv, or $UV_CACHE_DIR). `make clean` removes .venv and .bootstrap.
# --compile-bytecode: the installed packages' .pyc are written once here, so a process does not
# compile tiled, pandas and pyarrow from source at each start when PYTHONDONTWRITEBYTECODE is set.
set -euo pipefail
cd "$(dirname "$0")/.."
BOOTSTRAP_DIR="$PWD/.bootstrap"

find_uv() {
    if [ -n "${UV:-}" ] && [ -x "$UV" ]; then echo "$UV"; return; fi
    if command -v uv >/dev/null 2>&1; then command -v uv; return; fi
    for candidate in "$HOME/.local/bin/uv" "$BOOTSTRAP_DIR/uv-venv/bin/uv"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
}

uv="$(find_uv)"
if [ -z "$uv" ]; then
    python="$(command -v python3 || true)"
    if [ -z "$python" ]; then
        echo "bootstrap: python3 is needed (Debian: apt-get install python3 python3-venv)" >&2
        exit 1
    fi
    echo "bootstrap: installing uv into a throw-away venv: $BOOTSTRAP_DIR/uv-venv (with $python -m venv)" >&2
    rm -rf "$BOOTSTRAP_DIR/uv-venv"
    mkdir -p "$BOOTSTRAP_DIR"
    if ! "$python" -m venv "$BOOTSTRAP_DIR/uv-venv" >/dev/null; then
        echo "bootstrap: '$python -m venv' failed (Debian: apt-get install python3-venv)" >&2
        exit 1
    fi
    "$BOOTSTRAP_DIR/uv-venv/bin/python" -m pip install --quiet --disable-pip-version-check uv
    uv="$BOOTSTRAP_DIR/uv-venv/bin/uv"
fi
echo "bootstrap: using $uv ($("$uv" --version)); creating $PWD/.venv from uv.lock" >&2
"$uv" sync --frozen --all-extras --group dev --compile-bytecode
