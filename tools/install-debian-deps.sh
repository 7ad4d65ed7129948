#!/usr/bin/env bash
# Install the Debian packages the tests need (idempotent; needs root or sudo).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pkgs=(dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23
      qemu-system-common   # qemu-storage-daemon: the vhost-user-blk back-end `pyvhost bench --device blk` compares with
      gcc libc6-dev)       # test_vm_vsock builds the guest's vsock client (tools/guestkit/vsockcat.c) static
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
if [ ${#missing[@]} -ne 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The VM tests: QEMU, busybox, iproute2, ping, and the guest kit (kernel + initramfs, built once and cached).
"$here/guestkit/build.sh"
