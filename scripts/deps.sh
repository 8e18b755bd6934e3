#!/usr/bin/env bash
# Installs what segmap's tests need on a Debian machine, when it is missing:
# the NBD clients the end-to-end tests drive (libnbd tools and the Python
# binding, qemu-io/qemu-img/qemu-nbd, fio with its nbd engine, nbdkit,
# nbdfuse + FUSE) and the tools to put a filesystem on a disk and grow it
# (e2fsprogs, xfsprogs, losetup, blockdev), protoc (protobuf-compiler, for
# 'make proto' and the check in 'make verify' that api/ is current) and
# Chromium (the dashboard's browser test drives it headless). With the
# argument 'bench', also what 'make bench' needs on top (gnuplot-nox, for
# the plots); with 'proto', only protoc. Exits non-zero if anything is still missing afterwards.
set -euo pipefail

# tool -> Debian package
need=(
  "qemu-io qemu-utils" "qemu-img qemu-utils" "qemu-nbd qemu-utils"
  "nbdinfo libnbd-bin" "nbdcopy libnbd-bin" "/usr/bin/nbdsh python3-libnbd"
  "nbdkit nbdkit" "nbdfuse nbdfuse" "fusermount3 fuse3" "fio fio"
  "mkfs.ext4 e2fsprogs" "e2fsck e2fsprogs" "resize2fs e2fsprogs"
  "mkfs.xfs xfsprogs" "xfs_growfs xfsprogs" "losetup mount" "blockdev util-linux" "blkid util-linux"
  "protoc protobuf-compiler" "chromium chromium"
)
case "${1:-}" in
bench) need+=("gnuplot gnuplot-nox") ;;
proto) need=("protoc protobuf-compiler") ;;
esac

missing=()
for pair in "${need[@]}"; do
  tool=${pair% *} pkg=${pair#* }
  command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  echo "deps: installing $pkgs"
  if [ "$(id -u)" != 0 ]; then
    echo "deps: need root to install: $pkgs" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
for pair in "${need[@]}"; do
  tool=${pair% *}
  command -v "$tool" >/dev/null 2>&1 || { echo "deps: $tool still missing" >&2; exit 1; }
done
# fio must have its nbd engine.
[ "${1:-}" = proto ] || fio --enghelp 2>/dev/null | grep -qw nbd || { echo "deps: fio lacks the nbd engine" >&2; exit 1; }
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
echo "deps: ok"
