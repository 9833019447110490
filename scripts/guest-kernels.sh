#!/usr/bin/env bash
# Fetches the kernels of the guest lab, Debian's 6.1 and 6.12 cloud kernels (the newest of each
# series the Debian mirror serves), with their modules, into the cache outside the clone;
# later runs reuse them. Installs qemu, busybox-static and cpio first (scripts/deps.sh guest).
#
#   dir=$(scripts/guest-kernels.sh | tail -1)   # $dir/<series>/{vmlinuz,release,modules/}
#
# Progress goes to stderr; the last line of stdout is the kernels dir.
# Cache root: $PODSHAPER_CACHE (default /var/cache/podshaper).
set -euo pipefail

SERIES=(6.1 6.12)

here=$(dirname "$0")
root=${PODSHAPER_CACHE:-/var/cache/podshaper}
dir=$root/kernels

log() { echo "guest-kernels: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

"$here/deps.sh" guest >&2
mkdir -p "$dir" || die "cannot create $dir; set PODSHAPER_CACHE to a writable dir"
exec 9>"$dir/.lock"
flock 9

for s in "${SERIES[@]}"; do
  out=$dir/$s
  if [[ -f $out/vmlinuz && -s $out/release ]]; then
    continue
  fi
  # linux-image-6.1.0-57-cloud-amd64(-unsigned), linux-image-6.12.117+deb12-cloud-amd64: the
  # newest version of the series; signed or not, the image is the same.
  re="^linux-image-${s//./\\.}[.-][^ ]*-cloud-amd64(-unsigned)?\$"
  newest() { apt-cache search --names-only "$re" | awk '{print $1}' | sort -V | tail -1; }
  pkg=$(newest)
  if [[ -z $pkg ]]; then
    # No package lists yet (a fresh image): fetch them once.
    apt-get update -qq >&2
    pkg=$(newest)
  fi
  [[ -n $pkg ]] || die "no Debian package matches $re"
  log "fetching $pkg"
  tmp=$(mktemp -d "$dir/.fetch-XXXXXX")
  (cd "$tmp" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
  dpkg-deb -x "$tmp"/*.deb "$tmp/x"
  release=$(ls "$tmp/x/lib/modules")
  mkdir -p "$tmp/out"
  cp "$tmp/x/boot/vmlinuz-$release" "$tmp/out/vmlinuz"
  mv "$tmp/x/lib/modules/$release" "$tmp/out/modules"
  echo "$release" >"$tmp/out/release"
  rm -rf "$out"
  mv "$tmp/out" "$out"
  rm -rf "$tmp"
  log "$s: $release"
done
echo "$dir"
