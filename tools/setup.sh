#!/usr/bin/env bash
# Set up everything veloverlay needs on a Debian 12 machine, as root: Debian packages, then a
# virtualenv (made from Debian's world-readable /usr/bin/python3, so other uids can run it too)
# with the package and its test tools. Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# libcap-dev: python-prctl builds from source; gcc/make/python3-dev: it and the shim;
# attr: getfattr/setfattr for debugging; xfsprogs: a loop-mounted XFS for the reflink tests and
# benchmark rows (ext4 cannot share extents); hyperfine + time + git: benchmarks and their peers;
# docker-registry (CNCF distribution) + openssl: the registry the remote tests start, skopeo: reads
# what they push and is the remote benchmark's peer, as is ostree; zsh + fish: `enter`'s prompt
# marker is tested under each shell it supports; groff-base: the man page is checked with groff.
PKGS="libcap-dev gcc make python3-dev python3-venv attr xfsprogs hyperfine time git docker-registry openssl skopeo ostree zsh fish groff-base"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages:$missing" >&2
    echo "hint: run as root, or: sudo apt-get install -y$missing" >&2
    exit 1
  fi
  echo "setup: installing Debian packages:$missing" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  # The package starts a registry on :5000 (all interfaces) where systemd runs; the tests start
  # their own on 127.0.0.1, so the service is not wanted.
  if [[ " $missing " == *" docker-registry "* ]] && [ -d /run/systemd/system ]; then
    echo "setup: disabling the docker-registry service the package started (tests run their own)" >&2
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV from /usr/bin/python3" >&2
  /usr/bin/python3 -m venv "$VENV"
fi
# Reinstall when the build inputs change (setup.py builds the shim; it may not exist yet), or
# when what the install built into the checkout is gone (the shim's extension module).
stamp="$VENV/.installed-$(cat pyproject.toml $(ls setup.py shim/*.[ch] shim/Makefile 2>/dev/null) | sha256sum | cut -c1-16)"
built=yes
if [ -e setup.py ] && ! ls veloverlay/_veloshim*.so >/dev/null 2>&1; then
  built=no
fi
if [ ! -e "$stamp" ] || [ "$built" = no ]; then
  echo "setup: installing veloverlay and test tools into $VENV" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
