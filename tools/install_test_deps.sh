#!/usr/bin/env bash
# Everything the tests need on a fresh Debian / Ubuntu machine, then nothing else:
# - Tesseract, the OCR reward's offline engine (Debian package; skipped when already on PATH);
# - the package with its `test` extra (pins the CPU build of torch);
# - open_clip's model code, the HPSv2 parity oracle, without its dependencies (they pull torchvision
#   and, through it, a CUDA build of torch; the tests import only open_clip's model modules).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v tesseract > /dev/null; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q tesseract-ocr > /dev/null || { $SUDO apt-get update -q > /dev/null && $SUDO apt-get install -y -q tesseract-ocr > /dev/null; }
fi
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps "open_clip_torch==3.3.0"
