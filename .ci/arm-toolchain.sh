#!/usr/bin/env bash
# CI: the Arm cross toolchain that tests/test_arm_cross.py needs (Debian's g++-aarch64-linux-gnu and
# qemu-user, about 100 MB), installed only when missing. Fails loudly when it cannot install them: without
# them the Arm kernels' test would skip and CI would no longer prove them.
set -euo pipefail
if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
packages=(g++-aarch64-linux-gnu qemu-user)
# A fresh image may have no package lists yet: update once, only if the first try fails.
"${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}" ||
  { "${sudo[@]}" apt-get update && "${sudo[@]}" apt-get install -y --no-install-recommends "${packages[@]}"; }
