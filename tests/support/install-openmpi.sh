#!/usr/bin/env bash
# install-openmpi.sh — make sure OpenMPI (mpirun, its headers and library)
# and libclang are available, for building and testing with `--features mpi`
# (rsmpi generates its bindings with bindgen, which needs libclang).
#
# Called by .ci/run before the MPI tests; can be run by hand.
#   * If mpirun, mpicc (OpenMPI's headers come with it) and a libclang are
#     already there, print mpirun's path and exit 0 without touching anything.
#   * Otherwise install Debian's openmpi-bin, libopenmpi-dev and libclang-dev
#     with --no-install-recommends (as root, or through `sudo -n`); `apt-get
#     update` runs only if the first attempt fails (no package lists yet).
#   * Safe to run concurrently: everything happens under an flock.
# Exit status is non-zero, with a message, if they cannot be installed.
set -euo pipefail

LOCK_FILE="/tmp/parallm-install-openmpi.lock"
PKGS=(openmpi-bin libopenmpi-dev libclang-dev)

have_all() {
    command -v mpirun >/dev/null 2>&1 &&
        command -v mpicc >/dev/null 2>&1 &&
        compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null
}

exec 9>"$LOCK_FILE"
flock -w 900 9 || { echo "install-openmpi.sh: timed out waiting for $LOCK_FILE" >&2; exit 1; }

if have_all; then
    command -v mpirun
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-openmpi.sh: need root (or passwordless sudo) to install ${PKGS[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 "${PKGS[@]}" >&2; then
    "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update >&2
    "${SUDO[@]}" apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=600 "${PKGS[@]}" >&2
fi

if ! have_all; then
    echo "install-openmpi.sh: ${PKGS[*]} installed, but mpirun, mpicc or libclang is still missing" >&2
    exit 1
fi
command -v mpirun
