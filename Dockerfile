# One image for every component (router, job pool, operator, and the bridge in each session pod):
# they are one workspace installed from one lock, and the bridge must run the stdio servers people
# use, which are Python (uvx) or Node (npx) programs. Build: docker build -t ghcr.io/pier-dev/pier:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG NODE_IMAGE=node:22-bookworm-slim

# -- build: Pier into a venv exactly as uv.lock pins it (uv's caches stay in this stage) ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/pier UV_LINK_MODE=copy UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never
# uv installs the lock; it also ships in the image, as `uvx` starts Python servers in session pods.
RUN pip install "uv==0.13.9"
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY core/ core/
COPY sidecar/ sidecar/
COPY router/ router/
COPY jobs/ jobs/
COPY operator/ operator/
COPY examples/ examples/
COPY cli/ cli/
RUN uv sync --frozen --no-dev --no-editable --package pier \
    && cp "$(command -v uv)" "$(command -v uvx)" /opt/pier/bin/

# -- Node.js (node, npm, npx) from the official image: a current LTS, not Debian's -----------------
FROM ${NODE_IMAGE} AS node

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
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules/npm /usr/local/lib/node_modules/npm
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
# Ports: router 8000, job pool 8001 (/healthz, /metrics), operator 8081 (/healthz), bridge 8080.
EXPOSE 8000 8001 8080 8081
ENTRYPOINT ["pier"]
CMD ["--help"]
