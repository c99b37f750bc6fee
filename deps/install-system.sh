#!/usr/bin/env bash
# System packages Pier's development needs, installed with apt when missing (run as root on Debian).
# Idempotent and quiet when everything is already there.
set -euo pipefail

need=()
command -v python3 >/dev/null || need+=(python3)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v chromium >/dev/null || need+=(chromium)  # the dashboard's browser test
command -v bwrap >/dev/null || need+=(bubblewrap)  # local sessions' sandbox (README: Local sessions: isolation)
command -v setpriv >/dev/null || need+=(util-linux)  # a sandboxed session's own uid, when Pier runs as root
[ -x /usr/bin/python3 ] || need+=(python3)  # the isolation tests' server runs on the system's Python
command -v promtool >/dev/null || need+=(prometheus)  # the dashboards' and alerts' tests: a real Prometheus, promtool

if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing system packages: ${need[*]} (install them, or run 'make install' as root)" >&2
    exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian package starts a system-wide Redis; Pier starts its own where it needs one.
# So does Prometheus's: the tests run their own.
for service in redis-server prometheus; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl disable --now "$service" >/dev/null 2>&1 || true
    fi
done
