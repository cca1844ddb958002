# Sourced by the issue*_gpu.sh device scripts (from the repository root): $OUT and $RES made, the carried
# wheels (.whl/, .whl_fp8/, .whl_conv/, .whl_vae/) and this tree installed, the card, torch and commit recorded in
# $RES. SKIP_INSTALL=1: a dry run where the tree is installed already (e.g. on a CPU with PY=python).
OUT=${OUT:-out}
RES=${RES:-$(mktemp -d)}
PY=${PY:-python3}
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_INSTALL:-}" ]; then
  wheels=$(ls .whl/*.whl .whl_fp8/*.whl .whl_conv/*.whl .whl_vae/*.whl 2>/dev/null)
  if [ -n "$wheels" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
  fi
  # what an earlier call on this warm machine installed stays there: a call that carries other files uses it
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-build-isolation --no-deps -e . >"$RES/install.log" 2>&1 || { cat "$RES/install.log"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$RES/gpu.csv"
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" \
  | tee "$RES/versions.txt"
echo "commit ${GIT_COMMIT:-unknown}" >>"$RES/versions.txt"
