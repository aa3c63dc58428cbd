#!/usr/bin/env bash
# CI: the Arm cross toolchain that tests/test_arm_cross.py needs (Debian's g++-aarch64-linux-gnu and
# qemu-user, about 100 MB), installed with apt only when missing. Fails loudly when it cannot install them:
# without them the Arm kernels' test would skip and CI would no longer prove them.
set -euo pipefail
if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
  exit 0
fi
packages="g++-aarch64-linux-gnu qemu-user"
if ! command -v apt-get >/dev/null; then
  echo "arm-toolchain.sh: no apt-get here; install $packages (or equivalents) by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null; then
    echo "arm-toolchain.sh: apt-get install $packages needs root or sudo" >&2
    exit 1
  fi
  SUDO=sudo
fi
# A fresh image may have no package lists yet: update once, only if the first try fails.
# shellcheck disable=SC2086
$SUDO apt-get install -y --no-install-recommends $packages ||
  { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends $packages; }
