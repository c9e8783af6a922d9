"""Run configuration as validated data: presets, flag overrides, and the copy saved with outputs.

A preset names the models and the generation settings; flags on the command line override
single fields. Whatever a command resolves is written next to its output, together with the
versions of the libraries that produced it, so a dataset always says how it was made.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from magicseg_engine.errors import UsageError

# The tiny SAM trained on the shapes world (`train-world-sam`); it ships beside the shapes weights.
SHIPPED_SAM_FILE = "sam_tiny_shapes.pth"


def shipped_sam_path() -> Path:
    """Where the shapes preset's SAM weights are installed (which may be missing in a broken install)."""
    from importlib import resources

    return Path(str(resources.files("magicseg_engine.world") / "weights" / SHIPPED_SAM_FILE))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LLMConfig(_Strict):
    """An OpenAI-compatible chat-completions endpoint that writes scene descriptions."""

    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-3.5-turbo"
    # The name of the environment variable holding the key, never the key itself, so that
    # saved configurations and logs cannot leak it.
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = Field(8, ge=1, le=256)
    max_retries: int = Field(5, ge=0, le=20)
    timeout_s: float = Field(60.0, gt=0)
    descriptions_per_request: int = Field(10, ge=1, le=50)
    max_rounds: int = Field(3, ge=1, le=10)
    temperature: float = Field(1.0, ge=0.0, le=2.0)


class PromptsConfig(_Strict):
    """How class names become positive and counterfactual negative prompts."""

    # world: the shapes world's own captions ("a red circle on a grey floor"), for the shapes preset.
    source: Literal["templates", "llm", "file", "world"] = "templates"
    max_classes_per_sample: int = Field(2, ge=1, le=8)
    negative_token: str = "nothing"
    seed: int = Field(0, ge=0, lt=2**31)
    llm: LLMConfig = Field(default_factory=LLMConfig)


class DiffusionConfig(_Strict):
    """The text-to-image model and how it is sampled."""

    # Which random architecture to build; for pretrained weights the folder's own family is used
    # (generate.models.detect_family) and this only names the preset's.
    architecture: Literal["tiny", "shapes", "sd15", "sd21", "sdxl"]
    # shipped: the shapes model's weights that come with the package (architecture shapes only).
    weights: Literal["random", "pretrained", "shipped"]
    # A diffusers folder or hub id; required when weights are pretrained.
    model: str | None = None
    height: int = Field(512, gt=0)
    width: int = Field(512, gt=0)
    steps: int = Field(20, gt=0)
    guidance: float = Field(7.5, ge=0.0)
    scheduler: Literal["ddim", "dpm-solver++", "euler", "unipc"] = "ddim"
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    # The reference sampled a negative from unrelated noise; kept to measure what sharing buys.
    independent_noise: bool = False
    # Fast mode (generate.fast.FAST_LEVELS): 0 runs the whole UNet every step; 1 and 2 reuse its
    # deep features on every other / two of three steps. `bench fast` measures what each costs.
    fast: int = Field(0, ge=0)

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        # The VAE downsamples by 8: other sizes cannot be decoded back exactly.
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _named_model_replaces_shipped(cls, data: Any) -> Any:
        # `--preset shapes --model DIR` loads a folder written by train-world instead of the copy
        # that ships: the preset's settings stay, the weights are the folder's.
        if isinstance(data, dict) and data.get("weights") == "shipped" and data.get("model"):
            return {**data, "weights": "pretrained"}
        return data

    @model_validator(mode="after")
    def _weights_need_a_model(self) -> DiffusionConfig:
        if self.weights == "pretrained" and not self.model:
            raise ValueError("pretrained weights need a model path or hub id (--model)")
        if self.weights == "shipped" and self.architecture != "shapes":
            raise ValueError("only the shapes architecture has shipped weights")
        return self


class SamConfig(_Strict):
    """The Segment Anything model that refines attention-derived prompts into masks."""

    model_type: Literal["tiny", "vit_b", "vit_l", "vit_h"]
    checkpoint: str | None = None


class MaskConfig(_Strict):
    """How each image becomes a per-class label map, and how counterfactual pairs are checked."""

    # attention: boxes and points from cross-attention; detector: boxes from Grounding DINO, as the
    # reference did; attention+detector: detector boxes where found, attention points always.
    source: Literal["attention", "detector", "attention+detector", "none"] = "attention"
    refine_with_sam: bool = True
    # "tiny" (random, for tests), or a Grounding DINO folder or hub id.
    detector_model: str | None = None
    box_threshold: float = Field(0.3, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    # Part of the sampling schedule whose cross-attention is read, as fractions [lo, hi).
    capture_steps: tuple[float, float] = (0.0, 1.0)
    # Cross-attention layers read, by how many times smaller than the latent they are; None:
    # generate.attention.DEFAULT_FACTORS (SD's 32x32 and 16x16 layers at 512x512).
    attention_factors: tuple[int, ...] | None = None
    # Times the maps are multiplied by the latent-resolution self-attention (0: not at all).
    self_attention_power: int = Field(0, ge=0, le=8)
    threshold: float | Literal["otsu"] = "otsu"
    positive_points: int = Field(1, ge=0, le=8)
    negative_points: int = Field(1, ge=0, le=8)
    # Regions and holes below these fractions of the image area are noise, not objects.
    min_region_fraction: float = Field(0.002, ge=0.0, lt=1.0)
    max_hole_fraction: float = Field(0.002, ge=0.0, lt=1.0)
    # Where class masks overlap: the smaller class wins, so an object on a large one stays visible.
    merge_rule: Literal["smaller", "score"] = "smaller"
    # A pair passes when its negative still covers at most this much of any positive class mask.
    max_counterfactual_coverage: float = Field(0.5, ge=0.0, le=1.0)
    drop_failed_pairs: bool = False

    @field_validator("threshold")
    @classmethod
    def _threshold_in_unit_range(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0.0 < v < 1.0:
            raise ValueError(f"a fixed threshold must lie in (0, 1), got {v}")
        return v


class RunConfig(_Strict):
    preset: str
    # What is sampled: the classes and prompts drawn, and each pair's initial noise.
    seed: int = Field(0, ge=0, lt=2**31)
    # What random weights are drawn from (tiny and the -random presets, and SAM and the detector
    # where no checkpoint is given). Apart from `seed`, so that engines built once from these
    # weights serve runs of every sampling seed, and runs of two seeds draw with one model.
    weights_seed: int = Field(0, ge=0, lt=2**31)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    diffusion: DiffusionConfig
    sam: SamConfig
    masks: MaskConfig = Field(default_factory=MaskConfig)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "preset": "tiny",
        "diffusion": {
            "architecture": "tiny", "weights": "random", "height": 64, "width": 64,
            "steps": 4, "guidance": 7.5, "dtype": "float32",
        },
        "sam": {"model_type": "tiny"},
        "masks": {"detector_model": "tiny"},
    },
    # The model trained on the shapes world (`train-world`), whose weights ship with the package:
    # real images on a CPU, and a world where every mask can be checked against the truth.
    "shapes": {
        "preset": "shapes",
        "prompts": {"source": "world"},
        "diffusion": {
            "architecture": "shapes", "weights": "shipped", "height": 32, "width": 32,
            "steps": 20, "guidance": 3.0, "dtype": "float32",
        },
        "sam": {"model_type": "tiny", "checkpoint": str(shipped_sam_path())},
        "masks": {"detector_model": "tiny", "attention_factors": (1,),
                  "capture_steps": (0.75, 1.0), "threshold": 0.5},
    },
    "sd15-random": {
        "preset": "sd15-random",
        "diffusion": {"architecture": "sd15", "weights": "random"},
        "sam": {"model_type": "vit_h"},
    },
    # Stable Diffusion 2.1's architectures (768 px, v-prediction) with random weights: its FLOPs
    # and memory for throughput runs. Same sampler settings as SD 1.5.
    "sd21-random": {
        "preset": "sd21-random",
        "diffusion": {"architecture": "sd21", "weights": "random", "height": 768, "width": 768},
        "sam": {"model_type": "vit_h"},
    },
    # SDXL base's architectures (two text encoders, added size conditioning, 1024 px) with random
    # weights. Its VAE decodes in float32 when the run asks for float16 (it overflows there).
    "sdxl-random": {
        "preset": "sdxl-random",
        "diffusion": {"architecture": "sdxl", "weights": "random", "height": 1024, "width": 1024},
        "sam": {"model_type": "vit_h"},
    },
    "sd15": {
        "preset": "sd15",
        "diffusion": {
            "architecture": "sd15", "weights": "pretrained",
            "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        },
        "sam": {"model_type": "vit_h"},
    },
    "sd21": {
        "preset": "sd21",
        "diffusion": {
            "architecture": "sd21", "weights": "pretrained", "height": 768, "width": 768,
            "model": "stabilityai/stable-diffusion-2-1",
        },
        "sam": {"model_type": "vit_h"},
    },
    "sdxl": {
        "preset": "sdxl",
        "diffusion": {
            "architecture": "sdxl", "weights": "pretrained", "height": 1024, "width": 1024,
            "model": "stabilityai/stable-diffusion-xl-base-1.0",
        },
        "sam": {"model_type": "vit_h"},
    },
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the dotted field path, for UsageError messages."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "configuration"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The preset `name` with `overrides` (a nested dict, None values ignored) applied."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return with_overrides(PRESETS[name], overrides, f"preset {name!r}")


def with_overrides(base: dict[str, Any], overrides: dict[str, Any] | None, what: str) -> RunConfig:
    """`base` (a RunConfig as a dict) with `overrides` applied and validated; `what` names it in errors."""
    try:
        return RunConfig.model_validate(_merge(base, _drop_none(overrides or {})))
    except ValidationError as err:
        raise UsageError(f"invalid configuration for {what}: {describe_validation_error(err)}") from None


def saved_run_config(config: Any) -> Any:
    """The configuration a run.json holds, as this version reads it.

    Runs written before `weights_seed` existed drew their random weights from `seed`; they keep
    those weights (so a resume renders with the model that made its first pairs, and its sample
    keys stay the same), hence a missing `weights_seed` is the run's `seed`.
    """
    if isinstance(config, dict) and "weights_seed" not in config:
        return {**config, "weights_seed": config.get("seed", 0)}
    return config


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes an output."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("magicseg-engine", "torch", "torchvision", "numpy", "inflect", "open_clip_torch",
                 "diffusers", "segment-anything", "webdataset"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def save_config(config: BaseModel, path: Path, **extra: Any) -> None:
    """Write `config` as JSON with library versions (and anything in `extra`) to `path`, atomically."""
    from magicseg_engine.atomic import atomic_write_text

    payload = {"config": config.model_dump(mode="json"), "versions": library_versions(), **extra}
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
