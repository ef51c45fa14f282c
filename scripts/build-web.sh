#!/usr/bin/env bash
# Builds colabel's browser pages (web/) into colabel/web_dist/, served by the provider's `<name>-web` service.
# Needs Node.js >= 18 and npm; installs exactly the versions of web/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."
npm --prefix web ci --no-audit --no-fund
npm --prefix web run build
