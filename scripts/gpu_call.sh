#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, run scripts/gpu_fanout.sh PARTS, print each
# launch's step times, and pack the small result files into $OUT/fan.tgz (the device returns few files).
#   scripts/gpu_call.sh PART...      (env as for gpu_fanout.sh; OUT is set by the device tool)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WORK=${WORK:-$PWD/.bench-work/rr}
res=/tmp/fan
mkdir -p "$res"
nvidia-smi --query-gpu=name,uuid,memory.total,memory.used --format=csv | tee "$res/gpus.csv"
timeout "${LIMIT:-560}" scripts/gpu_fanout.sh "$res" "$@"  # leave time to pack what came out
nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee "$res/left-processes.csv"
for launch in "$WORK"/runs-*/*/; do
  part=$(basename "$(dirname "$launch")")
  [ -f "$launch/summary.json" ] && { echo "== $part"; python3 scripts/step_times.py "$launch" | tee -a "$res/$part.steps.txt"; }
done
tar czf "$OUT/fan.tgz" -C "$res" .
