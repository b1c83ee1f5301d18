#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, run scripts/gpu_fanout.sh PARTS, print each
# launch's step times, and pack the small result files into $OUT/fan.tgz (the device returns few files).
#   scripts/gpu_call.sh PART...              (env as for gpu_fanout.sh; OUT is set by the device tool)
#   PARALLEL=1 scripts/gpu_call.sh A B ...   part i alone on GPU i and the i-th equal share of the cores,
#                                            each with its own work folder (two benches at once on 2 GPUs)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WORK=${WORK:-$PWD/.bench-work/rr}
res=/tmp/fan
mkdir -p "$res"
nvidia-smi --query-gpu=name,uuid,memory.total,memory.used --format=csv | tee "$res/gpus.csv"
if [ "${PARALLEL:-0}" = 1 ]; then
  cores=$(nproc) i=0
  share=$((cores / $#))
  for part in "$@"; do
    first=$((i * share))
    CUDA_VISIBLE_DEVICES=$i WORK=$WORK-$i timeout "${LIMIT:-560}" taskset -c "$first-$((first + share - 1))" \
      scripts/gpu_fanout.sh "$res" "$part" > "$res/part$i.out" 2>&1 &
    i=$((i + 1))
  done
  wait
  echo "$cores cores, $share per part"
else
  timeout "${LIMIT:-560}" scripts/gpu_fanout.sh "$res" "$@"  # leave time to pack what came out
fi
nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee "$res/left-processes.csv"
for launch in "$WORK"*/runs-*/*/; do
  part=$(basename "$(dirname "$launch")")
  [ -f "$launch/summary.json" ] && { echo "== $part"; python3 scripts/step_times.py "$launch" | tee -a "$res/$part.steps.txt"; }
done
tail -n 30 "$res"/*.log
tar czf "$OUT/fan.tgz" -C "$res" .
