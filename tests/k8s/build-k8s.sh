#!/usr/bin/env bash
# Build the Kubernetes v1.20.2 binaries of Pier's test cluster, offline, from Debian bookworm's `kubernetes` source
# package, and print the bin dir:
#   control plane (tests/k8s/cluster.py): kube-apiserver, kube-controller-manager, kubectl
#   node (tests/k8s/realnode.py):          kubelet, kube-scheduler, kube-proxy (Services: ClusterIPs and the
#                                           in-cluster API address need it), and pause: Kubernetes' own
#                                           build/pause C program, static, the sandbox image's one file
#                                           (tests/k8s/build-images.sh packages it)
#   simulated nodes (tests/k8s/hollow.py): kubemark, Kubernetes' own hollow node (a real kubelet on a fake
#                                           container runtime), for tests/k8s/test_hollow_nodes.py and make k8s-scale
#
# Why this way: no package registry ships these binaries, and the machine has no internet except the
# registries. Debian's source package is the complete upstream v1.20.2 tree with every dependency vendored,
# so it builds with Debian's Go (1.19) in GOPATH mode with no network access at all.
#
#   ./tests/k8s/build-k8s.sh [BINARY...]     (default: all of them; or: make k8s-binaries)
#
# Result: ${PIER_K8S_CACHE:-$HOME/.cache/pier}/k8s-1.20.2/bin/<binary>
# The source (patched, with the generated files) and private apt lists stay in .../k8s-1.20.2/work (safe to delete).
# Runs as root when apt packages are missing (it installs them); otherwise any user who owns the cache can run it.
# Idempotent: with the binaries present it only prints the bin dir. Whatever is missing of the Go binaries is built
# in one pass (they share most packages): ~5 minutes for the control plane alone, ~14 for all seven, on 2 cores.
#
# Fixes needed for Go 1.19 / a bare machine (each is explained where it is applied below):
#   1. vendored github.com/modern-go/reflect2 1.0.1 is replaced by Debian's 1.0.2 (1.0.1 crashes on Go >= 1.18)
#   2. pkg/generated/openapi/zz_generated.openapi.go is not in the tarball: generated with `make gen_openapi`
#   3. rsync must be installed: hack/lib/golang.sh copies built binaries with it (without it: empty files)
# and one for many hollow nodes on one host (upstream runs each in a pod of its own):
#   4. tests/k8s/kubemark-on-one-host.patch gives cmd/kubemark flags for what would otherwise be shared: the fake
#      runtime's socket, the kubelet's root, certificate and plugin directories, its healthz port and bind address,
#      and the address the fake runtime gives pods (upstream: 192.168.192.168 for every pod, routed off the host).
set -euo pipefail
SCRIPT=build-k8s
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/k8s/lib.sh
source "$HERE/lib.sh"

K8S_VERSION=1.20.2
# The Debian source version to fetch; override if the mirror has moved on to a newer Debian revision.
DEB_VERSION="${PIER_K8S_DEB_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
CACHE="$PIER_CACHE/k8s-${K8S_VERSION}"
BIN="$CACHE/bin"
WORK="$CACHE/work"
GO_BINARIES=(kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy kubemark)
ALL=("${GO_BINARIES[@]}" pause)
WANTED=("$@")
((${#WANTED[@]})) || WANTED=("${ALL[@]}")

missing_binaries() { # $@ = names; prints those not in the cache
    local b
    for b in "$@"; do [[ -x "$BIN/$b" ]] || echo "$b"; done
}

# Fast path (and the idempotence guarantee): nothing to do once the wanted binaries are in the cache.
if [[ -z "$(missing_binaries "${WANTED[@]}")" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE" "$WORK"
# One build at a time (parallel test workers may all call this); the others wait, then take the fast path.
exec 9>"$CACHE/.build.lock"
flock 9
if [[ -z "$(missing_binaries "${WANTED[@]}")" ]]; then
    echo "$BIN"
    exit 0
fi
# Build every Go binary that is missing, not only the wanted ones: one Go pass shares the compiled packages, and
# the test suite needs all of them anyway.
mapfile -t BINARIES < <(missing_binaries "${GO_BINARIES[@]}")
START=$SECONDS

# --- 1. System packages ------------------------------------------------------------------------------------
#   golang-go: the compiler (1.19 on bookworm; k8s 1.20 wants >= 1.15)
#   golang-github-modern-go-reflect2-dev: reflect2 1.0.2 sources, to replace the vendored 1.0.1 (fix 1)
#   dpkg-dev: `apt-get source` unpacks with dpkg-source
#   rsync, make: used by the hack/ build scripts (fix 3: without rsync they silently leave empty binaries)
#   gcc, libc6-dev: the code generators are built with cgo on (Go's default; golang-go only recommends gcc)
#   etcd-server, openssl: not for the build, but cluster.py needs them at run time
ensure_packages golang-go golang-github-modern-go-reflect2-dev dpkg-dev rsync make gcc libc6-dev etcd-server openssl
REFLECT2=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -f "$REFLECT2/go_above_118.go" ]] || die "$REFLECT2 is not reflect2 >= 1.0.2 (needs golang-github-modern-go-reflect2-dev)"

# --- 2. Source, via a private apt configuration ------------------------------------------------------------
# Own sources list, lists dir and cache dir: the system's apt configuration and state stay untouched, and the
# machine needs no deb-src line. The mirror is the one the machine already uses (only registries are reachable).
SRC_DIR="$WORK/kubernetes-${DEB_VERSION%-*}"  # dpkg-source names the dir after the upstream version
if [[ ! -f "$SRC_DIR/.pier-fetched" ]]; then
    MIRROR="${PIER_DEBIAN_MIRROR:-$(debian_mirror bookworm | head -n1)}"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    SECURITY="${PIER_DEBIAN_SECURITY_MIRROR:-$(debian_mirror bookworm-security | head -n1)}"
    SECURITY="${SECURITY:-http://deb.debian.org/debian-security}"
    APT_DIR="$WORK/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    cat >"$APT_DIR/sources.list" <<EOF
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $SECURITY bookworm-security main
EOF
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::Cache=$APT_DIR/cache"
    )
    # As root apt downloads as the `_apt` user, which cannot write into root's home: download as root.
    [[ $EUID -eq 0 ]] && APT_OPTS+=(-o "APT::Sandbox::User=root")
    log "fetching Debian source kubernetes=$DEB_VERSION from $MIRROR"
    run_logged "$WORK/apt-update.log" apt-get "${APT_OPTS[@]}" update
    # Fetch into a scratch dir and move into place only when complete, so an interrupted run starts over cleanly.
    rm -rf "$WORK/fetch" "$SRC_DIR"
    mkdir -p "$WORK/fetch"
    if ! (cd "$WORK/fetch" && apt-get "${APT_OPTS[@]}" source --only-source "kubernetes=$DEB_VERSION") \
        >"$WORK/apt-source.log" 2>&1; then
        tail -n 20 "$WORK/apt-source.log" >&2
        die "apt-get source kubernetes=$DEB_VERSION failed (if the mirror now has a newer Debian revision of 1.20.2,
set PIER_K8S_DEB_VERSION to it; see: apt-cache showsrc kubernetes)"
    fi
    mv "$WORK/fetch/$(basename "$SRC_DIR")" "$SRC_DIR"
    rm -rf "$WORK/fetch"
    touch "$SRC_DIR/.pier-fetched"
fi
cd "$SRC_DIR"
# The tarball is a `git archive` of the release tag; hack/lib/version.sh carries the tag (and stamps the binaries).
grep -q "tag: v${K8S_VERSION}'" hack/lib/version.sh || die "$SRC_DIR is not Kubernetes v${K8S_VERSION}"

# --- 3. Go 1.19 fixes -----------------------------------------------------------------------------------------
# Fix 1: reflect2 1.0.1 (vendored, used by json-iterator in the API machinery) reads runtime map internals that
# changed in Go 1.18: it compiles, then crashes or corrupts maps at run time. 1.0.2 is the upstream fix, and is
# API-compatible. In GOPATH mode vendor/ is used as-is (go.mod/modules.txt are ignored), so swapping the
# directory is all it takes.
# (Each step below leaves a marker only once it is complete, so an interrupted run redoes just that step.)
if [[ ! -f .pier-reflect2 ]]; then
    log "replacing vendored reflect2 1.0.1 with Debian's 1.0.2"
    rm -rf vendor/github.com/modern-go/reflect2
    cp -rL "$REFLECT2" vendor/github.com/modern-go/reflect2
    touch .pier-reflect2
fi

# Fix 4: kubemark's hollow nodes side by side on one host (see the patch's flags).
if [[ ! -f .pier-kubemark ]]; then
    log "patching cmd/kubemark for many hollow nodes on one host"
    patch -p1 --forward <"$HERE/kubemark-on-one-host.patch" >/dev/null || die "kubemark-on-one-host.patch does not apply"
    touch .pier-kubemark
fi

# The build: GOPATH mode, nothing from the network, the user's GOFLAGS ignored. hack/lib/init.sh forces
# GO111MODULE=off itself; hack/lib/golang.sh lays out the GOPATH (_output/local/go/src/k8s.io/kubernetes -> the tree)
# and puts GOCACHE under _output, so the build touches nothing outside the work dir.
export GO111MODULE=off GOPROXY=off GOFLAGS=""

# Fix 2: the OpenAPI definitions (pkg/generated/openapi/zz_generated.openapi.go, which kube-apiserver imports) are
# generated at build time upstream and are not in the tarball. `make gen_openapi` builds openapi-gen from vendor/
# and writes them (it also rewrites the aggregator/apiextensions/sample ones the tarball has, from the same sources).
# Only this generator is needed: the deepcopy/conversion/defaults files are in the tarball, so the slow
# `make generated_files` (which `make all` would run first) is skipped. Takes ~20 s.
if [[ ! -f .pier-openapi ]]; then
    log "generating OpenAPI definitions (make gen_openapi)"
    run_logged "$WORK/gen-openapi.log" make gen_openapi
    [[ -s pkg/generated/openapi/zz_generated.openapi.go ]] || die "make gen_openapi produced no zz_generated.openapi.go"
    touch .pier-openapi
fi

# --- 4. Build -----------------------------------------------------------------------------------------------
mkdir -p "$BIN"
# Install into the cache: copy to a temp name and rename, so a half-copied binary never looks present.
install_binary() { # $1 = built file, $2 = name in the cache
    install -m 0755 "$1" "$BIN/.$2.tmp"
    mv -f "$BIN/.$2.tmp" "$BIN/$2"
}

# The sandbox ("pause") container's program, as build/pause/Makefile builds it: static, so its image needs
# nothing else (no registry serves k8s.gcr.io/pause here). Seconds.
if [[ ! -x "$BIN/pause" ]]; then
    log "building pause (build/pause/linux/pause.c, static)"
    run_logged "$WORK/pause.log" gcc -Os -Wall -Werror -static -DVERSION="v3.4-pier" -o "$WORK/pause" \
        build/pause/linux/pause.c
    install_binary "$WORK/pause" pause
fi

if ((${#BINARIES[@]})); then
    # hack/make-rules/build.sh is what `make WHAT=...` runs after `generated_files`: static (CGO_ENABLED=0)
    # binaries (kubelet alone is built with cgo, as upstream does), version stamped v1.20.2 from the git-archive
    # data in hack/lib/version.sh. Go's default parallelism (-p = cores).
    log "building ${BINARIES[*]} (5-14 minutes on 2 cores)"
    run_logged "$WORK/build.log" hack/make-rules/build.sh "${BINARIES[@]/#/cmd/}"
    for b in "${BINARIES[@]}"; do
        [[ -s "_output/bin/$b" ]] || die "build produced no _output/bin/$b"
        install_binary "_output/bin/$b" "$b"
        # Each binary reports the tag it was stamped with (kubectl phrases it differently).
        if [[ $b == kubectl ]]; then version="$("$BIN/$b" version --client --short 2>/dev/null || true)"; else
            version="$("$BIN/$b" --version 2>/dev/null || true)"; fi
        [[ "$version" == *"v${K8S_VERSION}"* ]] || die "built $b reports '$version', expected v${K8S_VERSION}"
    done
    # _output holds 2 GB of Go build cache and intermediate objects that only a rebuild would use; the binaries
    # are what we keep. The (patched, generated) source stays, ~300 MB.
    rm -rf _output
fi
log "done in $((SECONDS - START))s: ${BINARIES[*]} pause v${K8S_VERSION}"
echo "$BIN"
