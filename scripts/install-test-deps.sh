#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine (Debian, Python 3.11, Node >= 18):
# colabel with its test extras, the web pages built with npm, and Debian's Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
bash scripts/build-web.sh
