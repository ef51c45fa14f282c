#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine (Debian, Python 3.11): colabel with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
