#!/usr/bin/env bash
# The root file system tests/test_systemd_unit.py boots: a minimal Debian bookworm with systemd,
# Python 3.11 and quantad's dependencies in /opt/quantad/venv (where docs/service.md installs them),
# and the unit that runs the checks at boot.  Built by `make systemd-test` and CI only, once per key:
# a hash of the unit, the Makefile, the pins, this script and the check unit.  quantad itself is
# not in it: the test installs the working tree's wheel at each boot (into a throw-away overlay).
#
#   tests/systemd/build-root.sh ROOT VENV
#
# The dependencies are copied from VENV (the one `make install` built, llama.cpp's libraries
# included) rather than fetched again: a second torch download and llama.cpp build would cost
# ~10 minutes for the same files.  Needs root (mmdebstrap, chroot); without it, or without a
# Python 3.11 VENV, it says why and builds nothing, and the test is skipped with that reason.
set -euo pipefail
root=${1:?ROOT} venv=${2:?VENV}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
key=$(cat "$repo/deploy/quantad.service" "$repo/Makefile" "$repo/constraints.txt" "$here/build-root.sh" \
	"$here/quantad-check.service" | sha256sum | cut -c1-16)
stamp="$root/.quantad-root-key"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
	echo "systemd root: $root (cached, key $key)"
	exit 0
fi
if [ "$(id -u)" != 0 ]; then
	echo "systemd root: not built (mmdebstrap and systemd-nspawn need root): tests/test_systemd_unit.py is skipped"
	exit 0
fi
site=$("$venv/bin/python" -c 'import sys, sysconfig; assert sys.version_info[:2] == (3, 11); print(sysconfig.get_path("purelib"))') || {
	echo "systemd root: not built (Debian bookworm's Python is 3.11; $venv is not): tests/test_systemd_unit.py is skipped"
	exit 0
}
missing=
command -v mmdebstrap >/dev/null 2>&1 || missing=mmdebstrap
command -v systemd-nspawn >/dev/null 2>&1 || missing="$missing systemd-container"
if [ -n "$missing" ]; then
	echo "systemd root: installing$missing (apt)"
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The host's own Debian sources when it runs bookworm (its mirror or proxy applies), else mmdebstrap's default.
sources=()
if grep -qs '^VERSION_CODENAME=bookworm' /etc/os-release; then
	for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
		if [ -s "$f" ]; then sources=("$f"); break; fi
	done
fi
tmp="$root.tmp"
rm -rf "$tmp" "$root"
t0=$(date +%s)
echo "systemd root: building $root (mmdebstrap bookworm, ~30 s, then the venv, ~1 minute)"
mmdebstrap --quiet --variant=minbase \
	--include=systemd,systemd-sysv,dbus,passwd,python3.11,python3.11-venv,libgomp1 \
	bookworm "$tmp" "${sources[@]}" </dev/null
chroot "$tmp" /usr/bin/python3.11 -m venv --without-pip /opt/quantad/venv
dest="$tmp/opt/quantad/venv/lib/python3.11/site-packages"
cp -a "$site/." "$dest/"
# The working tree's editable install stays out: the test installs quantad's wheel itself.
rm -rf "$dest"/__editable__*quantad* "$dest"/quantad-*.dist-info
chroot "$tmp" /opt/quantad/venv/bin/python -c 'import llama_cpp, torch, transformers, zmq' ||
	{ echo "systemd root: the copied venv does not import in the root"; exit 1; }
install -m 0644 "$here/quantad-check.service" "$tmp/etc/systemd/system/quantad-check.service"
chroot "$tmp" systemctl enable quantad-check.service >/dev/null 2>&1
echo "$key" >"$tmp/.quantad-root-key"
mv "$tmp" "$root"
echo "systemd root: $root built in $(($(date +%s) - t0)) s ($(du -sh "$root" | cut -f1))"
