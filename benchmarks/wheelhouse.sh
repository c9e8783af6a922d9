#!/usr/bin/env bash
# Wheels for a GPU machine that has no network: the packages the GPU pass (benchmarks/gpu_pass.py)
# imports that such a machine's Python 3.12 image lacks, at the versions this checkout's .venv
# uses, downloaded here into .whl/ at the repository root (ignored by git: it never lands).
#
#   bash benchmarks/wheelhouse.sh            # then carry .whl beside the tree to the GPU machine
#
# The image already holds torch, triton, transformers, huggingface-hub, safetensors, timm,
# numpy, pillow, scipy, opencv, onnx, onnxruntime, typer, rich, pyyaml, regex, tqdm, pytest,
# hypothesis, torchmetrics, matplotlib, scikit-build-core, pybind11, cmake and ninja: those
# are used as they are there (the project is installed with --no-deps over them). What is
# missing, and why the pass needs it:
#   diffusers            generate/models.py: UNet, VAE, schedulers
#   segment-anything     masks/sam.py: SAM
#   webdataset, braceexpand                              data/shards.py, the torch loader
#   open_clip_torch, ftfy, wcwidth                       generate/tokenizer.py (CLIP BPE vocabulary), train/model.py
#   pydantic, pydantic_core, annotated-types, typing-inspection, typing_extensions
#                        config.py; pydantic needs typing_extensions >= 4.16, newer than an
#                        image may hold (a newer one on PYTHONPATH is backward compatible)
#   inflect, jaraco.functools, more-itertools, typeguard  prompts/templates.py, prompts/counterfactual.py
# Left out on purpose: nvidia-dali and ray (hundreds of MB; the pass skips their stages when
# they are absent), openai (imported only by the LLM prompt source), pycocotools, datasets and
# selenium (tests and exports the pass does not run), importlib_metadata (diffusers imports it
# only on Python < 3.8).
#
# PYTHON picks the interpreter whose `pip freeze` gives the versions (default: .venv/bin/python).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
dest="$root/.whl"

packages=(diffusers segment-anything webdataset braceexpand open_clip_torch ftfy wcwidth
          pydantic pydantic_core annotated-types typing-inspection typing_extensions
          inflect jaraco.functools more-itertools typeguard)

# One version of each name: two wheels of the same package make pip refuse the whole install.
freeze="$("$python" -m pip freeze --disable-pip-version-check 2>/dev/null)"
normalise() { tr '[:upper:]' '[:lower:]' | tr '_.' '--'; }
pins=()
for name in "${packages[@]}"; do
  key="$(normalise <<<"$name")"
  pin="$(while IFS= read -r line; do
           [[ "$line" == *==* ]] || continue
           if [[ "$(normalise <<<"${line%%==*}")" == "$key" ]]; then echo "$line"; fi
         done <<<"$freeze")"
  if [[ -z "$pin" ]]; then
    echo "wheelhouse.sh: $name is not installed in $python's environment; install the project's venv first" >&2
    exit 1
  fi
  pins+=("$pin")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl
exclude="$root/.git/info/exclude"
if [[ -d "$root/.git" ]] && ! grep -qxF '/.whl/' "$exclude" 2>/dev/null; then
  mkdir -p "$(dirname "$exclude")"
  echo '/.whl/' >>"$exclude"
fi

"$python" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$dest" "${pins[@]}"

count="$(find "$dest" -maxdepth 1 -type f -name '*.whl' | wc -l)"
if [[ "$count" -ne "${#pins[@]}" ]]; then
  echo "wheelhouse.sh: expected ${#pins[@]} wheels in $dest, found $count" >&2
  exit 1
fi
ls -1 "$dest"
echo "$count wheels, $(du -sh "$dest" | cut -f1) in $dest (pins: ${pins[*]})"
