#!/usr/bin/env bash
# Debian packages the test suite uses: systemd-analyze (unit checks), tmux
# (monitor screen test), PostgreSQL (Tiled with a production catalog), Redis
# (Tiled's streaming cache for live subscribers), promtool (package
# prometheus: the alert rules' checks and unit tests), python3-venv (the
# bootstrap's throw-away venv for uv).
# Installs what is missing when run as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "system-deps: not installed: ${missing[*]} (tests that need them are skipped)" >&2
fi
