#!/usr/bin/env bash
# install-prometheus.sh — make sure `prometheus` and `promtool` are available.
#
# Called by parallm's Rust integration tests (cargo test --release --workspace)
# before they start their own Prometheus (on a free loopback port, with their
# own config and a temp storage dir) and before they run `promtool check
# metrics` on the server's /metrics output. Can also be run by hand.
#
# Behaviour:
#   * If both binaries are already on PATH (or in /usr/bin), print their paths
#     and exit 0 without touching anything.
#   * Otherwise install Debian's `prometheus` package non-interactively with
#     --no-install-recommends (as root, or through `sudo -n` when not root).
#     `apt-get update` is run only if the first install attempt fails (e.g. a
#     fresh machine with no package lists yet), then the install is retried.
#   * The package's maintainer scripts would start a system prometheus on
#     :9090 through /etc/init.d; a temporary /usr/sbin/policy-rc.d (exit 101)
#     forbids that during the install, and any package-started daemon that is
#     nevertheless running afterwards is stopped.
#   * Safe to run concurrently: everything happens under an flock on
#     /tmp/parallm-install-prometheus.lock.
#
# Output: on success stdout has exactly two lines: the absolute path of
# `prometheus`, then the absolute path of `promtool`. Everything else goes to
# stderr. Exit status is non-zero, with a message, if they cannot be installed.
set -euo pipefail

LOCK_FILE="/tmp/parallm-install-prometheus.lock"
LOCK_WAIT_SECS="${PARALLM_INSTALL_LOCK_WAIT:-900}"
PKG="prometheus"
PIDFILE="/run/prometheus/prometheus.pid"

log() { printf 'install-prometheus: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Prints the path of $1 if it is on PATH or in /usr/bin; returns 1 otherwise.
find_bin() {
    local p
    if p="$(command -v "$1" 2>/dev/null)" && [ -x "$p" ]; then
        printf '%s\n' "$p"
        return 0
    fi
    if [ -x "/usr/bin/$1" ]; then
        printf '%s\n' "/usr/bin/$1"
        return 0
    fi
    return 1
}

# Prints both paths and exits 0 when both binaries are available.
report_if_present() {
    local prom tool
    prom="$(find_bin prometheus)" || return 1
    tool="$(find_bin promtool)" || return 1
    printf '%s\n%s\n' "$prom" "$tool"
    exit 0
}

# Fast path, no lock needed.
report_if_present || true

# ---- slow path: install under a lock --------------------------------------
exec 9>>"$LOCK_FILE" || die "cannot open lock file $LOCK_FILE"
# Let other users' test runs share the lock file if we created it.
chmod 0666 "$LOCK_FILE" 2>/dev/null || true
if ! flock -w "$LOCK_WAIT_SECS" 9; then
    die "timed out after ${LOCK_WAIT_SECS}s waiting for $LOCK_FILE"
fi

# Another process may have finished the install while we waited.
report_if_present || true

# How to run commands as root.
AS_ROOT=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        AS_ROOT=(sudo -n)
        "${AS_ROOT[@]}" true 2>/dev/null \
            || die "prometheus/promtool are missing; not root and 'sudo -n' is not allowed. Install Debian's '$PKG' package by hand (apt-get install --no-install-recommends $PKG)."
    else
        die "prometheus/promtool are missing; not root and no sudo. Install Debian's '$PKG' package by hand (apt-get install --no-install-recommends $PKG)."
    fi
fi
command -v apt-get >/dev/null 2>&1 \
    || die "prometheus/promtool are missing and apt-get is not available; install Prometheus (prometheus + promtool) by hand."

as_root() { "${AS_ROOT[@]}" "$@"; }

# Forbid service starts from maintainer scripts for the duration of the
# install (the standard policy-rc.d mechanism honoured by invoke-rc.d).
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
POLICY_INSTALLED=0
restore_policy() {
    if [ "$POLICY_INSTALLED" -eq 1 ]; then
        if [ -n "$POLICY_BACKUP" ]; then
            as_root mv -f "$POLICY_BACKUP" "$POLICY" || log "WARNING: could not restore $POLICY from $POLICY_BACKUP"
        else
            as_root rm -f "$POLICY" || log "WARNING: could not remove temporary $POLICY"
        fi
        POLICY_INSTALLED=0
    fi
}
trap restore_policy EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -e "$POLICY" ]; then
    POLICY_BACKUP="$POLICY.parallm-backup.$$"
    as_root cp -p "$POLICY" "$POLICY_BACKUP"
fi
printf '#!/bin/sh\n# temporary, written by parallm tests/support/install-prometheus.sh\nexit 101\n' \
    | as_root tee "$POLICY" >/dev/null
as_root chmod 0755 "$POLICY"
POLICY_INSTALLED=1

APT_OPTS=(-y --no-install-recommends -o DPkg::Lock::Timeout=600
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${APT_OPTS[@]}" "$PKG" </dev/null >&2
}

log "installing Debian package '$PKG' (--no-install-recommends)"
if ! apt_install; then
    log "install failed; running apt-get update and retrying"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update </dev/null >&2 \
        || log "WARNING: apt-get update failed"
    apt_install || die "apt-get install $PKG failed (see apt output above)"
fi

restore_policy

# If the package nevertheless started its daemon (e.g. no policy-rc.d
# support), stop it: tests run their own prometheus and :9090 must stay free.
if [ -f "$PIDFILE" ]; then
    log "stopping the prometheus daemon started by the package (pidfile $PIDFILE)"
    if command -v start-stop-daemon >/dev/null 2>&1; then
        as_root start-stop-daemon --stop --quiet --oknodo --retry=TERM/30/KILL/5 \
            --exec /usr/bin/prometheus --pidfile "$PIDFILE" >&2 || true
    else
        pid="$(cat "$PIDFILE" 2>/dev/null || true)"
        if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null || true)" = /usr/bin/prometheus ]; then
            as_root kill -TERM "$pid" || true
        fi
    fi
    as_root rm -f "$PIDFILE" || true
fi
# Keep the system service from being started at boot on real machines too.
if command -v update-rc.d >/dev/null 2>&1 && [ -x /etc/init.d/prometheus ]; then
    as_root update-rc.d prometheus disable >/dev/null 2>&1 || true
fi

report_if_present || true
die "apt-get reported success but prometheus/promtool were not found on PATH or in /usr/bin"
