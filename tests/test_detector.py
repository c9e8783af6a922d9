"""Grounding DINO: the tiny detector, phrase-to-class mapping, and detectors loaded from folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from magicseg_engine.errors import UsageError
from magicseg_engine.masks.detector import (
    BOX_THRESHOLD,
    TEXT_THRESHOLD,
    GroundingDetector,
    assign_detections,
    build_detector,
    class_token_masks,
    phrase_classes,
    prompt_text,
    tiny_tokenizer,
)
from magicseg_engine.vocab import BUILTIN, load_vocabulary

IMAGES = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
CLASSES = [("cat",), ("traffic light", "dog")]
# Which [B, C_max] slots hold a class of CLASSES.
REAL = torch.tensor([[True, False], [True, True]])


# The tiny models' matrices are a few KB: one torch thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny() -> GroundingDetector:
    return build_detector("tiny", seed=0)


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _with_thresholds(detector: GroundingDetector, box: float, text: float = TEXT_THRESHOLD) -> GroundingDetector:
    return GroundingDetector(detector.model, detector.processor, box_threshold=box, text_threshold=text)


# --- the tiny detector --------------------------------------------------------------------


def test_tiny_weights_come_from_the_seed_alone(tiny):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = build_detector("tiny", seed=0)
    # Building draws from a private stream: the caller's random state is where it was.
    assert torch.equal(torch.rand(3), expected_next)
    assert _states_equal(tiny.model, again.model)
    assert not _states_equal(tiny.model, build_detector("tiny", seed=1).model)
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_tiny_tokenizer_has_bert_delimiter_ids_and_whole_class_words():
    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "?")}
    assert ids == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
    encoded = tokenizer(prompt_text(["Traffic light", "dog"])).input_ids
    assert tokenizer.convert_ids_to_tokens(encoded) == ["[CLS]", "traffic", "light", ".", "dog", ".", "[SEP]"]
    for vocabulary in BUILTIN:
        for name in load_vocabulary(vocabulary).classes:
            tokens = tokenizer.tokenize(name)
            assert "[UNK]" not in tokens and not any(t.startswith("##") for t in tokens), (name, tokens)
    # A word outside the lists falls back to letters and continuations, never to [UNK].
    assert tokenizer.tokenize("Zebroid") == ["z", "##e", "##b", "##r", "##o", "##i", "##d"]


def test_prompt_text_is_grounding_dinos_format():
    assert prompt_text(("Traffic  Light", "dog")) == "traffic light . dog ."
    # A "." inside a name would split it into two phrases.
    assert prompt_text(("St. Bernard",)) == "st bernard ."
    assert prompt_text(()) == ""


def test_detections_have_one_box_per_class_inside_the_image(tiny):
    det = tiny(IMAGES, CLASSES)
    assert det.boxes.shape == (2, 2, 4) and det.boxes.dtype == torch.float32
    assert det.scores.shape == (2, 2) and det.scores.dtype == torch.float32
    # The slot past image 0's only class is never a detection.
    assert torch.equal(det.boxes[0, 1], torch.full((4,), -1.0)) and det.scores[0, 1] == 0
    found = det.found
    assert not (found & ~REAL).any()
    x0, y0, x1, y1 = det.boxes[found].unbind(-1)
    assert ((0 <= x0) & (x0 <= x1) & (x1 <= 64) & (0 <= y0) & (y0 <= y1) & (y1 <= 64)).all()
    assert (det.scores[found] > BOX_THRESHOLD).all() and (det.scores[~found] == 0).all()
    assert (det.boxes[~found] == -1).all()
    again = tiny(IMAGES, CLASSES)
    assert torch.equal(again.boxes, det.boxes) and torch.equal(again.scores, det.scores)


def test_thresholds_decide_what_is_found(tiny, caplog):
    assert (tiny.box_threshold, tiny.text_threshold) == (0.3, 0.25)
    everything = _with_thresholds(tiny, box=0.0)(IMAGES, CLASSES)
    # Ties between classes a phrase names are settled per box; that needs the boxes to line up
    # with transformers' post-processing, which warns when they do not.
    assert "do not line up" not in caplog.text
    assert torch.equal(everything.found, REAL)
    assert (everything.scores[REAL] > 0).all()
    nothing = _with_thresholds(tiny, box=1.01)(IMAGES, CLASSES)
    assert not nothing.found.any()
    assert (nothing.boxes == -1).all() and (nothing.scores == 0).all()


def test_all_images_go_through_one_forward_pass_with_their_prompts(tiny):
    seen = []
    handle = tiny.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    try:
        tiny(IMAGES, CLASSES)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert seen[0]["pixel_values"].shape[0] == 2
    texts = tiny.processor.tokenizer.batch_decode(seen[0]["input_ids"], skip_special_tokens=True)
    assert [t.replace(" .", ".") for t in texts] == ["cat.", "traffic light. dog."]


def test_images_without_classes_get_empty_results(tiny):
    det = tiny(IMAGES, [(), ()])
    assert det.boxes.shape == (2, 0, 4) and det.scores.shape == (2, 0)
    mixed = _with_thresholds(tiny, box=0.0)(IMAGES, [(), ("dog",)])
    assert mixed.found.tolist() == [[False], [True]]


def test_bad_inputs_are_rejected(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny(IMAGES.astype(np.float32), CLASSES)
    with pytest.raises(ValueError, match="2 images but class names for 1"):
        tiny(IMAGES, CLASSES[:1])


# --- phrases to classes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("traffic light", [0]),
        ("traffic light. [SEP]", [0]),
        ("t - shirt", [1]),  # decoded with spaces around the hyphen
        ("tshirt", [1]),
        ("light", [0]),  # only part of the name passed the text threshold
        ("dog", [2]),  # a full name beats being part of "hot dog"
        ("hot dog.", [3]),
        ("traffic light dog", [0, 2]),  # two names, the "." between them below the threshold
        ("cat. dog", [2]),
        ("caf\u00e9", [4]),
        ("", []),
        (". [SEP]", []),
        ("tree", []),
    ],
)
def test_phrase_names_its_classes(phrase, expected):
    names = ("Traffic light", "T-shirt", "dog", "hot dog", "cafe")
    assert phrase_classes(phrase, names) == expected


def test_each_class_keeps_its_best_box_clipped_to_the_image():
    results = [
        {
            "scores": torch.tensor([0.4, 0.9, 0.5, 0.95, 0.6]),
            "boxes": torch.tensor([[1.0, 2, 3, 4], [-5, 10, 70, 80], [5, 6, 7, 8], [0, 0, 9, 9], [9, 9, 10, 10]]),
            "text_labels": ["dog", "traffic light", "dog.", "", "light"],
        },
        {"scores": torch.tensor([0.8]), "boxes": torch.tensor([[1.0, 1, 2, 2]]), "text_labels": ["tree"]},
    ]
    det = assign_detections(results, [("traffic light", "dog"), ("cat",)], (64, 48))
    assert det.boxes.tolist() == [
        [[0.0, 10.0, 48.0, 64.0], [5.0, 6.0, 7.0, 8.0]],
        [[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]],
    ]
    torch.testing.assert_close(det.scores, torch.tensor([[0.9, 0.5], [0.0, 0.0]]))


def test_a_phrase_naming_two_classes_goes_to_the_one_its_tokens_score_highest():
    results = [{"scores": torch.tensor([0.7]), "boxes": torch.tensor([[1.0, 1, 5, 5]]),
                "text_labels": ["cat dog"]}]
    classes = [("cat", "dog")]
    by_tokens = assign_detections(results, classes, (8, 8), class_scores=[torch.tensor([[0.3, 0.6]])])
    assert by_tokens.found.tolist() == [[False, True]]
    first_named = assign_detections(results, classes, (8, 8))
    assert first_named.found.tolist() == [[True, False]]


def test_class_tokens_are_the_spans_between_delimiters():
    tokenizer = tiny_tokenizer()
    batch = tokenizer([prompt_text(["cat"]), prompt_text(["traffic light", "dog"])], padding="longest",
                      return_tensors="pt")
    # [CLS] traffic light . dog . [SEP]
    assert class_token_masks(batch.input_ids[1], 2, tokenizer).nonzero().tolist() == [[0, 1], [0, 2], [1, 4]]
    # [CLS] cat . [SEP] [PAD] [PAD] [PAD]: padding belongs to no class.
    assert class_token_masks(batch.input_ids[0], 1, tokenizer).nonzero().tolist() == [[0, 1]]


# --- folders --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grounding-dino")
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    return folder


def test_a_saved_folder_loads_to_the_same_detector(saved, tiny):
    loaded = build_detector(str(saved))
    assert _states_equal(loaded.model, tiny.model)
    a = _with_thresholds(tiny, box=0.0)(IMAGES, CLASSES)
    b = _with_thresholds(loaded, box=0.0)(IMAGES, CLASSES)
    assert a.found.any()
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)


def _drop_a_weight(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    del state[sorted(state)[-1]]
    save_file(state, path, metadata={"format": "pt"})


def _foreign_tokenizer(folder: Path) -> None:
    from transformers import BertTokenizer

    BertTokenizer().save_pretrained(folder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: shutil.rmtree(root), "detector folder .* does not exist"),
        (lambda root: (root / "config.json").unlink(), "has no config.json; expected a Grounding DINO folder"),
        (lambda root: (root / "config.json").write_text(json.dumps({"model_type": "bert"})),
         "holds a bert model, not a Grounding DINO"),
        (lambda root: (root / "processor_config.json").unlink(), "could not load the Grounding DINO processor"),
        (_foreign_tokenizer, "splits prompts at bert-base-uncased's ids"),
        (lambda root: (root / "model.safetensors").write_bytes(b"not a checkpoint"),
         "could not load the Grounding DINO model"),
        (lambda root: _drop_a_weight(root / "model.safetensors"), "does not match its config.json: .* missing"),
    ],
    ids=["missing-folder", "no-config", "other-model", "no-processor", "foreign-vocab", "corrupt", "missing-weight"],
)
def test_broken_folders_are_usage_errors(saved, tmp_path, damage, message):
    copy = tmp_path / "detector"
    shutil.copytree(saved, copy)
    damage(copy)
    with pytest.raises(UsageError, match=message) as err:
        build_detector(str(copy))
    assert "\n" not in str(err.value)


def test_a_file_is_not_a_detector_folder(saved):
    with pytest.raises(UsageError, match="is a file, not a Grounding DINO folder"):
        build_detector(str(saved / "config.json"))


def test_hub_id_offline_says_to_pass_a_local_folder(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="could not be fetched .*pass its path") as err:
        build_detector("magicseg-nowhere/no-such-detector")
    assert "\n" not in str(err.value)
