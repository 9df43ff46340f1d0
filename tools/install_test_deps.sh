#!/usr/bin/env bash
# Everything the tests need on a fresh Debian / Ubuntu machine, then nothing else:
# - Tesseract, the OCR reward's offline engine, and g++, which builds the native CPU Gram kernel
#   (marble_jax/cpu_kernels.py; without it the kernel's tests skip and XLA's path runs) (Debian packages; each
#   skipped when already on PATH);
# - the package with its `test` extra (pins the CPU build of torch), every package at the exact version of
#   tools/constraints.txt (the versions the suite was last green with; setup.py keeps only floors);
# - open_clip's model code, the HPSv2 parity oracle, without its dependencies (they pull torchvision
#   and, through it, a CUDA build of torch; the tests import only open_clip's model modules).
# `--refresh-pins` installs without the constraints (the newest versions the floors allow), to refresh them:
# run the tests, then write `python3 -m pip freeze --exclude-editable | sed 's/+cpu//' > tools/constraints.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(-c tools/constraints.txt)
[ "${1:-}" = "--refresh-pins" ] && PINS=()
MISSING=()
command -v tesseract > /dev/null || MISSING+=(tesseract-ocr)
command -v "${CXX:-g++}" > /dev/null || MISSING+=(g++)
if [ ${#MISSING[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q "${MISSING[@]}" > /dev/null || { $SUDO apt-get update -q > /dev/null && $SUDO apt-get install -y -q "${MISSING[@]}" > /dev/null; }
fi
python3 -m pip install -q "${PINS[@]}" -e ".[test]"
python3 -m pip install -q "${PINS[@]}" --no-deps "open_clip_torch==3.3.0"
