#!/usr/bin/env bash
# Builds a bootable Debian guest with sprited installed, for the VM tests.
#
#   scripts/vm-image.sh SUITE        # bookworm or trixie; prints the output dir
#
# From Debian packages only: debootstrap of SUITE with the suite's cloud
# kernel and initramfs, criu, python3, iproute2 and qemu-guest-agent; then
# sprited and sprite-env (SPRITED_BIN_DIR, default target/debug) and
# packaging/sprited.service, enabled, listening on 8181 with the token
# SPRITED_VM_TOKEN (default vm-test-token). Output, under target/vm/:
#   <SUITE>-<hash>/disk.raw   ext4 root filesystem (mkfs.ext4 -d: no loop devices)
#   <SUITE>-<hash>/vmlinuz, initrd.img
# Two cache levels, each named by a hash of its inputs: the debootstrapped
# base (base-<SUITE>-<hash>/, the slow part: about a minute) and the image
# (seconds), so a second run with the same binaries reuses everything and a
# rebuilt daemon only repacks the image.
#
# Boot it with: -kernel vmlinuz -initrd initrd.img -drive file=disk.raw,if=virtio
#   -append "root=/dev/vda rw console=ttyS0 net.ifnames=0"
# and user networking (the guest is 10.0.2.15, set statically).
# Needs root, debootstrap and e2fsprogs (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'vm-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

SUITE=${1:-}
case "$SUITE" in
  bookworm | trixie) ;;
  *) die "usage: scripts/vm-image.sh bookworm|trixie" ;;
esac
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, file ownership in the image)"
command -v debootstrap >/dev/null || die "debootstrap is missing: run scripts/setup.sh"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing: run scripts/setup.sh"

BIN_DIR=${SPRITED_BIN_DIR:-target/debug}
TOKEN=${SPRITED_VM_TOKEN:-vm-test-token}
MIRROR=${SPRITED_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd-sysv,udev,linux-image-cloud-amd64,criu,python3,iproute2,procps,qemu-guest-agent,ca-certificates
DISK_SIZE=${SPRITED_VM_DISK:-6G}
STATE_SIZE=${SPRITED_VM_STATE_DISK:-4G}
OUT=target/vm
mkdir -p "$OUT"
for b in sprited sprite-env; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: cargo build first (or set SPRITED_BIN_DIR)"
done

hash_of() { sha256sum | cut -c1-16; }

# --- the base: debootstrap (cached) -----------------------------------------
base_key=$(printf '%s\n' "$SUITE" "$PACKAGES" "$MIRROR" "base-v1" | hash_of)
BASE="$OUT/base-$SUITE-$base_key"
if [ ! -f "$BASE/done" ]; then
  say "debootstrap $SUITE into $BASE (about a minute)"
  rm -rf "$BASE"
  mkdir -p "$BASE"
  if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE/rootfs" "$MIRROR" >"$BASE/debootstrap.log" 2>&1; then
    tail -n 20 "$BASE/debootstrap.log" >&2
    die "debootstrap failed (log: $BASE/debootstrap.log)"
  fi
  # Drop what the image does not need: package lists and caches.
  rm -rf "$BASE"/rootfs/var/cache/apt/archives/*.deb "$BASE"/rootfs/var/lib/apt/lists/*
  touch "$BASE/done"
fi

# --- the image: base + sprited (cached by the binaries' hashes) -------------
image_key=$(
  {
    echo "$base_key" "$TOKEN" "$DISK_SIZE" "image-v2"
    sha256sum "$BIN_DIR/sprited" "$BIN_DIR/sprite-env" packaging/sprited.service "$0" | cut -c1-64
  } | hash_of
)
IMG="$OUT/$SUITE-$image_key"
if [ ! -f "$IMG/done" ]; then
  say "packing $IMG"
  rm -rf "$IMG"
  mkdir -p "$IMG"
  root="$IMG/rootfs"
  cp -a "$BASE/rootfs" "$root"
  install -m 0755 "$BIN_DIR/sprited" "$BIN_DIR/sprite-env" "$root/usr/local/bin/"
  install -m 0644 packaging/sprited.service "$root/etc/systemd/system/sprited.service"
  install -d -m 0700 "$root/etc/sprited"
  # The guest's own OS is the environment's base; the state dir is a disk of
  # its own (/dev/vdb), so overlayfs accepts layers below the base's `/`.
  # The tests ask the environment's services on the guest's loopback: the
  # environment shares the guest's network (tests/network.rs covers its own).
  printf 'SPRITE_HTTP_API_TOKEN=%s\nSPRITE_NAME=%s\nSPRITED_LOG=sprited=debug,info\nSPRITED_ENV_BASE=/\nSPRITED_NETWORK=host\n' "$TOKEN" "vm-$SUITE" >"$root/etc/sprited/env"
  chmod 0600 "$root/etc/sprited/env"
  echo "vm-$SUITE" >"$root/etc/hostname"
  printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n/dev/vdb /.sprite ext4 rw 0 2\n' >"$root/etc/fstab"
  mkdir -p "$root/.sprite"
  # QEMU user networking: the guest is 10.0.2.15, the host 10.0.2.2.
  cat >"$root/etc/systemd/system/vm-net.service" <<'UNIT'
[Unit]
Description=Static address for QEMU user networking
DefaultDependencies=no
Before=network.target sprited.service
After=systemd-udevd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/ip link set lo up
ExecStart=/usr/sbin/ip link set eth0 up
ExecStart=/usr/sbin/ip addr add 10.0.2.15/24 dev eth0
ExecStart=/usr/sbin/ip route add default via 10.0.2.2

[Install]
WantedBy=multi-user.target
UNIT
  mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
  ln -sf /etc/systemd/system/sprited.service "$root/etc/systemd/system/multi-user.target.wants/sprited.service"
  ln -sf /etc/systemd/system/vm-net.service "$root/etc/systemd/system/multi-user.target.wants/vm-net.service"
  # qemu-guest-agent (how the tests reach the guest out of band: kill -9,
  # logs) starts by itself when its virtio port appears (udev).
  # Journal to the serial console, kept small.
  mkdir -p "$root/etc/systemd/journald.conf.d"
  printf '[Journal]\nForwardToConsole=yes\nMaxLevelConsole=info\n' >"$root/etc/systemd/journald.conf.d/console.conf"
  cp "$root"/boot/vmlinuz-* "$IMG/vmlinuz"
  cp "$root"/boot/initrd.img-* "$IMG/initrd.img"
  chmod 0644 "$IMG/vmlinuz" "$IMG/initrd.img"
  mkfs.ext4 -q -F -L root -d "$root" "$IMG/disk.raw" "$DISK_SIZE"
  # Every guest of an image is one fleet: its state disk starts with the
  # same checkpoint key, so a checkpoint taken in one guest restores its
  # processes in another (the key is not in the image's `/`, which is the
  # environment's base: the state dir is out of the environment's reach).
  state="$IMG/state-dir"
  install -d -m 0755 "$state"
  (umask 077 && head -c 32 /dev/urandom >"$state/checkpoint.key")
  mkfs.ext4 -q -F -L sprite -d "$state" "$IMG/state.raw" "$STATE_SIZE"
  rm -rf "$root" "$state"
  touch "$IMG/done"
  # Older images of this suite are not needed any more.
  for old in "$OUT/$SUITE"-*; do
    [ "$old" = "$IMG" ] || rm -rf "$old"
  done
fi
say "image: $IMG"
echo "$IMG"
