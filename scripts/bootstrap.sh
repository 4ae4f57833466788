#!/usr/bin/env bash
# Create .venv with exactly the locked versions (uv.lock). Installs uv first if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null 2>&1; then
    if [ ! -x "$HOME/.local/bin/uv" ]; then
        echo "bootstrap: installing uv with pip" >&2
        python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
    fi
    export PATH="$HOME/.local/bin:$PATH"
fi
uv sync --frozen --all-extras --group dev
