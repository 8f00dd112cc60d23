#!/usr/bin/env bash
# The accelerator report in one call on a GPU (or TPU) machine, from the repository root:
#
#   bash tools/device_check.sh [extra llm.accelerator_report flags]
#
# Writes report.json, report.md and report.log into $OUT (the device tool's folder; elsewhere
# /tmp/accelerator_report). The report keeps itself within ~8 minutes and writes its files after
# each part; the timeout below (REPORT_TIMEOUT_S, default 540 s) is the hard stop, so a device
# call of 600 s returns whatever was measured. Needs jax with its GPU plugin, flax, optax,
# orbax-checkpoint and absl; not ml_collections, tensorflow or tensorflow-datasets.
set -uo pipefail
out="${OUT:-/tmp/accelerator_report}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
cd "$(dirname "$0")/.."
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$out/report.log"
timeout --signal=INT --kill-after=20 "${REPORT_TIMEOUT_S:-540}" \
  "$python" -m llm.accelerator_report --out="$out" "$@" 2>&1 | tee -a "$out/report.log"
status=${PIPESTATUS[0]}
echo "llm.accelerator_report exit status: $status (1: a correctness failure, 124/130: timeout)" \
  | tee -a "$out/report.log"
exit "$status"
