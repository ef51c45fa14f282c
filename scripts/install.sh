#!/usr/bin/env bash
# Installs colabel with its server, model services and HALS extras, and builds the web pages.
# torch is pinned to the build these machines carry (PyPI's newest pulls several GB of CUDA packages);
# on a CUDA machine the same pin installs PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[server,models,hals]"
if command -v npm >/dev/null; then
  bash scripts/build-web.sh
else
  echo "npm not found: the web pages are not built (install Node >= 18 and run scripts/build-web.sh)" >&2
fi
