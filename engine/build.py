"""build-engines: export the models of a preset to ONNX, check them, and build TensorRT engines.

The output folder holds `onnx/{component}.onnx`, `tensorrt/*.engine` when asked, and
`manifest.json`, which names the weights the files came from (the model id of the diffusion
models) so that a backend never runs files exported from other weights.

`unet-capture` is the UNet with the attention-capture maps as extra outputs, for the layers
a run's AttentionCapture reads by default; generation with masks on an exported backend
runs it on the steps it captures, and the plain `unet` on the others.

Each engine's optimisation profile (`engine_profile`) is checked before anything is loaded or
exported, and again from the exported files' shapes before the first engine is built: a
profile that cannot be made stops the run in one line, never after some engines were built.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from magicseg_engine.atomic import atomic_write_text, check_writable_dir
from magicseg_engine.config import MaskConfig, PromptsConfig, RunConfig, library_versions
from magicseg_engine.engine.export import (
    CAPTURE_COMPONENT,
    COMPONENTS,
    DIFFUSION_COMPONENTS,
    SAM_COMPONENTS,
    ExportedModel,
    capture_parity,
    check_exported,
    export_component,
    load_exported,
    parity,
    sample_inputs,
)
from magicseg_engine.errors import UsageError
from magicseg_engine.safe_files import sha256_files

MANIFEST = "manifest.json"
# Every component build-engines writes; unet-capture is exported from the unet.
BUILDABLE = COMPONENTS + (CAPTURE_COMPONENT,)
# unet-capture's map dims as TensorRT ranges (min, opt, max): classes per pair (prompts name 1-2,
# user prompt files up to 4) and token positions per class (multi-word names, repeats).
CAPTURE_DIMS = {"classes": (1, 2, 4), "tokens": (1, 4, 16)}
# The symbolic dims of each component's inputs, as engine/export.py names them: enough to check
# every TensorRT profile before a model loads or a file is written. The exports' own shapes are
# checked again before the first engine is built.
EXPORT_DIMS: dict[str, tuple[str, ...]] = {
    "text-encoder": ("batch",), "unet": ("batch",), "vae-decoder": ("batch",), "sam-image-encoder": ("batch",),
    "sam-mask-decoder": ("images", "prompts", "tokens"), CAPTURE_COMPONENT: ("batch", "rows", "classes", "tokens"),
}


def capture_dims(batch_sizes: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    """unet-capture's TensorRT dims: map rows are 2 per pair, half a guided UNet batch."""
    hi = max(batch_sizes)
    return {**CAPTURE_DIMS, "rows": (1, max(1, hi // 2), hi)}


def _largest(field) -> int:
    """The largest value a configuration field accepts (its `le` bound)."""
    return next(m.le for m in field.metadata if getattr(m, "le", None) is not None)


def sam_decoder_dims() -> dict[str, tuple[int, int, int]]:
    """The SAM mask decoder's TensorRT ranges (min, opt, max), as SamRefiner calls it.

    A call decodes the prompts of one image that share a layout, on that image's embedding
    alone: `images` is 1, and `prompts` is 1 up to the classes a pair may have. A prompt's
    `tokens` are its points plus 2 for its box, or plus SAM's padding point without one: 2 (a
    box alone, or one point) up to every positive and negative point and a box. The largest
    values are the largest the configuration accepts, so one engine serves every run's
    settings; opt, which TensorRT tunes for, is the call the default settings make.
    """
    classes = PromptsConfig.model_fields["max_classes_per_sample"]
    points = [MaskConfig.model_fields[name] for name in ("positive_points", "negative_points")]
    return {
        "images": (1, 1, 1),
        "prompts": (1, classes.default, _largest(classes)),
        "tokens": (2, sum(p.default for p in points) + 2, sum(_largest(p) for p in points) + 2),
    }


SAM_DECODER_DIMS = sam_decoder_dims()


def profile_sizing(component: str, batch_sizes: Sequence[int]) -> tuple[tuple[int, ...] | None, dict | None]:
    """(batch sizes, fixed dims) that size `component`'s TensorRT profile (see `profile_shapes`)."""
    if component == "sam-mask-decoder":
        # Sized by one image's prompts, whatever the generation batch: --batch-sizes do not apply.
        return None, SAM_DECODER_DIMS
    if component == CAPTURE_COMPONENT:
        return tuple(batch_sizes), capture_dims(batch_sizes)
    return tuple(batch_sizes), None


def engine_profile(component: str, input_shapes, batch_sizes: Sequence[int]) -> dict:
    """`component`'s TensorRT optimisation profile for inputs of `input_shapes` (dims as ints or
    names), or UsageError in one line saying why there is none."""
    from magicseg_engine.engine.tensorrt import profile_shapes

    sizes, fixed = profile_sizing(component, batch_sizes)
    try:
        return profile_shapes(input_shapes, sizes, fixed)
    except ValueError as err:
        raise UsageError(f"no TensorRT optimisation profile for {component} with --batch-sizes "
                         f"{','.join(map(str, batch_sizes))}: {err}") from None


def check_profiles(components: Sequence[str], batch_sizes: Sequence[int]) -> None:
    """Every component's profile over the dims its export declares (EXPORT_DIMS); UsageError
    for the first that has none, before anything is loaded, exported or built."""
    for component in components:
        engine_profile(component, {component: EXPORT_DIMS[component]}, batch_sizes)


def parse_components(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in names if c not in BUILDABLE]
    if unknown or not names:
        raise UsageError(f"--components: {', '.join(unknown) or 'none given'}; choose from {', '.join(BUILDABLE)}")
    return names


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: give positive integers separated by commas, e.g. 1,8,16") from None
    if not sizes or min(sizes) <= 0:
        raise UsageError(f"--batch-sizes {text!r}: give positive integers separated by commas, e.g. 1,8,16")
    return tuple(sorted(set(sizes)))


def component_precision(component: str, source, precision: str) -> str:
    """The precision `component` is exported and built in when `precision` is asked for: fp32 for
    a VAE decoder that overflows in float16 (SDXL's), as the torch backends decode it; `precision`
    for everything else (bfloat16 has float32's range)."""
    if component == "vae-decoder" and precision == "fp16" and getattr(source, "vae_overflows_in_float16", False):
        return "fp32"
    return precision


def build_engines(config: RunConfig, out: Path, *, fmt: str, precision: str, batch_sizes: Sequence[int],
                  components: Sequence[str], device: str) -> dict:
    """Export (and with fmt "tensorrt", build) each component; write and return the manifest."""
    from magicseg_engine.bench.common import device_info
    from magicseg_engine.generate.models import load_diffusion, resolve_dtype
    from magicseg_engine.masks.sam import build_sam

    if fmt == "tensorrt":
        from magicseg_engine.engine.tensorrt import require_tensorrt

        # Before any model loads or any file is written: TensorRT is there, and every engine
        # asked for has a profile, so no engine is built for a set that cannot be completed.
        require_tensorrt()
        check_profiles(components, batch_sizes)
    check_writable_dir(out)
    dtype = resolve_dtype("float32", device)
    models = sam = None
    if any(c in DIFFUSION_COMPONENTS + (CAPTURE_COMPONENT,) for c in components):
        models = load_diffusion(config.diffusion, device, dtype, seed=config.weights_seed)
    if any(c in SAM_COMPONENTS for c in components):
        sam = build_sam(config.sam.model_type, config.sam.checkpoint, device=device, dtype=dtype,
                        seed=config.weights_seed)

    entries, exports = [], []
    for component in components:
        source = sam if component in SAM_COMPONENTS else models
        layers = None
        if component == CAPTURE_COMPONENT:
            from magicseg_engine.generate.attention import AttentionCapture

            layers = AttentionCapture(models.unet, models.tokenizer, steps=config.masks.capture_steps,
                                      factors=config.masks.attention_factors).layers
        component_prec = component_precision(component, source, precision)
        exported = export_component("unet" if layers else component, source, out / "onnx",
                                    precision=component_prec, capture_layers=layers)
        check_exported(exported)
        entry = {"component": component, "format": "onnx", "path": str(exported.path.relative_to(out)),
                 "sha256": exported.sha256, "precision": exported.precision, "opset": exported.opset,
                 "input_shapes": {k: list(v) for k, v in exported.input_shapes.items()},
                 "external_data": exported.external_data}
        if layers:
            entry["capture_layers"] = layers
        if component_prec == "fp32":
            # One sample through onnxruntime against torch: a broken export is caught here, not mid-run.
            check = (capture_parity(source, exported) if layers
                     else parity(component, source, exported, sample_inputs(component, source, batch=1)))
            entry["onnxruntime_parity"] = {"max_abs": check["max_abs"], "max_rel": check["max_rel"]}
        entries.append(entry)
        exports.append((exported, component_prec))

    if fmt == "tensorrt":
        from magicseg_engine.engine.tensorrt import build_engine, read_record

        # Every profile again, now from the exported files' own shapes, before the first build.
        for entry, (exported, _) in zip(entries, exports):
            engine_profile(entry["component"], exported.input_shapes, batch_sizes)
        for entry, (exported, component_prec) in zip(entries, exports):
            sizes, fixed = profile_sizing(entry["component"], batch_sizes)
            engine = build_engine(exported, out / "tensorrt", sizes, component_prec, fixed_dims=fixed,
                                  timing_cache_path=out / "tensorrt" / "timing.cache")
            entry["engine"] = str(Path(engine).relative_to(out))
            # The manifest keeps the engine's digest too: a backend checks the file against it
            # before TensorRT deserialises it, with or without the record beside the engine.
            record = read_record(engine) or {}
            entry["engine_sha256"], entry["engine_bytes"] = record.get("engine_sha256"), record.get("engine_bytes")

    manifest = {
        "model_id": models.model_id if models is not None else None,
        "sam": {"model_type": config.sam.model_type, "checkpoint": config.sam.checkpoint} if sam is not None else None,
        "sam_id": sam_identity(config) if sam is not None else None,
        "preset": config.preset, "weights_seed": config.weights_seed, "format": fmt, "precision": precision, "batch_sizes": list(batch_sizes),
        "components": entries, "versions": library_versions(), "machine": device_info(torch.device(device)),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def load_components(engines: Path, model_id: str | None, needed: Sequence[str],
                    sam_id: str | None = None) -> dict[str, ExportedModel]:
    """The verified ONNX exports of `needed` in `engines`, refusing files made from other weights.

    `model_id` names the diffusion weights (DiffusionModels.model_id) and `sam_id` the SAM
    weights (sam_identity); each is checked when `needed` has components made from it.
    """
    return _verified_components(engines, model_id, needed, sam_id)[0]


def _verified_components(engines: Path, model_id: str | None, needed: Sequence[str],
                         sam_id: str | None) -> tuple[dict[str, ExportedModel], dict[str, dict]]:
    """load_components, with the manifest's entry of every listed component."""
    path = engines / MANIFEST
    if not path.is_file():
        raise UsageError(f"{engines} holds no {MANIFEST}; run magicseg-engine build-engines --out {engines} first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if any(c not in SAM_COMPONENTS for c in needed) and manifest.get("model_id") != model_id:
        raise UsageError(f"the engines in {engines} were exported from other weights ({manifest.get('model_id')}, "
                         f"this run uses {model_id}); run build-engines again with the same preset, model and --weights-seed")
    if any(c in SAM_COMPONENTS for c in needed) and manifest.get("sam_id") != sam_id:
        raise UsageError(f"the SAM in {engines} was exported from other weights ({manifest.get('sam_id')}, this run "
                         f"uses {sam_id}); run build-engines again with the same --sam-model, --sam-checkpoint and --weights-seed")
    listed = {e["component"]: e for e in manifest["components"]}
    missing = [c for c in needed if c not in listed]
    if missing:
        raise UsageError(f"{engines} has no {', '.join(missing)}; run build-engines with --components "
                         f"{','.join(needed)}")
    exported = {}
    for component in needed:
        entry = listed[component]
        path = engines / entry["path"]
        # Checked before the file is parsed, against the digest the manifest recorded: a file
        # changed since build-engines (damaged, or replaced) is never handed to onnx or a backend.
        files = [path] + ([path.with_name(path.name + ".data")] if entry.get("external_data") else [])
        for f in files:
            if not f.is_file():
                raise UsageError(f"{f} is missing from the engines in {engines}; run build-engines --out {engines} "
                                 "again")
        if sha256_files(files) != entry["sha256"]:
            raise UsageError(f"{path} changed since build-engines wrote it (its sha256 differs from {MANIFEST}); "
                             f"run build-engines --out {engines} again")
        e = load_exported(path)
        if e.sha256 != entry["sha256"]:
            raise UsageError(f"{e.path} changed since build-engines wrote it; run build-engines --out {engines} again")
        exported[component] = e
    return exported, listed


def load_engines(engines: Path, model_id: str | None, needed: Sequence[str],
                 sam_id: str | None = None) -> tuple[dict[str, ExportedModel], dict[str, Path]]:
    """load_components, plus the TensorRT engine build-engines made from each export."""
    exported, listed = _verified_components(engines, model_id, needed, sam_id)
    missing = [c for c in needed if "engine" not in listed[c]]
    if missing:
        raise UsageError(f"{engines} has no TensorRT engine for {', '.join(missing)}; run build-engines "
                         f"--format tensorrt --out {engines}")
    paths = {c: engines / listed[c]["engine"] for c in needed}
    for c, path in paths.items():
        _check_engine(engines, path, listed[c])
    return exported, paths


def _check_engine(engines: Path, path: Path, entry: dict) -> None:
    """UsageError unless the engine is the file build-engines recorded (bytes and sha256), before
    TensorRT deserialises it. Manifests written before they kept the digest fall back to the
    record beside the engine; an engine with neither is refused rather than run unchecked."""
    from magicseg_engine.engine.tensorrt import read_record
    from magicseg_engine.safe_files import file_sha256

    again = f"run build-engines --format tensorrt --out {engines} again"
    if not path.is_file():
        raise UsageError(f"TensorRT engine {path} is missing; {again}")
    want = (entry.get("engine_bytes"), entry.get("engine_sha256"))
    if want[1] is None:
        record = read_record(path)
        if record is None:
            raise UsageError(f"TensorRT engine {path} has no recorded sha256 to check it against; {again}")
        want = (record.get("engine_bytes"), record.get("engine_sha256"))
    # The size first: a truncated engine is told without reading gigabytes.
    if path.stat().st_size != want[0] or file_sha256(path) != want[1]:
        raise UsageError(f"TensorRT engine {path} changed since build-engines wrote it (its size or sha256 differs "
                         f"from what was recorded); {again}")


def sam_identity(config: RunConfig) -> str:
    """Names the SAM weights a configuration builds: the checkpoint file, or the seed of random ones."""
    s = config.sam
    weights = str(Path(s.checkpoint).resolve()) if s.checkpoint else f"random:seed={config.weights_seed}"
    return f"{s.model_type}:{weights}"


def check_latent_size(exported: ExportedModel, latent_shape: Sequence[int]) -> None:
    """Spatial sizes are fixed at export: a run at another image size needs another export."""
    sample = tuple(exported.input_shapes["sample"][1:])
    if sample != tuple(latent_shape):
        raise UsageError(f"the UNet in {exported.path} was exported for latents {sample}, this run needs "
                         f"{tuple(latent_shape)}; run build-engines for this --size")


def to_numpy_inputs(inputs: dict[str, torch.Tensor]) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}
