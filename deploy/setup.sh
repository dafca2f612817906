#!/usr/bin/env bash
# One-step set-up on a fresh machine: a venv in .venv with loraspool and its dependencies.
#   bash deploy/setup.sh          the package, for the demo and for real use
#   bash deploy/setup.sh --test   also the test tools, and (as root on Debian) samba, rclone and fuse3 for the
#                                 tests that run across two rclone mounts of a real SMB share, and systemd for
#                                 `systemd-analyze verify` of the worker's unit
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ "$want_test" = 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=()
  command -v smbd >/dev/null 2>&1 || missing+=(samba)
  command -v rclone >/dev/null 2>&1 || missing+=(rclone)
  command -v fusermount3 >/dev/null 2>&1 || missing+=(fuse3)
  command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} for the SMB and systemd-unit tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first and pinned: unpinned, a dependency would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
if [ "$want_test" = 1 ]; then
  "${pip[@]}" -e ".[test]"
else
  "${pip[@]}" -e .
fi
