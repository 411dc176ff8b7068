#!/usr/bin/env bash
# Every GPU check of issue 16 in one call, results as JSON (and logs) in $OUT.
#
# On a GPU host (docs: ../shared/GPU.md; the device tool runs it in the repository root):
#     bash bench/gpu_check.sh                        # writes $OUT (default ./gpu_out)
# On CPU, to check the script itself before spending GPU time (tiny sizes, CUDA parts skip):
#     GPU_CHECK_DRY_RUN=1 OUT=/tmp/gpu_out bash bench/gpu_check.sh
#
# The GPU host has torch, transformers, peft and triton but maybe not pydantic (moram.config needs it)
# and no network. Before the call, put its wheels where the script looks (.gpu/ is git-ignored via
# .git/info/exclude, so pass carry: [".gpu"] to the device tool):
#     bash bench/gpu_check.sh --prepare
#
# What it runs (STAGES, default all three), each under its own time limit (together < 600 s, one
# device-tool call), each stage's exit code in summary.json:
#   env         torch/CUDA/triton/peft versions and the device name         -> env.json
#   kernels     tests/test_kernels.py + tests/test_functional.py (the CUDA test runs the compiled
#               Triton kernel against the equations) + tests/test_training_update.py (a training
#               forward and backward with no host sync) with --noconftest (the conftest needs Ray)
#                                                                           -> kernels.xml, kernels.log
#   layer       bench/layer_bench.py --device cuda (fp32 and bf16, the Triton `fused` rows)
#                                                                           -> layer_bench.log
#   model       bench/model_bench.py --device cuda: 1B LLaMA-shaped, bf16, vs PEFT LoRA (default
#               autocast_adapter_dtype) and the base, R = 56 128: train, prefill, decode per token at batch 1 4 8
#                                                                           -> model_bench.json, .log
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=.gpu/wheels

if [[ "${1:-}" == "--prepare" ]]; then  # on the CPU machine, with the project's venv
  mkdir -p "$WHEELS" && grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  ${PIP:-.venv/bin/python -m pip} download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$WHEELS" pydantic annotated-types typing-inspection typing-extensions
  ls "$WHEELS"; exit $?
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DRY=${GPU_CHECK_DRY_RUN:-0}
declare -A STATUS

stage() {  # stage NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date -u +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  STATUS[$name]=${PIPESTATUS[0]}
  echo "== $name: exit ${STATUS[$name]}"
}

if ! $PY -c "import pydantic" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
  else
    echo "pydantic is missing and $WHEELS has no wheels: run 'bash bench/gpu_check.sh --prepare' first"
  fi
fi

$PY - > "$OUT/env.json" <<'PYEOF'
import json, importlib, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
for name in ("triton", "transformers", "peft", "pydantic"):
    try:
        env[name] = importlib.import_module(name).__version__
    except Exception as error:  # noqa: BLE001 - a missing package is what this records
        env[name] = f"missing: {error}"
print(json.dumps(env, indent=1))
PYEOF
cat "$OUT/env.json"

# The stage limits add up to < 600 s, the device tool's limit per call; STAGES="model" (etc.) runs a part.
STAGES=${STAGES:-kernels layer model}
for name in $STAGES; do
  case "$name:$DRY" in
    kernels:1) stage kernels 600 $PY -m pytest -q --noconftest -p no:cacheprovider tests/test_kernels.py \
                 -k "sparse or cpu_default" --junitxml="$OUT/kernels.xml" ;;
    layer:1)   stage layer 300 $PY bench/layer_bench.py --device cpu --tokens 64 --repeats 1 --dims 64 --banks 16 32 \
                 --value-banks 16 32 ;;
    model:1)   stage model 300 $PY bench/model_bench.py --device cpu --model llama-tiny --atoms 8 32 --batch 2 --seq 16 \
                 --new 2 --repeats 1 --json "$OUT/model_bench.json" ;;
    kernels:*) stage kernels 150 $PY -m pytest -q --noconftest -p no:cacheprovider tests/test_kernels.py \
                 tests/test_functional.py tests/test_training_update.py --junitxml="$OUT/kernels.xml" ;;
    layer:*)   stage layer 150 $PY bench/layer_bench.py --device cuda --repeats 20 ;;
    model:*)   stage model 270 $PY bench/model_bench.py --device cuda --atoms 56 128 --repeats 5 \
                 --json "$OUT/model_bench.json" ;;
    *) echo "unknown stage $name (kernels, layer, model)"; exit 2 ;;
  esac
done

$PY - "$OUT" "${STATUS[kernels]:--1}" "${STATUS[layer]:--1}" "${STATUS[model]:--1}" "$DRY" <<'PYEOF'
import json, sys
out, kernels, layer, model, dry = sys.argv[1:]
summary = {"dry_run": dry == "1", "exit (-1: not run)": {"kernels": int(kernels), "layer": int(layer),
                                                        "model": int(model)},
           "env": json.load(open(f"{out}/env.json"))}
try:
    summary["model_bench"] = json.load(open(f"{out}/model_bench.json"))
except (OSError, ValueError) as error:
    summary["model_bench"] = f"missing: {error}"
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(json.dumps(summary["exit (-1: not run)"]))
PYEOF
