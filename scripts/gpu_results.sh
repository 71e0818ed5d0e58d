#!/usr/bin/env bash
# The GPU runs whose results files the book plots (chapters 08 and 09). Run on a machine with >= 2 GPUs:
#   bash scripts/gpu_results.sh capstone OUT_DIR   # Qwen3-30B-A3B shape, random weights, several layouts
#   bash scripts/gpu_results.sh bench1 OUT_DIR     # scripts/bench.py on one GPU, with the transformers floor
#   bash scripts/gpu_results.sh bench2 OUT_DIR     # scripts/bench.py at TP=2 and at EP=2
#   bash scripts/gpu_results.sh many OUT_DIR       # 42 prompts (21 per EP replica: the sorted MoE path), EP=2 vs 1 GPU
#   bash scripts/gpu_results.sh many4 OUT_DIR      # TP=4 vs 1 GPU: 42 prompts (a 560-token prefill: two-shot
#                                                  # all-reduces), 84 prompts (84-row decode steps: two-shot)
#   bash scripts/gpu_results.sh capstone4 OUT_DIR  # 4 GPUs: TP=2xEP=2, TP=4, EP=4 against one GPU
#   bash scripts/gpu_results.sh bench4 OUT_DIR     # 4 GPUs: scripts/bench.py at TP=2xEP=2, TP=4, EP=4
#   bash scripts/gpu_results.sh capstone8 OUT_DIR  # 8 GPUs: TP=2xEP=4 (the seed layout), TP=8, EP=8
#   bash scripts/gpu_results.sh bench8 OUT_DIR     # 8 GPUs: scripts/bench.py at the same three layouts
# Copy OUT_DIR/capstone_*.json to results/capstone/, OUT_DIR/*_tp*_ep*.json to results/bench/,
# OUT_DIR/profiles/*.txt to results/probe/ and OUT_DIR/allreduce/*.json to results/allreduce/.
# The device tool brings back at most 8 files per call: tar OUT_DIR into one.
set -euo pipefail
what=$1
out=${2:-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
prompts=(--prompt_ids 9707,11,1879,0,3555,374,279,6722,315,9625,30
         --prompt_ids 785,3974,13876,38835,34208,916,279,15678,5562,13,576,2701,374,264,1140,315,279,1429,3460,11513,304,4505,25
         --prompt_ids 40,1079,264,3070,6366,315)
common=(--preset qwen3-30b-a3b --max_new_tokens 32 --ignore_eos --record_margins --max_seq_len 1024 "${prompts[@]}")

run_capstone() {  # tp ep [extra args...]
  local tp=$1 ep=$2 tag=tp$1_ep$2
  shift 2
  [[ " $* " == *" --no_fast "* ]] && tag=${tag}_nofast
  local gpus
  gpus=$(seq -s, 0 $((tp * ep - 1)))
  CUDA_VISIBLE_DEVICES=$gpus torchrun --standalone --nproc_per_node=$((tp * ep)) scripts/run_inference.py \
    --tp_size "$tp" --ep_size "$ep" "${common[@]}" --json "$out/capstone_$tag.json" "$@" 2>&1 \
    | grep -v "^W1\|\*\*\*\*\|OMP_NUM_THREADS" | tail -6
}

run_layouts() {  # "tp ep" ...: the capstone on one GPU, then in each layout, tokens compared with one GPU's
  local layout files=()
  run_capstone 1 1
  for layout in "$@"; do
    set -- $layout
    run_capstone "$1" "$2"
    files+=("$out/capstone_tp$1_ep$2.json")
  done
  python3 scripts/compare_outputs.py "$out/capstone_tp1_ep1.json" "${files[@]}"
}

run_benches() {  # gpus "tp ep" ...: scripts/bench.py once per layout, then the all-reduce check
  local gpus=$1 layout
  shift
  for layout in "$@"; do
    set -- $layout
    torchrun --standalone --nproc_per_node="$gpus" scripts/bench.py --tp_size "$1" --ep_size "$2" --skip eager \
      --reference --profile "$out/profiles" --out "$out"
  done
  torchrun --standalone --nproc_per_node="$gpus" scripts/check_all_reduce.py --tokens 1,8,64,256,1024,8192 --out "$out/allreduce"
}

run_many() {  # copies "tp ep" ...: the three prompts `copies` times over, each layout against the first
  local copies=$1 layout many=() files=()
  shift
  for _ in $(seq "$copies"); do many+=("${prompts[@]}"); done
  for layout in "$@"; do
    set -- $layout
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(($1 * $2 - 1))) torchrun --standalone --nproc_per_node=$(($1 * $2)) \
      scripts/run_inference.py --tp_size "$1" --ep_size "$2" --preset qwen3-30b-a3b --max_new_tokens 24 \
      --ignore_eos --record_margins --max_seq_len 512 "${many[@]}" \
      --json "$out/capstone$((3 * copies))_tp$1_ep$2.json" 2>&1 | tail -3
    files+=("$out/capstone$((3 * copies))_tp$1_ep$2.json")
  done
  python3 scripts/compare_outputs.py "${files[@]}"
}

case $what in
  capstone)
    run_capstone 1 1
    run_capstone 2 1
    run_capstone 1 2
    run_capstone 1 1 --no_fast --warmup 0 --max_new_tokens 12
    python3 scripts/compare_outputs.py "$out"/capstone_*.json
    ;;
  bench1)
    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=1 scripts/bench.py --reference --out "$out"
    ;;
  bench2) run_benches 2 "2 1" "1 2" ;;
  many) run_many 14 "1 1" "1 2" ;;
  many4) run_many 14 "1 1" "4 1"; run_many 28 "1 1" "4 1" ;;
  capstone4) run_layouts "2 2" "4 1" "1 4" ;;
  bench4) run_benches 4 "2 2" "4 1" "1 4" ;;
  capstone8) run_layouts "2 4" "8 1" "1 8" ;;
  bench8) run_benches 8 "2 4" "8 1" "1 8" ;;
  *) echo "usage: $0 capstone|bench1|bench2|many|many4|capstone4|bench4|capstone8|bench8 OUT_DIR" >&2; exit 2 ;;
esac
