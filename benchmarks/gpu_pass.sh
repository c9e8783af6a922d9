#!/usr/bin/env bash
# The GPU rows of benchmarks/results.
#
# On a GPU machine lent for a few minutes, bare and without network (wheels from
# `bash benchmarks/wheelhouse.sh`, run beforehand where pip reaches an index, travel in .whl/):
#
#   bash benchmarks/gpu_pass.sh                          (the same as: bash benchmarks/gpu_pass.sh headline)
#
# runs benchmarks/gpu_pass.py, the staged pass: install (the wheels, then this project in editable
# mode over the machine's torch), correctness (the `gpu` tests, Triton kernels first), headline
# (`bench tune` on sd15-random, bf16 at batch 8 and 16 against the reference pipeline, the UNet's
# TFLOP/s against a bf16 matmul measured in the same run), extras while time is left. Each stage
# has its own budget and writes its JSON the moment it ends, into $OUT when that is set, else
# benchmarks/results/gpu-pass/; the whole stays under 7 minutes. Options after `headline` go to the
# driver, e.g. `bash benchmarks/gpu_pass.sh headline --dry-run` (tiny preset on the CPU, pip not run)
# or `--stages install,headline --total-budget 300`; see `python3 benchmarks/gpu_pass.py --help`.
#
# Where magicseg-engine is installed already, the longer modes:
#
#   bash benchmarks/gpu_pass.sh [tune|all|both|world|families] [PRESET]      (PRESET default: sd15-random)
#
# tune: backend x precision x memory layout x attention kernel x batch size, prompts to shards
#       with masks, against the reference pipeline; UNet TFLOP/s and the fraction of the dense peak.
# all:  every benchmark of `bench all` (generate, unet, pipeline, masks, sam, losses, loader, train).
# world: train-world on the GPU with a schedule 14x the shipped one's (4x the scenes, 4x the batch,
#       3.6x the steps, a few minutes), then `bench quality` on it: does the shapes model learn to
#       draw shapes when it is trained longer? (quality-shapes-long-<gpu>-<date>.json)
# families: `bench unet` on sd15-random, sd21-random and sdxl-random in float16 (rows/s, TFLOP/s,
#       fraction of the dense peak per family: unet-<preset>-<gpu>-<date>.json), then build-engines
#       of the full-size SDXL in fp16 (text encoders, UNet, VAE decoder; about 40 GB of host memory),
#       its manifest kept as engines-sdxl-random-<gpu>-<date>.json.
# Each writes benchmarks/results/<what>-<preset>-<gpu>-<date>.json, then the results page and
# charts are made again. Extra options for `bench tune` can be given in TUNE_ARGS, e.g.
#   TUNE_ARGS="--variants torch:bfloat16,compile:bfloat16 --batch-sizes 8,16" bash benchmarks/gpu_pass.sh tune
set -euo pipefail

what="${1:-headline}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
results="$here/results"
python="${PYTHON:-python}"
# GPU images often have python3 alone.
if [[ -z "${PYTHON:-}" ]] && ! command -v "$python" >/dev/null; then
  python=python3
fi
case "$what" in
  headline|--*)
    if [[ $# -gt 0 && "$1" == headline ]]; then shift; fi
    exec "$python" "$here/gpu_pass.py" "$@" ;;
  tune|all|both|world|families) ;;
  *) echo "usage: bash benchmarks/gpu_pass.sh [headline [OPTIONS]] | [tune|all|both|world|families] [PRESET]" >&2
     exit 2 ;;
esac
preset="${2:-sd15-random}"

gpu="$("$python" - <<'EOF'
import re, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_pass.sh: no CUDA GPU is visible; run it on a GPU machine")
name = torch.cuda.get_device_name(0)
match = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
print((match.group(1) if match else name.split()[-1]).lower())
EOF
)"
date="$(date -u +%F)"
mkdir -p "$results"

"$python" -m magicseg_engine.cli doctor || true  # the environment, in the log beside the numbers

if [[ "$what" == world ]]; then
  model="${WORLD_OUT:-/tmp/shapes-long}"
  "$python" -m magicseg_engine.cli train-world --out "$model" --device cuda --samples 20000 --unet-steps 5000 \
    --batch-size 256 --resume
  "$python" -m magicseg_engine.cli bench quality --preset shapes --model "$model" --pairs 128 --device cuda \
    --json "$results/quality-shapes-long-$gpu-$date.json"
  "$python" "$here/summarize.py"
  exit 0
fi

if [[ "$what" == families ]]; then
  for family in sd15-random sd21-random sdxl-random; do
    "$python" -m magicseg_engine.cli bench unet --preset "$family" --device cuda \
      --json "$results/unet-$family-$gpu-$date.json"
  done
  engines="${ENGINES_OUT:-/tmp/engines-sdxl-random}"
  "$python" -m magicseg_engine.cli build-engines --preset sdxl-random --device cuda --precision fp16 \
    --components text-encoder,unet,vae-decoder --out "$engines"
  cp "$engines/manifest.json" "$results/engines-sdxl-random-$gpu-$date.json"
  "$python" "$here/summarize.py"
  exit 0
fi

if [[ "$what" != all ]]; then
  # shellcheck disable=SC2086  # TUNE_ARGS is a list of options
  "$python" -m magicseg_engine.cli bench tune --preset "$preset" --device cuda ${TUNE_ARGS:-} \
    --json "$results/tune-$preset-$gpu-$date.json"
fi
if [[ "$what" != tune ]]; then
  "$python" -m magicseg_engine.cli bench all --preset "$preset" --device cuda \
    --json "$results/all-$preset-$gpu-$date.json"
fi

"$python" "$here/summarize.py"
echo "results: $results/README.md"
