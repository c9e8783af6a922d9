"""Small random diffusers folders of each supported family, written the way the real ones are.

Each folder has the real layout (model_index.json, unet/, vae/, text_encoder/[, text_encoder_2/],
tokenizer/[, tokenizer_2/], scheduler/) and the real architecture classes at a few thousandths
of the width, so loading, family detection, sampling, capture and export meet what a user's
download holds. SDXL's keeps its structure: no attention at the full-resolution level, two
encoders whose widths add up to the UNet's context, a pooled projection and 6 size numbers.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from magicseg_engine.generate.models import SD15_SCHEDULER, TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE
from magicseg_engine.generate.tokenizer import clip_vocabulary

TEXT_1 = {**TINY_TEXT_ENCODER, "hidden_size": 32, "intermediate_size": 64}
TEXT_2 = {**TINY_TEXT_ENCODER, "hidden_size": 48, "intermediate_size": 96, "hidden_act": "gelu", "projection_dim": 24}

SDXL_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": TEXT_1["hidden_size"] + TEXT_2["hidden_size"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": TEXT_2["projection_dim"] + 6 * 8,
}
SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}

SD2_UNET = {**TINY_UNET, "attention_head_dim": [2, 4], "use_linear_projection": True, "upcast_attention": True}


def write_tokenizer(folder: Path, pad_token: str, length: int = 77) -> None:
    """A tokenizer/ folder laid out as Stable Diffusion's, from the BPE file open_clip ships."""
    from open_clip.tokenizer import default_bpe

    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary()), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {**special, "model_max_length": length, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def write_family(root: Path, family: str, seed: int = 0, **index_extra) -> Path:
    """Write a small random `family` ("sd1", "sd2" or "sdxl") model as a diffusers folder at `root`."""
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if family == "sdxl":
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
        vae = AutoencoderKL.from_config(SDXL_VAE)
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_1)),
                    "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2))}
        scheduler = EulerDiscreteScheduler.from_config({**SD15_SCHEDULER, "timestep_spacing": "leading"})
        pipeline = "StableDiffusionXLPipeline"
    else:
        unet = UNet2DConditionModel.from_config(SD2_UNET if family == "sd2" else TINY_UNET)
        vae = AutoencoderKL.from_config(TINY_VAE)
        # SD 2.x's text tower is OpenCLIP's, with GELU where OpenAI's CLIP has quick GELU.
        act = "gelu" if family == "sd2" else "quick_gelu"
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**{**TINY_TEXT_ENCODER, "hidden_act": act}))}
        prediction = "v_prediction" if family == "sd2" else "epsilon"
        scheduler = DDIMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction})
        pipeline = "StableDiffusionPipeline"
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    for name, encoder in encoders.items():
        encoder.save_pretrained(root / name)
    scheduler.save_pretrained(root / "scheduler")
    # SD 1.x pads with end-of-text; SD 2.x and SDXL's second tokenizer with "!".
    write_tokenizer(root / "tokenizer", "!" if family == "sd2" else "<|endoftext|>")
    index = {
        "_class_name": pipeline,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        # Optional components, written as recent diffusers write them when absent.
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    if family == "sdxl":
        write_tokenizer(root / "tokenizer_2", "!")
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
    index.update(index_extra)
    (root / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return root
