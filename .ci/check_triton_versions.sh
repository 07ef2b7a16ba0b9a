#!/usr/bin/env bash
# CI: every config of the AOT job list (python -m sparseq.kernels.aot) compiles for sm_80 and
# sm_90 under the oldest and the newest supported Triton, with no local memory (spills) and
# the GEMMs' main loops on the tensor cores. No GPU needed. The newest is the venv's (what
# torch 2.14 pins); the oldest (3.6.0, what torch 2.10 and 2.11 pin) is installed into a side
# folder, kept between runs, and put first on PYTHONPATH. Inputs: VENV, TRITON_OLDEST,
# SPARSEQ_TRITON_SIDE (the side folders' root, default ~/.cache/sparseq-triton).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OLDEST=${TRITON_OLDEST:-3.6.0}
side=${SPARSEQ_TRITON_SIDE:-${XDG_CACHE_HOME:-$HOME/.cache}/sparseq-triton}/$OLDEST
unset TRITON_INTERPRET PYTHONPATH

is_side_triton() {
  PYTHONPATH="$side" "$PY" -c "
import os, sys, triton
sys.exit(triton.__version__ != '$OLDEST' or not os.path.realpath(triton.__file__).startswith(os.path.realpath('$side')))" 2>/dev/null
}
if ! is_side_triton; then
  rm -rf "$side.partial" "$side" && mkdir -p "$(dirname "$side")"
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps --target "$side.partial" "triton==$OLDEST"
  mv "$side.partial" "$side"
  is_side_triton || { echo "check_triton_versions: $side does not import as triton $OLDEST" >&2; exit 1; }
fi

# Both Tritons at once (one compiler process each), each into its own log.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
start=$(date +%s)
"$PY" -m sparseq.kernels.aot --arch 90 --arch 80 >"$logs/newest" 2>&1 & newest=$!
PYTHONPATH="$side" "$PY" -m sparseq.kernels.aot --arch 90 --arch 80 >"$logs/oldest" 2>&1 & oldest=$!
rc_newest=0; wait "$newest" || rc_newest=$?
rc_oldest=0; wait "$oldest" || rc_oldest=$?
cat "$logs/newest" "$logs/oldest"
echo "check_triton_versions: $(( $(date +%s) - start )) s"
if [ "$rc_newest" != 0 ] || [ "$rc_oldest" != 0 ]; then
  echo "check_triton_versions: FAILED (the 'aot: FAILED' lines above name the configs)" >&2
  exit 1
fi
echo "check_triton_versions: every AOT config passed under both Tritons"
