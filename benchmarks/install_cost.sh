#!/usr/bin/env bash
# Cold-install time and installed size of moeshrink's core and of moeshrink[eval], as a pip user gets
# them: for each, a fresh venv, torch first ($TORCH, the CPU wheel), then the wheel with its
# dependencies from $INDEX, with no pip cache and no pip configuration (mirrors, find-links) in the way.
#
#   make package && benchmarks/install_cost.sh dist/moeshrink-*.whl
#
# Prints one line per variant: seconds for torch and for the rest, the venv's size and its packages.
set -uo pipefail
WHEEL=${1:?usage: benchmarks/install_cost.sh dist/moeshrink-VERSION-py3-none-any.whl}
WHEEL=$(realpath "$WHEEL")
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
INDEX=${INDEX:-https://pypi.org/simple}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for variant in core eval; do
  venv=$WORK/$variant
  $PYTHON -m venv "$venv"
  start=$(date +%s.%N)
  # torch with this machine's pip configuration: PyPI's Linux torch is the CUDA build
  "$venv/bin/pip" install -q --no-cache-dir "$TORCH" || exit 1
  middle=$(date +%s.%N)
  spec=$WHEEL; [ "$variant" = eval ] && spec="$WHEEL[eval]"
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/pip" install -q --no-cache-dir --index-url "$INDEX" "$spec" || exit 1
  end=$(date +%s.%N)
  printf '%s: torch %.0f s, the rest %.0f s; %s MB installed, %s packages\n' "$variant" \
    "$(echo "$middle - $start" | bc)" "$(echo "$end - $middle" | bc)" "$(du -sm "$venv" | cut -f1)" \
    "$("$venv/bin/pip" list 2>/dev/null | tail -n +3 | wc -l)"
done
