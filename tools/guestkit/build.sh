#!/usr/bin/env bash
# The guest test kit: install QEMU and the tools the VM tests use (Debian packages), then build (or find in the
# cache) the guest kernel + initramfs.  Cache: $PYVHOST_GUEST_CACHE (default ~/.cache/pyvhost/guest).
# Idempotent; needs root or sudo for apt-get.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
pkgs=(qemu-system-x86 busybox-static cpio iproute2 iputils-ping)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO=sudo
# apt-get download needs package lists; refresh them once if the kernel package cannot be resolved
if [ ${#missing[@]} -ne 0 ] || ! apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-'; then
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -ne 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
exec python3 "$here/guestkit.py" build "$@"
