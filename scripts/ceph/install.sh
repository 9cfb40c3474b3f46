#!/usr/bin/env bash
# Installs what the RBD tests need (as root, Debian 12): the Ceph daemons and
# tools for scripts/ceph/cluster.sh, librbd/librados headers for the `rbd`
# crate, and qemu-block-extra (qemu-storage-daemon's `rbd` driver) at exactly
# the installed qemu-utils version. That version comes from the backports
# suite; its apt entry is derived from the system's own Debian sources (same
# archive, suite <codename>-backports), never written here by host name.
# A qemu-block-extra that cannot be had is reported, not fatal: the tests
# then skip only the side-by-side comparisons and say so.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
for t in ceph-mon ceph-osd ceph rbd; do command -v "$t" >/dev/null || need+=(ceph-mon ceph-osd ceph-common); done
[ -f /usr/include/rbd/librbd.h ] || need+=(librbd-dev)
[ -f /usr/include/rados/librados.h ] || need+=(librados-dev)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
fi
qv=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
[ -n "$qv" ] || exit 0
if [ "$(dpkg-query -W -f '${Version}' qemu-block-extra 2>/dev/null || true)" = "$qv" ]; then exit 0; fi
. /etc/os-release
list=/etc/apt/sources.list.d/sluice-backports.sources
if ! grep -rqs "${VERSION_CODENAME}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  # The archive that serves the main suite (deb822 or one-line sources).
  uri=$(awk -v s="$VERSION_CODENAME" '
    /^URIs:/ {u=$2} /^Suites:/ {for (i=2;i<=NF;i++) if ($i==s) {print u; exit}}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk -v s="$VERSION_CODENAME" '$1=="deb" && $3==s {print $2; exit}' \
    /etc/apt/sources.list 2>/dev/null || true)
  if [ -z "$uri" ]; then echo "no Debian source for $VERSION_CODENAME: qemu-block-extra not installed" >&2; exit 0; fi
  printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" "$VERSION_CODENAME" >"$list"
  apt-get update -qq || true
fi
apt-get install -y -qq --no-install-recommends "qemu-block-extra=$qv" ||
  echo "qemu-block-extra=$qv cannot be installed: the qemu-storage-daemon rbd comparisons will skip" >&2
