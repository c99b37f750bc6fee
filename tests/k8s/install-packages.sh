#!/usr/bin/env bash
# The Debian packages the test cluster runs with (tests/k8s/realnode.py) and builds its images with
# (build-images.sh): installed with apt when missing (as root), silent when all are there. Idempotent.
#   etcd-server, openssl            the control plane's store and certificates
#   containerd, runc                the node's container runtime (runc: crun fails on this kernel's cgroup v1)
#   containernetworking-plugins     the CNI bridge, host-local and loopback plugins
#   iptables, conntrack             kube-proxy's Services (and the node's forwarding guard)
#   dnsmasq-base                    the cluster DNS (the binary alone, no system service)
#   podman, buildah, debootstrap    the images, without a registry
set -euo pipefail
SCRIPT=install-packages
# shellcheck source=tests/k8s/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

had_containerd=0
dpkg-query -W -f='${Status}' containerd 2>/dev/null | grep -q "install ok installed" && had_containerd=1
ensure_packages etcd-server openssl containerd runc containernetworking-plugins iptables conntrack dnsmasq-base \
    podman buildah debootstrap
# On a machine with systemd the package starts a system-wide containerd on /run/containerd, which the test node
# needs for itself (containerd 1.6 puts its shims' sockets there whatever its config says). Ours runs on its own.
if ((!had_containerd)) && command -v systemctl >/dev/null && systemctl is-active --quiet containerd 2>/dev/null; then
    systemctl disable --now containerd >/dev/null 2>&1 || true
fi
