#!/usr/bin/env bash
# Installs Weir with its test extras into .venv and runs the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
# the browser page's tests (tests/browser) drive Debian's Chromium
if [ ! -x /usr/bin/chromium ]; then
    sudo=""; if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo=sudo; fi
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# the numerical reference; its metadata pins an old torch, so no deps
python -m pip install -q --no-deps streamdiffusionv2==0.1.1
python -m ruff check .
python -m pytest -q tests "$@"
