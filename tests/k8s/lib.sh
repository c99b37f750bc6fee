# Shared by tests/k8s/*.sh (sourced, not run): logging, logged long steps, apt packages, the cache dir.
# The caller sets SCRIPT (its name, for log lines) before sourcing.

# Everything built for the test cluster lives here, keyed by what it was built from: one cache per user.
PIER_CACHE="${PIER_K8S_CACHE:-$HOME/.cache/pier}"

log() { echo "${SCRIPT:-pier}: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

# Long steps print where their output went, and its end if they fail.
run_logged() {
    local logfile="$1"
    shift
    log "  (log: $logfile)"
    if ! "$@" >"$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        die "'$*' failed; full log: $logfile"
    fi
}

# Install the Debian packages that are missing (as root; otherwise say what to install). Idempotent and silent
# when everything is there, so every build script can state exactly what it needs.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "missing packages: ${missing[*]} (run this as root, or: sudo apt-get install ${missing[*]})"
    log "installing ${missing[*]}"
    # Several scripts may install at once (parallel test workers): apt's own lock would make the others fail.
    (
        flock 8
        apt-get update -q >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
            die "apt-get install ${missing[*]} failed"
    ) 8>/run/lock/pier-apt.lock
}

# The Debian mirror URIs this machine's apt uses for a suite, first match first (one-line and deb822 sources).
# Only registries are reachable here, so every Debian download goes where the system's apt already goes.
debian_mirror() {
    local suite="$1" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        # One-line format: "deb [options] URI suite components"; drop the options, then match the suite.
        sed -E 's/\[[^]]*\]//' "$f" | awk -v s="$suite" '$1 == "deb" && $3 == s { print $2 }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        # deb822 format: one stanza per blank-line-separated paragraph with URIs: and Suites: fields.
        awk -v s="$suite" 'BEGIN { RS = ""; FS = "\n" }
            { uri = ""; ok = 0
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
                if ($i ~ /^Suites:/) { n = split($i, b, /[ \t]+/); for (j = 2; j <= n; j++) if (b[j] == s) ok = 1 }
              }
              if (ok && uri != "") print uri }' "$f"
    done
}
