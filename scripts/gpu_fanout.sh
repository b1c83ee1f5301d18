#!/usr/bin/env bash
# The GPU runs of docs/benchmarks.md: the benchmark (bench7b, bench2b), every recipe on its own GPU
# at the 2B and 7B shapes (random weights, src/fixtures/shapes.py; 4 GPUs), r3 alone for the makespan,
# two recipes on two GPUs against the longer alone (pair, pairalone), one 7B recipe sharded over two
# GPUs, and a real out-of-memory retry. Run from the repo root:
#
#   scripts/gpu_fanout.sh OUT_DIR PART...   PART: gputests setup setuptests bench7b bench2b 2b 7b alone pair pairalone shard oom
#                                                  queue1 pack1 both1 pack2 ddp ddpalone pack1mps pairs pairoff
#                                                  step7b step2b compile7b varlen7b varlen2b
#                                                  compilevar7b cands7b final7b final2b r1c2b offload7b
#                                                  fit7b q2b q7b off7b attn7b r12c7b hp7b r3p7b eager7b
#                                                  quiet7b mem7b r13q7b mem8 r24q7b low7b
#                                                  search7b-untuned search7b search2b-untuned search2b
#                                                  evalmixed7b ttr7b q3vl q3vl2 q3vl3
#                                                  mixed7b mixed7bu trial7b underload plan2b
#
# gputests runs every GPU test of the suite (`pytest tests -m gpu`): run it whenever training, evaluation or
# the planner change. The placement runs (issue "use every GPU"): r1-r4 queued one at a time on one GPU (queue1: --pack off),
# packed on one GPU (pack1) and on two (pack2), all 7B, STEPS steps (60 for the issue's figures), batch 4,
# no evaluation; both1 runs queue1 on gpu0 and pack1 on gpu1 at the same time (two launchers, half the
# device time); r4 as two data-parallel processes on two GPUs (ddp) against one GPU (ddpalone), 16 samples
# a step. pairs: the pair and r4 alone on each of its two GPUs, ROUNDS rounds (3; STEPS=20 fits one call);
# pairoff: the pair once more with --pin-cpus off.
# step7b, step2b, compile7b, varlen7b, varlen2b, compilevar7b, cands7b, final7b, final2b: `recipe-run bench`
# rows of the issue "training speed" (each fits one call; PARALLEL=1 scripts/gpu_call.sh A B runs two at
# once, one per GPU).
#
# RECIPE_RUN (default `python3 -m recipe_runner`), WORK (default /tmp/rr), STEPS (default 10) and
# ALONE_SHAPE (the model of the `alone` run, default 2b) and SHAPES (the models `setup` builds, default
# "2b 7b") can be set in the environment. Each part writes OUT_DIR/<part>.log and copies the launch's small
# files (summary, report, logs, status files; no weights) to OUT_DIR/<part>/.
set -euo pipefail
out=${1:?usage: scripts/gpu_fanout.sh OUT_DIR PART...}
shift
work=${WORK:-/tmp/rr}
steps=${STEPS:-10}
read -r -a recipe_run <<< "${RECIPE_RUN:-python3 -m recipe_runner}"
mkdir -p "$out" "$work"
common=(--dataset "$work/data" --max-steps "$steps" --batch-size 4 --no-wandb --save-steps 0)

keep() {  # copy a launch's small files (no weights) to $out/$1
  local launch
  launch=$(ls -d "$work/runs-$1"/*/ | tail -n 1)
  mkdir -p "$out/$1"
  (cd "$launch" && find . -name '*.json' -o -name '*.log' -o -name '*.md' -o -name '*.png' -o -name '*.jsonl' \
    | grep -v '/trainer/\|/merged/\|/adapter/' | tar -cf - -T - ) | tar -xf - -C "$out/$1"
}

launch() {  # launch NAME ARGS...: one timed recipe-run, output to $out/NAME.log
  local name=$1
  shift
  local start=$SECONDS
  "${recipe_run[@]}" "$@" --output-dir "$work/runs-$name" 2>&1 | tee "$out/$name.log" || true
  echo "wall seconds: $((SECONDS - start))" | tee -a "$out/$name.log"
  keep "$name"
}

gpu_tests() {  # gpu_tests NAME FILE...: the files' GPU tests, to $out/NAME.log; a failure is reported there and
  # the part goes on to its benches (their rows do not depend on the tests)
  local name=$1
  shift
  python3 -m pytest "$@" -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/$name.log" || true
}

step_bench() {  # step_bench NAME ARGS...: one `src.bench` run at 16 samples a step, to $out/NAME(.log)
  local name=$1
  shift
  python3 -m src.bench "$@" --samples-per-step 16 --warmup 2 --steps 5 --work "$work" --out "$out/$name" 2>&1 \
    | tee "$out/$name.log"
}

build_shape() {  # build_shape SHAPE: the random model into $work/SHAPE (where src.bench looks), whole or not at all
  [ -f "$work/$1/config.json" ] && return
  python3 -m src.fixtures.shapes --shape "$1" --out "$work/$1.part" > "$out/build-$1.log" 2>&1 \
    && mv "$work/$1.part" "$work/$1"
}

for part in "$@"; do
  case $part in
    setup)
      nvidia-smi -L | tee "$out/gpus.txt"
      { nvidia-smi topo -m; lscpu; } > "$out/topology.txt" 2>&1 || true
      python3 -c "from src.fixtures.synthetic import write_dataset; write_dataset('$work/data', train=64, test=16, size=(644, 476))"
      for shape in ${SHAPES:-2b 7b}; do
        [ -f "$work/$shape/config.json" ] || python3 -m src.fixtures.shapes --shape "$shape" --out "$work/$shape"
      done ;;
    search7b-untuned|search2b-untuned)  # issue "fair verdict": r1-r4 at their own rates, one GPU (the cost's
      # reference), at the shape the part names
      shape=${part#search}
      launch "$part" --recipes all --gpus 0 --model-id "$work/${shape%-untuned}" "${common[@]}" --eval-samples 16 ;;
    search7b|search2b)  # the same launch as a 5-rate search with halving 3, same steps and data, one GPU
      "${recipe_run[@]}" plan --recipes all --gpus 0 --model-id "$work/${part#search}" "${common[@]}" --lr-search \
        2>&1 | tail -n 12 | tee "$out/$part-plan.log"
      launch "$part" --recipes all --gpus 0 --model-id "$work/${part#search}" "${common[@]}" --eval-samples 16 \
        --lr-search ;;
    evalmixed7b)  # issue "speed on real data": evaluation of 256 images of COCO's sizes with 64-token answers
      # (the 7B of `setup`), batched by size: the models' own attention and the fast attention (both profiled),
      # then the fast attention with the static cache (~5 min)
      python3 -m src.bench.decoding --model-dir "$work/7b" --image-sizes mixed --samples 256 --max-new-tokens 64 \
        --paths sorted,fast,fast-static --profile sorted,fast --out "$work/evalmixed7b" 2>&1 \
        | tee "$out/evalmixed7b.log" || true
      mkdir -p "$out/evalmixed7b"
      cp "$work"/evalmixed7b/eval_bench.* "$work"/evalmixed7b/profile-decode-* "$out/evalmixed7b/" || true ;;
    q3vl)  # issue "Qwen3-VL": every GPU test while the random Qwen3-VL-8B is built beside them, then 8B r4
      # compiled against the bare loop at its best, planned against measured peak in each row (~9 min)
      build_shape qwen3-vl-8b &
      built=$!
      gpu_tests gputests tests
      wait "$built"
      step_bench q3vl --shape qwen3-vl-8b --recipes r4 --variants plain,fast+compile ;;
    q3vl2)  # Qwen3-VL-8B r2 and r1 (QLoRA) compiled against the bare loop (~9 min)
      step_bench q3vl2 --shape qwen3-vl-8b --recipes r2,r1 --variants plain,fast+compile ;;
    q3vl3)  # Qwen3-VL-8B r3's two stages compiled against the bare loop (~6 min)
      step_bench q3vl3 --shape qwen3-vl-8b --recipes r3 --variants plain,fast+compile ;;
    mixed7b)  # issue "speed on real data": 7B r4 on COCO's common sizes, the bare loop at its best (file order)
      # against the core compiled with micro-batches of one size, profiled (~4 min)
      step_bench mixed7b --shape 7b --recipes r4 --image-sizes mixed --variants plain,fast+compile \
        --profile fast+compile ;;
    mixed7bu)  # the same core compiled in plain shuffled order (what grouping buys); one size, both sides (~5 min)
      step_bench mixed7bu --shape 7b --recipes r4 --image-sizes mixed --variants fast+compile-ungrouped
      step_bench one7b --shape 7b --recipes r4 --variants plain,fast+compile ;;
    trial7b)  # issue "fair verdict": where a search trial's time goes: 7B r4 and r1 as one first-rung trial each
      # (3 of 30 steps, then scored on the validation split), every log line stamped with seconds since start
      for recipe in r4 r1; do
        python3 -m src.training.worker --recipe "$recipe" --gpu 0 --model-id "$work/7b" --dataset "$work/data" \
          --max-steps 30 --pause-at 3 --batch-size 4 --eval-split validation --val-fraction 0.1 --no-wandb \
          --save-steps 0 --output-dir "$work/trial-$recipe" 2>&1 | python3 scripts/stamp_lines.py \
          | grep -v Warning | tee "$out/trial7b-$recipe.log"
      done ;;
    underload)  # issue "packing you can trust": r1-r4 with --batch-size auto packed on GPU 0, and 20 s later a
      # second launcher packing r2 and r4 onto the same GPU (SHAPE, default 2b; STEPS steps; evaluation on 16
      # images): every job should succeed, none retried for a neighbour, each peak within its reservation
      flags=(--gpus 0 --model-id "$work/${SHAPE:-2b}" --dataset "$work/data" --max-steps "$steps" --batch-size auto
        --no-wandb --save-steps 0 --eval-samples 16 --plain)
      launch underload-a --recipes all "${flags[@]}" &
      sleep 20
      launch underload-b --recipes r2,r4 "${flags[@]}"
      wait ;;
    plan2b)  # issue "packing you can trust": 2B, every recipe and stage eager at the planner's setting (fast) and
      # with recompute (lean), planned against measured peak and step in each row (~4 min)
      step_bench plan2b --shape 2b --recipes r1,r2,r3,r4 --variants fast,lean ;;
    ttr7b)  # issue "speed on real data": a user's whole run at the defaults, evaluation on: r1-r4 at 7B packed
      # onto GPU 0, then queued one at a time (--pack off); STEPS steps (60 for the issue's figure; ~8 min)
      user=(--recipes all --gpus 0 --model-id "$work/7b" --dataset "$work/data" --max-steps "$steps" --no-wandb
        --save-steps 0 --plain)
      "${recipe_run[@]}" plan "${user[@]}" 2>&1 | tail -n 3 | tee "$out/ttr7b-plan.log"
      launch ttr7b-pack "${user[@]}"
      launch ttr7b-off "${user[@]}" --pack off ;;
    setuptests)  # setup (building the random models on the GPU) beside every GPU test, to save a call's minutes
      "$0" "$out" setup > "$out/setup.log" 2>&1 &
      gpu_tests gputests tests
      wait ;;
    gputests)  # every test marked gpu (run it whenever training, evaluation or the planner change; ~4 min)
      gpu_tests gputests tests ;;
    2b)  # `make all-recipes` on a pseudo-terminal, so the live status table is drawn; `script` keeps it
      script -qfec "make all-recipes RECIPE_RUN='${recipe_run[*]}' GPUS=0,1,2,3 MODEL=$work/2b \
        DATASET=$work/data ARGS='${common[*]:2} --output-dir $work/runs-2b'" "$out/2b.tty" > /dev/null || true
      keep 2b ;;
    7b)
      start=$SECONDS
      make all-recipes RECIPE_RUN="${recipe_run[*]}" GPUS=0,1,2,3 MODEL="$work/7b" DATASET="$work/data" \
        ARGS="${common[*]:2} --plain --output-dir $work/runs-7b" 2>&1 | tee "$out/7b.log" || true
      echo "wall seconds: $((SECONDS - start))" | tee -a "$out/7b.log"
      keep 7b ;;
    bench7b)  # the ladder where the levers differ (r1: frozen tower; r4: everything trains), r2 plainly
      python3 -m src.bench --shape 7b --recipes r1,r4 --ladder ${BENCH_FLAGS:-} --work "$work" --out "$out/bench7b" \
        2>&1 | tee "$out/bench7b.log"
      python3 -m src.bench --shape 7b --recipes r2 --work "$work" --out "$out/bench7b-r2" 2>&1 | tee -a "$out/bench7b.log" ;;
    bench2b)
      python3 -m src.bench --shape 2b --recipes r1,r2,r4 --work "$work" --out "$out/bench2b" 2>&1 | tee "$out/bench2b.log" ;;
    step7b)  # issue "training speed": the core against the bare loop, 3 interleaved rounds, profiled (~5 min)
      step_bench step7b --shape 7b --recipes r4 --variants plain,fast --rounds 3 --profile plain,fast ;;
    step2b)  # every recipe at 2B, 2 rounds (~4 min)
      step_bench step2b --shape 2b --recipes r1,r2,r3,r4 --variants plain,fast --rounds 2 --profile plain,fast ;;
    varlen7b)  # the vision tower's varlen attention: its GPU tests, then fast with and without it (~6 min)
      gpu_tests gputests tests/unit/src/models/test_vision_attention.py tests/gpu
      step_bench varlen7b --shape 7b --recipes r4 --variants plain,fast,fast+varlen --rounds 2 --profile fast ;;
    varlen2b)  # the same at 2B, every recipe (~8 min)
      step_bench varlen2b --shape 2b --recipes r1,r2,r3,r4 --variants plain,fast,fast+varlen --rounds 2 --profile fast ;;
    compilevar7b)  # compiled, with and without the varlen vision attention (~8 min)
      step_bench compilevar7b --shape 7b --recipes r4 --variants plain,fast+compile,fast+compile-varlen ;;
    cands7b)  # the planner's top three settings against the bare loop: "within 5% of the fastest" (~8 min)
      step_bench cands7b --shape 7b --recipes r4 --variants plain --candidates ;;
    final7b)  # r4 compiled at lean's memory (the 18 GiB target), then r2 compiled against its bare loop (~6 min)
      step_bench lean7b --shape 7b --recipes r4 --variants lean+compile
      step_bench r2c7b --shape 7b --recipes r2 --variants plain,fast+compile ;;
    final2b)  # 2B r1, r2, r3, r4 compiled against the bare loop (~7 min)
      step_bench c2b --shape 2b --recipes r1,r2,r3,r4 --variants plain,fast+compile ;;
    r24q7b)  # 7B r2 and r4 compiled against the bare loop, with this session's defaults (~8 min)
      step_bench r24q7b --shape 7b --recipes r2,r4 --variants plain,fast+compile ;;
    r1c2b)  # 2B r1 (QLoRA) compiled with and without its 4-bit decoder layers (~3 min)
      step_bench r1c2b --shape 2b --recipes r1 --variants plain,fast+compile,fast+compile4bit ;;
    fit7b)  # 7B r4: the planner's top three with compiled memory counted (16x1 compiled first), the first profiled
      step_bench fit7b --shape 7b --recipes r4 --variants plain --candidates --profile cand1 ;;
    q2b)  # QLoRA dequantized once: its GPU tests (and offloading's), then 2B r1 and r3 compiled (~7 min)
      gpu_tests qtests tests/unit/src/models/test_dequantize.py tests/unit/src/training/test_offload.py
      step_bench q2b --shape 2b --recipes r1 --variants plain,fast+compile,fast+compile-dequant
      step_bench r3c2b --shape 2b --recipes r3 --variants plain,fast+compile ;;
    q7b)  # 7B r1 and r3's two stages compiled against the bare loop (~7 min)
      step_bench q7b --shape 7b --recipes r1,r3 --variants plain,fast+compile ;;
    off7b)  # 7B r4 at 8x2 with recompute, compiled, with and without offloading: the 18 GiB target (~5 min)
      step_bench off7b --shape 7b --recipes r4 --variants lean+compile,lean+offload+compile --lean-micro-batch 8 ;;
    attn7b)  # vision attention by kernel (src.bench.attention), its GPU tests, then 7B r4 compiled with
      # images of one size batched (cuDNN) and through the varlen kernel (~8 min)
      python3 -m src.bench.attention --out "$out/attention.json" 2>&1 | tee "$out/attention.log" || true
      gpu_tests attntests tests/unit/src/models/test_vision_attention.py
      step_bench batched7b --shape 7b --recipes r4 --variants plain,fast+compile,fast+compile-batched \
        --profile fast+compile ;;
    r12c7b)  # 7B r2 and r1 compiled (images batched) against the bare loop (~7 min)
      step_bench r12c7b --shape 7b --recipes r2,r1 --variants plain,fast+compile ;;
    hp7b)  # 7B r1 and r4 compiled, with and without positions worked out on the host (~9 min)
      step_bench hp7b --shape 7b --recipes r1,r4 --variants plain,fast+compile-host-positions,fast+compile ;;
    r3p7b)  # 7B r3 as a chain and r1 compiled against the bare loop, profiled (~9 min)
      step_bench r3p7b --shape 7b --recipes r3,r1 --variants plain,fast+compile --profile fast+compile ;;
    quiet7b)  # 7B r1 compiled, with the loss read back every step and every 10, both profiled (~4 min;
      # run 2026-12-01 as fast+compile and fast+compile+quiet, the names of then)
      step_bench quiet7b --shape 7b --recipes r1 --variants fast+compile-log1,fast+compile \
        --profile fast+compile-log1,fast+compile ;;
    mem8)  # the 18 GiB target at 8x2 (recompute on, compiled): offloading's GPU tests, then 7B r4
      # offloaded (copies on a side stream, prefetched) and not offloaded (~7 min)
      gpu_tests offloadtests tests/unit/src/training/test_offload.py
      step_bench mem8 --shape 7b --recipes r4 --variants lean+offload+compile,lean+compile --lean-micro-batch 8 ;;
    low7b)  # the low-memory settings through `recipe-run` (run `setup` first, SHAPES=7b): offloading's GPU
      # tests, 7B r4 at 8x2 offloaded and compiled, then r1 at its smallest setting (~8 min)
      gpu_tests offloadtests tests/unit/src/training/test_offload.py
      launch off8 --recipes r4 --gpus 0 --model-id "$work/7b" "${common[@]}" --skip-eval --batch-size 8 \
        --grad-accum 2 --compile on --offload-activations --max-steps 12
      launch r1small --recipes r1 --gpus 0 --model-id "$work/7b" "${common[@]}" --skip-eval --batch-size 1 \
        --grad-accum 16 --gradient-checkpointing on --dequantize-once off --max-steps 5 ;;
    r13q7b)  # 7B r3 as a chain and r1, compiled (loss read every 10 steps), against the bare loop, profiled (~8 min)
      step_bench r13q7b --shape 7b --recipes r3,r1 --variants plain,fast+compile --profile fast+compile ;;
    mem7b)  # the 18 GiB target: 7B r4 compiled with recompute at 4x4, then at 8x2 offloaded (~6 min)
      step_bench mem4 --shape 7b --recipes r4 --variants lean+compile --lean-micro-batch 4
      step_bench mem8 --shape 7b --recipes r4 --variants lean+offload+compile --lean-micro-batch 8 ;;
    eager7b)  # not yet run: eager 7B r4 and r2 with the model's own vision attention (fast) and with one call
      # a block (fast+varlen: batched cuDNN for images of one size), to decide eager runs' default (~6 min)
      step_bench eager7b --shape 7b --recipes r4,r2 --variants fast,fast+varlen ;;
    offload7b)  # not yet run: activation offloading's GPU test, then 7B r4 16x1 with recompute, offloaded
      gpu_tests offloadtests tests/unit/src/training/test_offload.py
      step_bench offload7b --shape 7b --recipes r4 --variants lean,lean+offload,lean+compile,lean+offload+compile \
        --lean-micro-batch 16 ;;
    compile7b)  # compiled rows, alone in their call: each compiles for 130-190 s cold (~8 min)
      step_bench compile7b --shape 7b --recipes r4 --variants plain,fast+compile,lean+compile ;;
    pair) launch pair --recipes r2,r4 --gpus 0,1 --model-id "$work/7b" "${common[@]}" --skip-eval --plain ;;
    pairs)  # the "two recipes on two GPUs" criterion, ROUNDS rounds (3): the pair, then r4 alone on each GPU
      for round in $(seq "${ROUNDS:-3}"); do
        launch "pair-$round" --recipes r2,r4 --gpus 0,1 --model-id "$work/7b" "${common[@]}" --skip-eval --plain
        for gpu in 0 1; do
          launch "pairalone$gpu-$round" --recipes r4 --gpus "$gpu" --model-id "$work/7b" "${common[@]}" --skip-eval --plain
        done
      done ;;
    pairoff) launch pairoff --recipes r2,r4 --gpus 0,1 --model-id "$work/7b" "${common[@]}" --skip-eval --plain \
      --pin-cpus off ;;  # the pair with its workers free to run on any core (what pinning buys)
    pairalone) launch "pairalone${ALONE_GPU:-0}" --recipes r4 --gpus "${ALONE_GPU:-0}" --model-id "$work/7b" "${common[@]}" \
      --skip-eval --plain ;;
    pack1mps)  # pack1 under the MPS daemon, when the image has it (never required)
      command -v nvidia-cuda-mps-control > /dev/null || { echo "no MPS control binary" | tee "$out/pack1mps.log"; continue; }
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
      mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
      nvidia-cuda-mps-control -d
      launch pack1mps --recipes all --gpus "${PACK_GPU:-0}" --model-id "$work/7b" "${common[@]}" --skip-eval --plain
      echo quit | nvidia-cuda-mps-control
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY ;;
    alone) launch alone --recipes r3 --gpus 0 --model-id "$work/${ALONE_SHAPE:-2b}" "${common[@]}" --plain ;;
    shard) launch shard --recipes r4 --gpus 0,1 --gpus-per-recipe 2 --shard --model-id "$work/7b" "${common[@]}" --plain ;;
    queue1) launch queue1 --recipes all --gpus "${QUEUE_GPU:-0}" --pack off --model-id "$work/7b" "${common[@]}" \
      --skip-eval --plain ;;
    pack1) launch pack1 --recipes all --gpus "${PACK_GPU:-0}" --model-id "$work/7b" "${common[@]}" --skip-eval --plain ;;
    both1)
      QUEUE_GPU=0 "$0" "$out" queue1 > /dev/null &
      PACK_GPU=1 "$0" "$out" pack1 > /dev/null &
      wait ;;
    pack2) launch pack2 --recipes all --gpus 0,1 --model-id "$work/7b" "${common[@]}" --skip-eval --plain ;;
    ddp) launch ddp --recipes r4 --gpus 0,1 --gpus-per-recipe 2 --model-id "$work/7b" --dataset "$work/data" \
      --max-steps "$steps" --batch-size 8 --grad-accum 2 --no-wandb --save-steps 0 --skip-eval --plain ;;
    ddpalone) launch ddpalone --recipes r4 --gpus 0 --model-id "$work/7b" --dataset "$work/data" \
      --max-steps "$steps" --batch-size 8 --grad-accum 2 --no-wandb --save-steps 0 --skip-eval --plain ;;
    oom) launch oom --recipes r2 --gpus 0 --model-id "$work/2b" --dataset "$work/data" --max-steps 2 \
      --batch-size 64 --gradient-checkpointing off --oom-retries 3 --no-wandb --plain ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
