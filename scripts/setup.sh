#!/usr/bin/env bash
# Set up a fresh machine for unite: a virtualenv in .venv with the project and its pinned
# dependencies (torch 2.14.1 + torchvision 0.29.1; pip takes them from the local disk where the
# machine has them), and the MOSES molecules for data.dataset=moses3d: the molsets 0.3.1 wheel from PyPI,
# pinned by sha256, kept as a data file in .venv/share/unite/ (read as a zip; never installed: its own
# dependencies are old and unneeded). With --test, also the browser used by the UI test (Debian's chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
# Keep in step with MOSES_WHEEL / MOSES_WHEEL_SHA256 in unite_core/data/moses.py (a test checks it).
MOSES_DIR=.venv/share/unite
if [ ! -f "$MOSES_DIR/molsets-0.3.1-py3-none-any.whl" ]; then
  mkdir -p "$MOSES_DIR"
  .venv/bin/python -m pip download -q --no-deps --only-binary :all: --require-hashes -d "$MOSES_DIR" \
    -r /dev/stdin <<'REQ'
molsets==0.3.1 --hash=sha256:7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34
REQ
fi
if [ "${1:-}" = "--test" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "setup: chromium is not installed and this user cannot apt-get it; the UI test will be skipped" >&2
    fi
  fi
fi
# DVC needs a git repository; a fresh clone has one, a tarball does not.
if ! git rev-parse --git-dir >/dev/null 2>&1; then
  git init -q && git add -A && git -c user.name=unite -c user.email=unite@localhost commit -qm "initial import"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
