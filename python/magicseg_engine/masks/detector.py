"""Grounding DINO: one box per class name, found by an open-vocabulary detector.

The alternative to boxes from cross-attention: each image is searched for its class names as
text, and the best box per class prompts SAM like an attention box would (all -1 where a class
was not found). Thresholds default to the reference method's (box 0.3, text 0.25).

Models come two ways: a tiny seeded-random Grounding DINO with an offline BERT WordPiece
tokenizer for tests and the offline demo, and a transformers Grounding DINO folder (model +
processor files) as `save_pretrained` writes it, e.g. a copy of IDEA-Research/grounding-dino-tiny.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from magicseg_engine.errors import UsageError

if TYPE_CHECKING:
    from transformers import BertTokenizer, GroundingDinoForObjectDetection, GroundingDinoProcessor

log = logging.getLogger(__name__)

BOX_THRESHOLD = 0.3
TEXT_THRESHOLD = 0.25

# Grounding DINO splits its prompt into phrases at token ids it hard-wires (transformers'
# SPECIAL_TOKENS): bert-base-uncased's [CLS], [SEP], "." and "?". A tokenizer with other ids
# would leave the whole prompt one phrase, so every vocabulary here must use these.
_DELIMITER_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}

# Small enough that a batch of 64x64 images is detected in tens of milliseconds on a CPU, yet
# with Grounding DINO's own structure: a multi-scale backbone (three stages plus one extra
# level, as the Swin-T checkpoint has), BERT text features, the text-image fusion encoder and
# two-stage query selection.
TINY_BACKBONE: dict[str, Any] = {
    "model_type": "resnet",
    "embedding_size": 16,
    "hidden_sizes": [16, 32, 64, 128],
    "depths": [1, 1, 1, 1],
    "layer_type": "basic",
    "out_features": ["stage2", "stage3", "stage4"],
}
TINY_TEXT: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
}
TINY_DETECTOR: dict[str, Any] = {
    # The input projections use GroupNorm(32, d_model): 64 leaves two channels per group, which
    # a 1x1 feature level (the extra one, for a 64x64 image) needs at batch size 1.
    "d_model": 64,
    "encoder_layers": 1,
    # Two at least: transformers ties decoder box heads 1.. to head 0 and fails without any.
    "decoder_layers": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_n_points": 2,
    "decoder_n_points": 2,
    "num_feature_levels": 4,
    "num_queries": 50,
    "max_text_len": 256,
}
# 64x64 images go in unresized; larger ones are shrunk to the tiny model's scale.
TINY_IMAGE_SIZE = {"shortest_edge": 64, "longest_edge": 128}

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"

# Only what loading reads, and only safetensors: hub folders also carry pickled .bin copies.
_HUB_PATTERNS = [
    "config.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
]
_FOLDER_FILES = "config.json, model.safetensors, processor or preprocessor config and tokenizer files"


# --- results ------------------------------------------------------------------------------


@dataclass
class Detections:
    boxes: torch.Tensor  # [B, C_max, 4] float32 (x0, y0, x1, y1) pixels; all -1 where the class was not found
    scores: torch.Tensor  # [B, C_max] float32 detection score; 0 where the class was not found

    @property
    def found(self) -> torch.Tensor:
        """[B, C_max] bool: the class has a box."""
        return ~(self.boxes == -1).all(dim=-1)


# --- text ---------------------------------------------------------------------------------


def _prompt_name(name: str) -> str:
    # "." and "?" split phrases in Grounding DINO's text masks; one inside a name ("st. bernard")
    # would cut the class in two.
    return " ".join(name.lower().replace(".", " ").replace("?", " ").split())


def prompt_text(names: Sequence[str]) -> str:
    """Grounding DINO's prompt for `names`: lower-case names joined by " . ", ending with " ."."""
    return " . ".join(_prompt_name(n) for n in names) + " ." if names else ""


def _match_key(text: str) -> str:
    # What survives any tokenisation: BERT-uncased lower-cases and strips accents, and the
    # decoded phrase puts spaces around punctuation ("t - shirt") and between word pieces
    # that the class name may not have, so only letters and digits are compared.
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in text if ch.isalnum() and not unicodedata.combining(ch))


_SPECIAL = re.compile(r"\[(?:CLS|SEP|PAD|UNK|MASK)\]", re.IGNORECASE)


def phrase_classes(phrase: str, names: Sequence[str]) -> list[int]:
    """Indices into `names` of the classes a detected phrase names, in `names` order.

    The phrase is post-processing's label text: the decoded prompt tokens the box scored above
    the text threshold, so it may hold a class name, part of one ("light" of "traffic light")
    or several names, with or without the "." between them. Names matched in full win over
    partial matches; no match (an empty phrase, only delimiters) gives [].
    """
    fragments = [_match_key(f) for f in _SPECIAL.sub(".", phrase).split(".")]
    fragments = [f for f in fragments if f]
    keys = [_match_key(n) for n in names]
    exact = [c for c, key in enumerate(keys) if key and key in fragments]
    if exact:
        return exact
    # Part of a name, or names run together because the "." between them fell below the threshold.
    return [c for c, key in enumerate(keys) if key and any(f in key or key in f for f in fragments)]


def assign_detections(
    results: Sequence[dict],
    classes: Sequence[Sequence[str]],
    image_size: tuple[int, int],
    class_scores: Sequence[torch.Tensor | None] | None = None,
) -> Detections:
    """The best box per class from post-processed detections.

    `results` holds, per image, post_process_grounded_object_detection's "scores" [N],
    "boxes" [N, 4] (pixels) and "text_labels" (N phrases). Each detection goes to the class its
    phrase names; a phrase naming several goes to the one whose prompt tokens the box scores
    highest, from `class_scores` [N, C] per image (else the first named). Boxes are clipped to
    the image of `image_size` (H, W).

    The reference method merged every box of a class into one mask. Here each class keeps its
    single best-scoring box, because SAM takes one box per prompt and the per-class label maps
    need one mask per class.
    """
    height, width = image_size
    n_max = max((len(names) for names in classes), default=0)
    boxes = torch.full((len(classes), n_max, 4), -1.0, dtype=torch.float32)
    scores = torch.zeros((len(classes), n_max), dtype=torch.float32)
    limits = torch.tensor([width, height, width, height], dtype=torch.float32)
    for b, (result, names) in enumerate(zip(results, classes, strict=True)):
        det_scores = torch.as_tensor(result["scores"]).detach().float().cpu().reshape(-1)
        det_boxes = torch.as_tensor(result["boxes"]).detach().float().cpu().reshape(-1, 4)
        phrases = list(result["text_labels"])
        per_class = None if class_scores is None else class_scores[b]
        for i, phrase in enumerate(phrases):
            named = phrase_classes(phrase, names)
            if not named:
                continue
            c = named[0]
            if len(named) > 1 and per_class is not None:
                c = named[int(per_class[i, named].argmax())]
            score = float(det_scores[i])
            if score > float(scores[b, c]) or not bool((boxes[b, c] != -1).any()):
                scores[b, c] = score
                boxes[b, c] = torch.minimum(det_boxes[i].clamp_min(0.0), limits)
    return Detections(boxes=boxes, scores=scores)


# --- detector -----------------------------------------------------------------------------


class GroundingDetector:
    """Finds each image's class names with Grounding DINO, all images in one forward pass.

    A detection is kept when its best prompt-token probability exceeds `box_threshold`; its
    phrase is the prompt tokens above `text_threshold` (transformers' post-processing, as the
    reference used). Results are on the CPU.
    """

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        processor: GroundingDinoProcessor,
        *,
        box_threshold: float = BOX_THRESHOLD,
        text_threshold: float = TEXT_THRESHOLD,
    ) -> None:
        self.model = model
        self.processor = processor
        self.box_threshold = float(box_threshold)
        self.text_threshold = float(text_threshold)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, classes: list[tuple[str, ...]]) -> Detections:
        """Boxes and scores per class: `images` [B, H, W, 3] uint8 RGB, `classes` the names per image."""
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be [B, H, W, 3] uint8, got {list(images.shape)} {images.dtype}")
        if len(classes) != len(images):
            raise ValueError(f"got {len(images)} images but class names for {len(classes)}")
        height, width = images.shape[1:3]
        if not any(classes):
            return assign_detections([{"scores": [], "boxes": [], "text_labels": []}] * len(classes), classes,
                                     (height, width))
        inputs = self.processor(
            images=list(images),
            text=[prompt_text(names) for names in classes],
            padding="longest",
            input_data_format="channels_last",
            return_tensors="pt",
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        results = self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(height, width)] * len(images),
        )
        class_scores = self._class_scores(outputs.logits, inputs["input_ids"], classes, results)
        return assign_detections(results, classes, (height, width), class_scores)

    def _class_scores(
        self, logits: torch.Tensor, input_ids: torch.Tensor, classes: list[tuple[str, ...]], results: list[dict]
    ) -> list[torch.Tensor] | None:
        """Per image, [N kept, C]: each kept box's best probability over each class's prompt tokens."""
        probs = logits.sigmoid()
        # The same selection as the post-processing: a box is kept when its best token beats the threshold.
        keep = probs.max(dim=-1).values > self.box_threshold
        out = []
        for b, names in enumerate(classes):
            kept = probs[b][keep[b]]
            if len(kept) != len(results[b]["scores"]):
                log.warning("detections do not line up with transformers' post-processing; "
                            "phrases naming several classes go to their first class")
                return None
            masks = class_token_masks(input_ids[b], len(names), self.processor.tokenizer)
            length = min(masks.shape[1], kept.shape[1])
            per_class = torch.where(masks[None, :, :length], kept[:, None, :length], 0.0).amax(-1)
            out.append(per_class.float().cpu())
        return out


def class_token_masks(input_ids: torch.Tensor, n_classes: int, tokenizer: Any) -> torch.Tensor:
    """[C, L] bool: which tokens of a prompt from `prompt_text` (ids [L]) spell each class name.

    Class c's tokens are those after the c-th "." and before the next; delimiters, [CLS], [SEP]
    and padding belong to none.
    """
    dot = tokenizer.convert_tokens_to_ids(".")
    is_dot = input_ids == dot
    special = torch.tensor([dot, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id],
                           device=input_ids.device)
    segment = torch.cumsum(is_dot.long(), dim=0) - is_dot.long()
    is_name = ~torch.isin(input_ids, special)
    classes = torch.arange(n_classes, device=input_ids.device)
    return is_name[None] & (segment[None] == classes[:, None])


# --- building -----------------------------------------------------------------------------


def build_detector(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    box_threshold: float = BOX_THRESHOLD,
    text_threshold: float = TEXT_THRESHOLD,
) -> GroundingDetector:
    """A Grounding DINO detector on `device`, in eval mode and frozen.

    `model` is "tiny" (random weights drawn from `seed` alone, on the CPU, so the same seed gives
    the same model on every device) or a folder holding a transformers Grounding DINO checkpoint
    and its processor files; a hub id is fetched when online.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype}")
    device = torch.device(device)
    if model == "tiny":
        detector, processor = _build_tiny(seed)
    else:
        detector, processor = _load_folder(model, dtype)
    detector.to(device=device, dtype=dtype)
    detector.eval()
    detector.requires_grad_(False)
    return GroundingDetector(detector, processor, box_threshold=box_threshold, text_threshold=text_threshold)


def _rng_devices() -> list[int]:
    # torch.manual_seed reseeds every GPU too, wherever the weights are drawn.
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _build_tiny(seed: int) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoImageProcessor
    from transformers import GroundingDinoProcessor

    tokenizer = tiny_tokenizer()
    config = GroundingDinoConfig(
        backbone_config=dict(TINY_BACKBONE),
        text_config={**TINY_TEXT, "vocab_size": len(tokenizer.get_vocab()), "pad_token_id": tokenizer.pad_token_id},
        **TINY_DETECTOR,
    )
    # A private RNG stream: the weights depend on `seed` alone, and callers' random state is untouched.
    with torch.random.fork_rng(devices=_rng_devices()):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = GroundingDinoForObjectDetection(config)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size=dict(TINY_IMAGE_SIZE)), tokenizer=tokenizer
    )
    return model, processor


def tiny_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer built offline, with bert-base-uncased's ids for its delimiters.

    The layout copies bert-base-uncased's: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103,
    [unusedN] fillers, then from 999 the printable ASCII characters other than upper-case
    letters in code-point order, which puts "." at 1012 and "?" at 1029 where Grounding DINO
    looks for them. After those come "##" continuations of every letter and digit, so any
    ASCII word tokenises without [UNK], and the words of the shipped class lists whole, so
    those names are one token per word as with the real vocabulary.
    """
    from transformers import BertTokenizer

    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [f"[unused{i}]" for i in range(99, 99 + 999 - len(tokens))]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars
    tokens += [f"##{ch}" for ch in chars if ch.isalnum()]
    seen = set(tokens)
    for word in _class_words():
        if word not in seen:
            seen.add(word)
            tokens.append(word)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    _check_delimiters(tokenizer, "the tiny tokenizer")
    return tokenizer


def _class_words() -> list[str]:
    """The words of the shipped class lists, as BERT-uncased splits them, in first-seen order."""
    from tokenizers import normalizers, pre_tokenizers

    from magicseg_engine.vocab import BUILTIN, load_vocabulary

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words: dict[str, None] = {}
    for name in BUILTIN:
        for cls in load_vocabulary(name).classes:
            for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(cls)):
                words.setdefault(word)
    return list(words)


def _check_delimiters(tokenizer: Any, origin: str) -> None:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _DELIMITER_IDS}
    wrong = {t: i for t, i in ids.items() if i != _DELIMITER_IDS[t]}
    if wrong:
        got = ", ".join(f"{t!r} = {i}" for t, i in wrong.items())
        want = ", ".join(f"{t!r} = {i}" for t, i in _DELIMITER_IDS.items())
        raise UsageError(
            f"{origin} has {got}; Grounding DINO splits prompts at bert-base-uncased's ids ({want}), "
            "so it needs that vocabulary"
        )


# --- loading ------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _first_sentence(err: BaseException) -> str:
    # transformers' loading errors go on for several sentences of hub advice.
    return _one_line(err).split(". ", 1)[0]


def _resolve_folder(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"detector {name} is a file, not a Grounding DINO folder (one with {_FOLDER_FILES})")
        return path.resolve()
    if not re.fullmatch(_HUB_ID, name):
        raise UsageError(f"detector folder {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS)).resolve()
    except Exception as err:
        raise UsageError(
            f"detector {name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({_first_sentence(err)}); offline, copy the Grounding DINO folder here and pass its path"
        ) from None


def _load_folder(name: str, dtype: torch.dtype) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    root = _resolve_folder(name)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{root} has no config.json; expected a Grounding DINO folder with {_FOLDER_FILES}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {config_path}: {_one_line(err)}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "grounding-dino":
        raise UsageError(f"{root} holds a {model_type or 'model of unknown type'} model, not a Grounding DINO "
                         "detector (model_type grounding-dino)")
    try:
        processor = GroundingDinoProcessor.from_pretrained(str(root), local_files_only=True)
    except Exception as err:
        raise UsageError(f"could not load the Grounding DINO processor from {root} ({_first_sentence(err)}); "
                         f"expected {_FOLDER_FILES}") from None
    _check_delimiters(processor.tokenizer, f"the tokenizer in {root}")
    try:
        model, info = GroundingDinoForObjectDetection.from_pretrained(
            str(root), local_files_only=True, output_loading_info=True, dtype=dtype
        )
    except Exception as err:
        raise UsageError(f"could not load the Grounding DINO model from {root}: {_one_line(err)}") from None
    # transformers fills missing weights with random ones and only warns; a half-random
    # detector would find plausible-looking garbage, so refuse it.
    missing = sorted(info.get("missing_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        example = missing[0] if missing else str(mismatched[0])
        raise UsageError(
            f"{root} does not match its config.json: {len(missing)} weights missing and "
            f"{len(mismatched)} of the wrong shape (e.g. {example})"
        )
    return model, processor
