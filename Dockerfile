# syntax=docker/dockerfile:1.7
# colabel: one image for every role (see docs/deployment.md).
#   docker build -t colabel:0.1.0 .                                   # CPU torch
#   docker build -t colabel:0.1.0-cu128 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch (GPU worker pools)
# Roles (the first argument; anything else is run as a command):
#   docker run -p 9527:9527 -e HYPHA_ROOT_TOKEN=... -e HYPHA_JWT_SECRET=... colabel hypha   # Hypha server
#   docker run -e COLABEL_TOKEN=T colabel gateway --attach --server-url URL --ray-address ray://HEAD:10001
#                                                                     # --attach: a RayService's Serve applications
#   docker run -p 9527:9527 -v /data:/data colabel provider /data --host 0.0.0.0 --public-url http://HOST:9527
#                                                                     # `colabel serve`; HOST: this machine's name
# Ray is installed through the package's single pin (pyproject.toml, the models extra), which the chart's
# rayVersion equals; the Ray head and workers of the chart run this image too.

ARG PYTHON_VERSION=3.11
ARG NODE_VERSION=20

# ---- web: build the browser pages into colabel/web_dist --------------------------------------------------------
FROM node:${NODE_VERSION}-bookworm-slim AS web
WORKDIR /src
COPY web/ web/
COPY scripts/ scripts/
RUN --mount=type=cache,target=/root/.npm \
    mkdir -p colabel/web_dist \
    && if [ -f scripts/build-web.sh ] && [ -f web/package.json ]; then bash scripts/build-web.sh; \
       elif [ -f web/package.json ]; then cd web && npm ci --no-audit --no-fund && npm run build; \
       else echo "web/package.json not found: image without web pages" >&2; fi \
    && test -d /src/colabel/web_dist

# ---- build: a virtual environment with colabel and its server, model and HALS extras ---------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
# torch is installed first from PyTorch's index: CPU by default; a CUDA index for GPU images. The version pin
# is the one the project is tested with.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/colabel
ENV PATH=/opt/colabel/bin:$PATH
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"
WORKDIR /src
# The dependencies of colabel[server,models,hals], read from pyproject.toml alone: this layer is rebuilt only when
# pyproject.toml changes, not on every change of the sources below.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import importlib, sys; \
toml = importlib.import_module('tomllib' if sys.version_info >= (3, 11) else 'pip._vendor.tomli'); \
p = toml.load(open('pyproject.toml', 'rb'))['project']; \
extras = [d for e in ('server', 'models', 'hals') for d in p['optional-dependencies'][e]]; \
deps = [d for d in p['dependencies'] + extras if not d.startswith('colabel')]; \
print('\n'.join(dict.fromkeys(deps)))" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}"
# colabel itself; its dependencies (those of .[server,models,hals]) are the ones installed above
COPY README.md ./
COPY colabel/ colabel/
COPY apps/ apps/
COPY services/ services/
COPY --from=web /src/colabel/web_dist/ colabel/web_dist/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && pip check

# ---- runtime -----------------------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
# wget: KubeRay's probes of Ray pods call it; tini: signals and zombie reaping for PID 1
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 colabel \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash colabel \
    && mkdir -p /var/cache/colabel && chown 1000:1000 /var/cache/colabel
COPY --from=build /opt/colabel /opt/colabel
ENV PATH=/opt/colabel/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    COLABEL_CACHE_DIR=/var/cache/colabel/weights \
    COLABEL_EMBEDDING_DIR=/var/cache/colabel/embeddings \
    HYPHA_HOST=0.0.0.0 \
    HYPHA_PORT=9527

# The role dispatcher (also the HEALTHCHECK): no shell evaluation of arguments, exec so signals reach the role.
COPY --chmod=0755 <<'EOF_ENTRYPOINT' /usr/local/bin/colabel-entrypoint
#!/bin/sh
set -eu
role="${1:-help}"
[ "$#" -gt 0 ] && shift
case "$role" in
  hypha)
    echo hypha > /tmp/colabel-role 2>/dev/null || true
    exec python -m uvicorn colabel.apps.hypha_gate:app --host "${HYPHA_HOST:-0.0.0.0}" --port "${HYPHA_PORT:-9527}" \
      --ws-per-message-deflate false --no-access-log "$@" ;;
  gateway)
    echo gateway > /tmp/colabel-role 2>/dev/null || true
    exec colabel models "$@" ;;
  provider)
    echo provider > /tmp/colabel-role 2>/dev/null || true
    exec colabel serve "$@" ;;
  healthcheck)
    # hypha and provider (embedded Hypha) answer /health/liveness; the gateway has no HTTP port
    case "$(cat /tmp/colabel-role 2>/dev/null || echo none)" in
      gateway|none) exit 0 ;;
      *) exec python -c "import os, sys, urllib.request; port = os.environ.get('HYPHA_PORT', '9527'); \
sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/liveness', timeout=4).status == 200 else 1)" ;;
    esac ;;
  help|-h|--help)
    echo "usage: ROLE [ARGS...] with ROLE one of: hypha (Hypha server), gateway (colabel models),"
    echo "       provider (colabel serve); or any command, e.g. colabel --help, ray start ..."
    exit 0 ;;
  *)
    exec "$role" "$@" ;;
esac
EOF_ENTRYPOINT

USER 1000:1000
WORKDIR /home/colabel
EXPOSE 9527
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["colabel-entrypoint", "healthcheck"]
ENTRYPOINT ["tini", "--", "colabel-entrypoint"]
CMD ["help"]
