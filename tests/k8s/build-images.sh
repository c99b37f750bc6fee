#!/usr/bin/env bash
# Build the container images Pier's real test node runs, without any container registry, and print the path of
# a JSON manifest naming them (what tests/k8s/realnode.py imports into containerd):
#
#   base      localhost/pier/base:bookworm-<key>  Debian bookworm made by debootstrap (Debian's mirror is reachable,
#             no registry is): python3 + venv + ca-certificates, standing in for python:3.11-slim-bookworm
#   pause     localhost/pier/pause:3.4            the sandbox image: Kubernetes' build/pause, static (build-k8s.sh)
#   pier      localhost/pier:<id>                 the repository's Dockerfile, whatever it holds, on that base
#   pier-test localhost/pier-test:<id>            pier + @modelcontextprotocol/server-everything in /opt/mcp-servers:
#                                                 how a platform team offers a Node server without a fetch at run time
#   everything localhost/pier/everything:<id>     server-everything alone (node, no Pier), user 1000: attach mode's
#                                                 "server in its own image"
#   redis     localhost/pier/redis:<id>           Debian's redis-server, for the chart's bundled Redis
#
#   ./tests/k8s/build-images.sh        (or: make k8s-images)
#
# Everything lives under ${PIER_K8S_CACHE:-$HOME/.cache/pier}/images: podman/buildah storage and config, the npm
# install, and one `podman save` archive per image ID. Rebuilds are keyed by their inputs: the base by its recipe;
# the others by buildah's layer cache (`--layers`: each instruction and the content of every COPY, i.e. exactly
# the build context the Dockerfile and .dockerignore select), so a changed source file rebuilds from the step that
# copies it, and an unchanged tree rebuilds nothing. Archives are written only for new image IDs.
#
# Runs as root (debootstrap, buildah's storage). Needs the network only for the Debian mirror, PyPI and npm (what
# the Dockerfile installs). Builds use the host's network namespace (no bridge, no iptables) and the host's CA
# bundle, bind-mounted read-only while RUN steps run, so a machine whose registries sit behind a TLS proxy can
# build; nothing of it is written into the images.
set -euo pipefail
SCRIPT=build-images
# shellcheck source=tests/k8s/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tests/k8s/images"

[[ $EUID -eq 0 ]] || die "run as root (debootstrap and buildah's storage need it)"
ensure_packages podman buildah debootstrap runc
command -v npm >/dev/null || die "npm is missing (make install installs it)"

IMAGES="$PIER_CACHE/images"
WORK="$IMAGES/work"
mkdir -p "$IMAGES/conf" "$IMAGES/archives" "$WORK"
exec 9>"$IMAGES/.build.lock" # one build at a time; a second caller waits, then finds everything built
flock 9
START=$SECONDS

# --- podman/buildah configuration: private storage, runc, no registries -------------------------------------
# crun (podman's default) fails on this kernel's cgroup v1 setup; runc works. default_ulimits = []: the default
# raises RLIMIT_NOFILE, which root without CAP_SYS_RESOURCE may not do. No search registries, and every build
# runs with --pull=never: a name that is not local fails instead of reaching out to a registry.
cat >"$IMAGES/conf/containers.conf" <<'EOF'
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
cat >"$IMAGES/conf/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$IMAGES/storage"
runroot = "/run/pier-images"
EOF
cat >"$IMAGES/conf/registries.conf" <<'EOF'
unqualified-search-registries = []
short-name-mode = "enforcing"
EOF
export CONTAINERS_CONF="$IMAGES/conf/containers.conf"
export CONTAINERS_STORAGE_CONF="$IMAGES/conf/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$IMAGES/conf/registries.conf"

BUILD=(buildah bud --layers --pull=never --network host --runtime runc)
# The host's CA bundle for RUN steps (pip, apt over https): see the header.
CA=/etc/ssl/certs/ca-certificates.crt
[[ -f $CA ]] && BUILD+=(-v "$CA:$CA:ro")

sha() { sha256sum | cut -c1-12; }
image_id() { podman image inspect --format '{{.Id}}' "$1"; }
timed() { # $1 = what; the rest runs; logs how long it took (the build times the README reports)
    local what="$1" t0=$SECONDS
    shift
    "$@"
    log "$what: $((SECONDS - t0))s"
}
# Tag an image by its ID and drop the repository's other tags (their layers go at the prune below).
tag_by_id() { # $1 = image, $2 = repository; prints the ref
    local id ref old
    id="$(image_id "$1")"
    ref="$2:${id:0:12}"
    podman tag "$1" "$ref"
    for old in $(podman images --noheading --format '{{.Repository}}:{{.Tag}}' --filter "reference=$2"); do
        [[ $old == "$ref" || $old == "$1" ]] || podman untag "$old" "$old" 2>/dev/null || true
    done
    echo "$ref"
}

# --- base: debootstrap ---------------------------------------------------------------------------------------
SUITE=bookworm
MIRROR="${PIER_DEBIAN_MIRROR:-$(debian_mirror $SUITE | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# python-is-python3: `python` as in the python image; python3-venv: the Dockerfile makes a venv.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates
BASE_RECIPE=4 # bump when the steps below change
BASE_REF="localhost/pier/base:$SUITE-$(echo "$SUITE $MIRROR $BASE_PACKAGES $BASE_RECIPE" | sha)"
make_base() {
    local rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    run_logged "$WORK/debootstrap.log" debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" \
        "$MIRROR"
    # What debian:bookworm-slim (python:*-slim's base) configures: apt keeps no package caches and fetches no
    # translations, and dpkg installs no documentation, manuals or locales (copyright files stay).
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    echo 'Acquire::Languages "none";' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
        "$rootfs"/usr/share/lintian/*
    # What a container runtime provides, and what debootstrap leaves behind: not part of an image.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/etc/resolv.conf "$rootfs"/etc/hostname
    # pip in a venv trusts only its bundled certifi, and uv its bundled roots; Debian's own pip trusts the system
    # store. Make them agree, so a CA the system trusts is trusted by every pip and uv in images built from
    # this base (whichever of them a Dockerfile installs with).
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    mkdir -p "$rootfs/etc/uv"
    printf 'native-tls = true\n' >"$rootfs/etc/uv/uv.toml"
    tar -C "$rootfs" --numeric-owner -c . | podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_REF" >/dev/null
    rm -rf "$rootfs"
}
if ! podman image exists "$BASE_REF"; then
    log "base: debootstrap $SUITE from $MIRROR (1-3 minutes)"
    timed "base image" make_base
    for old in $(podman images --noheading --format '{{.Repository}}:{{.Tag}}' --filter reference=localhost/pier/base); do
        [[ $old == "$BASE_REF" ]] || podman untag "$old" "$old"
    done
fi

# --- pause: the sandbox image ----------------------------------------------------------------------------------
BIN="$("$ROOT/tests/k8s/build-k8s.sh" pause | tail -n1)"
mkdir -p "$WORK/pause"
cp "$BIN/pause" "$WORK/pause/pause"
timed "pause image" run_logged "$WORK/pause-build.log" "${BUILD[@]}" -f "$HERE/pause.Containerfile" \
    -t localhost/pier/pause:3.4 "$WORK/pause"
PAUSE_REF=localhost/pier/pause:3.4

# --- pier: the repository's Dockerfile --------------------------------------------------------------------------
log "pier: buildah bud $ROOT/Dockerfile (from the base; minutes the first time, seconds when nothing changed)"
timed "pier image" run_logged "$WORK/pier-build.log" "${BUILD[@]}" --build-arg "PYTHON_IMAGE=$BASE_REF" \
    -f "$ROOT/Dockerfile" -t localhost/pier:build "$ROOT"
PIER_REF="$(tag_by_id localhost/pier:build localhost/pier)"

# --- server-everything, installed once (npm on the host: its registry settings and CAs already work) ----------
# The version the tests already run (deps/npm's lock file), so the node runs the server the other tiers test.
EVERYTHING_VERSION="$(python3 -c 'import json, sys
lock = json.load(open(sys.argv[1]))
print(lock["packages"]["node_modules/@modelcontextprotocol/server-everything"]["version"])' \
    "$ROOT/deps/npm/package-lock.json")"
SERVERS="$WORK/servers-$EVERYTHING_VERSION"
if [[ ! -f "$SERVERS/.complete" ]]; then
    log "npm: @modelcontextprotocol/server-everything@$EVERYTHING_VERSION"
    rm -rf "$SERVERS"
    mkdir -p "$SERVERS/everything"
    run_logged "$WORK/npm.log" npm install --prefix "$SERVERS/everything" --omit=dev --no-audit --no-fund \
        --no-package-lock "@modelcontextprotocol/server-everything@$EVERYTHING_VERSION"
    touch "$SERVERS/.complete"
fi

timed "pier-test image" run_logged "$WORK/pier-test-build.log" "${BUILD[@]}" --build-arg "PIER_IMAGE=$PIER_REF" \
    -f "$HERE/pier-test.Containerfile" -t localhost/pier-test:build "$SERVERS"
PIER_TEST_REF="$(tag_by_id localhost/pier-test:build localhost/pier-test)"
timed "everything image" run_logged "$WORK/everything-build.log" "${BUILD[@]}" --build-arg "BASE_IMAGE=$BASE_REF" \
    --build-arg "PIER_IMAGE=$PIER_REF" -f "$HERE/everything.Containerfile" -t localhost/pier/everything:build \
    "$SERVERS"
EVERYTHING_REF="$(tag_by_id localhost/pier/everything:build localhost/pier/everything)"
timed "redis image" run_logged "$WORK/redis-build.log" "${BUILD[@]}" --build-arg "BASE_IMAGE=$BASE_REF" \
    -f "$HERE/redis.Containerfile" -t localhost/pier/redis:build "$HERE"
REDIS_REF="$(tag_by_id localhost/pier/redis:build localhost/pier/redis)"

# Buildah keeps the working container of a stage used only by `COPY --from` (everything.Containerfile's); this
# storage is ours alone (under the lock), so none is in use.
buildah rm --all >/dev/null
# Untagged images are earlier builds' layers, but also the layer cache of every stage but the last (the
# Dockerfile's build stage: without it each run reinstalls everything). So they go only when the storage
# outgrows PIER_IMAGE_STORAGE_GB (default 8); the next build then starts its stages afresh.
if (($(du -sb "$IMAGES/storage" | cut -f1) > ${PIER_IMAGE_STORAGE_GB:-8} * 1000000000)); then
    log "image storage over ${PIER_IMAGE_STORAGE_GB:-8} GB: pruning untagged images"
    podman image prune -f >/dev/null
fi

# --- archives for containerd, and the manifest -----------------------------------------------------------------
entries=()
keep=()
for pair in "pause=$PAUSE_REF" "pier=$PIER_REF" "pier-test=$PIER_TEST_REF" "everything=$EVERYTHING_REF" \
    "redis=$REDIS_REF"; do
    name="${pair%%=*}" ref="${pair#*=}"
    id="$(image_id "$ref")"
    archive="$IMAGES/archives/${id:0:12}.tar"
    if [[ ! -f "$archive" ]]; then
        # docker-archive keeps the full name (localhost/...), which `ctr images import` restores as is.
        run_logged "$WORK/save.log" podman save --format docker-archive -o "$archive.tmp" "$ref"
        mv "$archive.tmp" "$archive"
    fi
    size="$(podman image inspect --format '{{.Size}}' "$ref")"
    entries+=("$(printf '"%s": {"ref": "%s", "id": "%s", "archive": "%s", "size": %s}' \
        "$name" "$ref" "$id" "$archive" "$size")")
    keep+=("$archive")
done
# Archives of images that are no longer current.
for archive in "$IMAGES"/archives/*.tar; do
    [[ " ${keep[*]} " == *" $archive "* ]] || rm -f "$archive"
done
MANIFEST="$IMAGES/manifest.json"
{
    echo "{"
    for i in "${!entries[@]}"; do
        sep=","
        ((i == ${#entries[@]} - 1)) && sep=""
        echo "  ${entries[$i]}$sep"
    done
    echo "}"
} >"$MANIFEST.tmp"
mv "$MANIFEST.tmp" "$MANIFEST"
log "done in $((SECONDS - START))s: $PIER_REF ($(($(podman image inspect --format '{{.Size}}' "$PIER_REF") / 1000000)) MB)"
echo "$MANIFEST"
