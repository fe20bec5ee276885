#!/usr/bin/env bash
# install-nginx.sh — make sure `nginx` is available, for tests/deploy.rs
# (two `parallm serve` instances behind nginx). Prints nginx's path.
#   * If nginx is on PATH (or in /usr/sbin), print it and exit 0.
#   * Otherwise install Debian's nginx-light with --no-install-recommends (as
#     root, or through `sudo -n`); `apt-get update` only if the first attempt
#     fails. A temporary /usr/sbin/policy-rc.d forbids the package from
#     starting a system nginx on :80; one started anyway is stopped.
#   * Safe to run concurrently: everything happens under an flock.
set -euo pipefail

exec 9>/tmp/parallm-install-nginx.lock
flock -w 900 9 || { echo "install-nginx.sh: timed out waiting for the lock" >&2; exit 1; }

find_nginx() {
    command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; }
}

if path=$(find_nginx); then
    echo "$path"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-nginx.sh: need root (or passwordless sudo) to install nginx-light" >&2
        exit 1
    fi
fi

POLICY=/usr/sbin/policy-rc.d
placed_policy=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod +x "$POLICY"
    placed_policy=1
fi
cleanup() { if [ "$placed_policy" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 nginx-light >&2; then
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update >&2
    "${SUDO[@]}" apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 nginx-light >&2
fi
# A daemon the package started anyway would hold :80; the tests use their own.
if [ -f /run/nginx.pid ]; then
    "${SUDO[@]}" kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi

path=$(find_nginx) || { echo "install-nginx.sh: nginx-light installed but nginx is missing" >&2; exit 1; }
echo "$path"
