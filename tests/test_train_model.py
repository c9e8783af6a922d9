"""The segmentation model: shapes, freezing, deep prompts, text embedding cache, weight loading, optimiser groups."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import save_file

from magicseg_engine.errors import UsageError
from magicseg_engine.train.model import (
    MagicSegModel,
    SegModelConfig,
    TextEmbeddingBank,
    load_clip_weights,
    mask_logits,
    param_groups,
    text_tower_from_transformers,
)

TINY = SegModelConfig.preset("tiny")


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model's matrices are too small to split across threads: the synchronisation
    # costs more than it saves, and many times more when another process holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, **overrides) -> MagicSegModel:
    torch.manual_seed(seed)
    config = SegModelConfig.preset("tiny", **overrides) if overrides else TINY
    return MagicSegModel(config).eval()


def inputs(b: int = 2, k: int = 5, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randn(b, k, TINY.embed_dim, generator=g)


def clip_state(model: MagicSegModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.clip.state_dict().items()}


# --- configuration -----------------------------------------------------------------------------


def test_presets():
    assert TINY.grid == (8, 8) and TINY.deep_prompt_layers == TINY.layers == 4
    vit = SegModelConfig.preset("vit-b16")
    # The ViT-B/16 towers come from open_clip's own config; only the resolution is ours.
    assert (vit.width, vit.layers, vit.heads, vit.patch_size, vit.embed_dim) == (768, 12, 12, 16, 512)
    assert (vit.text_width, vit.text_layers, vit.text_heads, vit.context_length) == (512, 12, 8, 77)
    assert vit.grid == (32, 32) and vit.prompt_tokens == 10 and vit.deep_prompt_layers == 12
    assert (vit.decoder_layers, vit.decoder_heads, vit.decoder_dim) == (3, 8, 512)
    # Saved with a run and read back, a configuration is the same configuration.
    for config in (TINY, vit):
        assert SegModelConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize("overrides", [
    {"width": 1024},  # contradicts ViT-B-16
    {"image_size": 500},  # not a multiple of the patch
    {"prompt_depth": 13},  # more than the layers
    {"templates": ["a photo of a thing."]},  # no slot for the name
    {"open_clip_model": "no-such-model"},
    {"decoder_widht": 512},  # typo: extra fields are refused
])
def test_config_rejects(overrides):
    with pytest.raises(ValidationError):
        SegModelConfig.preset("vit-b16", **overrides)


def test_unknown_preset():
    with pytest.raises(UsageError, match="tiny"):
        SegModelConfig.preset("vit-h14")


# --- forward -----------------------------------------------------------------------------------


def test_tiny_shapes():
    model = tiny()
    images, classes = inputs(b=2, k=5)
    out = model(images, classes)
    assert len(out["logits"]) == len(out["layers"]) == TINY.decoder_layers
    for logits, (pixels, queries) in zip(out["logits"], out["layers"]):
        assert logits.shape == (2, 5, 8, 8)
        assert pixels.shape == (2, 64, TINY.embed_dim) and queries.shape == (2, 5, TINY.embed_dim)
    assert out["pixel_embeddings"].shape == (2, 64, TINY.embed_dim)
    assert out["class_queries"].shape == (2, 5, TINY.embed_dim)
    assert out["global_embedding"].shape == (2, TINY.embed_dim)
    assert torch.allclose(out["global_embedding"].norm(dim=-1), torch.ones(2))
    assert out["logit_scale"].dim() == 0 and out["grid"] == (8, 8)

    # One vocabulary shared by the batch is the same as repeating it per image.
    shared = model(images, classes[0])["logits"][-1]
    assert torch.allclose(shared, model(images, classes[0].expand(2, -1, -1))["logits"][-1])

    assert model.predict(images, classes, (64, 48)).shape == (2, 5, 64, 48)
    # Other input sizes work too: the positional embedding follows the patch grid.
    assert model(images[:, :, :48], classes)["logits"][-1].shape == (2, 5, 6, 8)


def test_padded_classes_do_not_affect_real_ones():
    model = tiny()
    images, classes = inputs(b=1, k=3)
    padded = torch.cat([classes, torch.randn(1, 2, TINY.embed_dim)], dim=1)
    mask = torch.tensor([[False, False, False, True, True]])
    alone = model(images, classes)["logits"][-1]
    with_pad = model(images, padded, class_padding_mask=mask)["logits"][-1]
    assert torch.allclose(alone, with_pad[:, :3], atol=1e-5)


def test_vit_b16_shapes_on_meta_device():
    # The real architecture, without allocating or computing anything.
    with torch.device("meta"):
        model = MagicSegModel(SegModelConfig.preset("vit-b16"))
        out = model(torch.empty(2, 3, 512, 512), torch.empty(7, 512))
    assert [tuple(t.shape) for t in out["logits"]] == [(2, 7, 32, 32)] * 3
    assert out["pixel_embeddings"].shape == (2, 1024, 512) and out["global_embedding"].shape == (2, 512)


def test_logits_equal_the_embedding_route():
    model = tiny()
    images, classes = inputs()
    out = model(images, classes)
    b, k, h, w = out["logits"][-1].shape
    for logits, (pixels, queries) in zip(out["logits"], out["layers"]):
        assert torch.equal(logits, mask_logits(pixels, queries, out["logit_scale"]).view(b, k, h, w))
        by_hand = out["logit_scale"] * torch.einsum("bpe,bke->bkp", pixels, queries)
        assert torch.allclose(logits.flatten(2), by_hand, atol=1e-5)
    assert out["pixel_embeddings"] is out["layers"][-1][0] and out["class_queries"] is out["layers"][-1][1]


def test_frozen_backbone_trains_only_prompts_and_decoder():
    model = tiny().train()
    images, classes = inputs()
    out = model(images, classes)
    (sum(l.sum() for l in out["logits"]) + out["global_embedding"].sum()).backward()
    for name, p in model.named_parameters():
        if name.startswith("clip."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unfrozen_backbone_trains_the_image_tower_but_not_the_text_tower():
    model = tiny(freeze_backbone=False).train()
    images, classes = inputs()
    sum(l.sum() for l in model(images, classes)["logits"]).backward()
    visual = dict(model.clip.visual.named_parameters())
    assert all(p.grad is not None for p in visual.values())
    text = [p for n, p in model.clip.named_parameters() if not n.startswith("visual.")]
    assert text and all(not p.requires_grad for p in text)


def test_prompts_change_the_output():
    model = tiny()
    images, classes = inputs()
    before = model(images, classes)["logits"][-1]
    with torch.no_grad():
        model.prompts[-1].add_(1.0)  # only the last layer's prompts: deep prompts matter
    assert not torch.allclose(before, model(images, classes)["logits"][-1])


def test_partial_prompt_depth_and_no_prompts():
    model = tiny(prompt_depth=2, prompt_tokens=3)
    assert model.prompts.shape == (2, 3, TINY.width)
    images, classes = inputs()
    before = model(images, classes)["logits"][-1]
    with torch.no_grad():
        model.prompts[1].mul_(-2.0)
    assert not torch.allclose(before, model(images, classes)["logits"][-1])

    plain = tiny(prompt_tokens=0)
    assert plain.prompts is None
    assert plain(images, classes)["logits"][-1].shape == (2, 5, 8, 8)


def test_a_few_steps_fit_a_batch():
    model = tiny().train()
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.01, head_lr_mult=1.0))
    images, classes = inputs(b=2, k=3)
    target = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    losses = []
    for _ in range(20):
        loss = sum(F.binary_cross_entropy_with_logits(l, target) for l in model(images, classes)["logits"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# --- text embeddings ---------------------------------------------------------------------------


def count_text_passes(model: MagicSegModel) -> list[int]:
    calls: list[int] = []
    model.clip.transformer.register_forward_hook(lambda *_: calls.append(1))  # the text transformer
    return calls


def test_text_bank_encodes_once_and_caches_on_disk(tmp_path):
    model = tiny()
    calls = count_text_passes(model)
    names = ["cat", "dog", "traffic light", "potted plant"]

    bank = TextEmbeddingBank(model, cache_dir=tmp_path, batch_size=5)
    table = bank.lookup(names)
    assert table.shape == (4, TINY.embed_dim)
    assert torch.allclose(table.norm(dim=-1), torch.ones(4))
    assert len(calls) > 0 and len(list(tmp_path.iterdir())) == 1

    calls.clear()
    assert torch.equal(bank.lookup(["dog", "cat"]), table[[1, 0]])  # from memory
    fresh = TextEmbeddingBank(model, cache_dir=tmp_path)
    assert torch.equal(fresh.lookup(list(reversed(names))), table.flip(0))  # from disk
    assert calls == []

    # What a name's embedding is: the mean of its unit template embeddings, renormalised.
    import open_clip

    with torch.no_grad():
        tokens = open_clip.tokenize([t.format("dog") for t in TINY.templates])
        each = F.normalize(model.clip.encode_text(tokens), dim=-1)
    assert torch.allclose(table[1], F.normalize(each.mean(0), dim=0), atol=1e-5)


def test_text_bank_cache_invalidates(tmp_path):
    model = tiny()
    calls = count_text_passes(model)
    names = ["cat", "dog"]
    base = TextEmbeddingBank(model, cache_dir=tmp_path).lookup(names)

    calls.clear()
    other = TextEmbeddingBank(model, cache_dir=tmp_path, templates=["a {} in the wild."]).lookup(names)
    assert calls and not torch.allclose(base, other)

    calls.clear()
    with torch.no_grad():
        model.clip.ln_final.bias.add_(0.5)
    changed = TextEmbeddingBank(model, cache_dir=tmp_path).lookup(names)
    assert calls and not torch.allclose(base, changed)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


# --- loading weights ---------------------------------------------------------------------------


def assert_clip_equal(model: MagicSegModel, expected: dict[str, torch.Tensor]) -> None:
    got = model.clip.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_load_torch_checkpoint_with_module_prefix_under_state_dict(tmp_path):
    source = clip_state(tiny(seed=1))
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.items()}}, path)
    model = tiny(seed=2)
    report = load_clip_weights(model, path)
    assert report.loaded == len(source) and not (report.missing or report.unexpected or report.resized)
    assert_clip_equal(model, source)


def test_load_safetensors(tmp_path):
    source = clip_state(tiny(seed=1))
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model = tiny(seed=2)
    load_clip_weights(model, path)
    assert_clip_equal(model, source)


def test_load_torchscript_archive(tmp_path):
    # OpenAI released its CLIP weights as TorchScript archives.
    source = tiny(seed=1).clip
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        torch.jit.script(source).save(str(path))
    model = tiny(seed=2)
    report = load_clip_weights(model, path)
    assert not (report.missing or report.unexpected)
    assert_clip_equal(model, source.state_dict())


def test_load_interpolates_the_positional_embedding(tmp_path):
    small = tiny(seed=1, image_size=32)  # a 4x4 grid, like CLIP's 224 px against our 512 px
    with torch.no_grad():
        # A grid that is constant per channel must stay so; the class token row is kept as is.
        small.clip.visual.positional_embedding[1:] = torch.linspace(-1, 1, TINY.width)
    source = clip_state(small)
    path = tmp_path / "small.bin"
    torch.save(source, path)

    model = tiny(seed=2)
    report = load_clip_weights(model, path)
    assert report.resized and "positional_embedding" in report.resized[0]
    pos = model.clip.visual.positional_embedding
    assert pos.shape == (1 + 64, TINY.width)
    assert torch.equal(pos[0], source["visual.positional_embedding"][0])
    assert torch.allclose(pos[1:], torch.linspace(-1, 1, TINY.width).expand(64, -1), atol=1e-5)
    for k, v in source.items():
        if k != "visual.positional_embedding":
            assert torch.equal(model.clip.state_dict()[k], v), k


@pytest.mark.parametrize("other", [{"width": 32}, {"layers": 3}, {"text_width": 32}])
def test_another_architecture_is_one_clear_error(tmp_path, other):
    path = tmp_path / "other.pt"
    torch.save(clip_state(tiny(**other)), path)
    with pytest.raises(UsageError, match="different CLIP architecture") as err:
        load_clip_weights(tiny(), path)
    assert "\n" not in str(err.value)


def test_checkpoints_that_are_not_clip_or_incomplete(tmp_path):
    model = tiny()
    bogus = tmp_path / "bogus.pt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, bogus)
    with pytest.raises(UsageError, match="not an open_clip ViT CLIP"):
        load_clip_weights(model, bogus)
    with pytest.raises(UsageError, match="does not exist"):
        load_clip_weights(model, tmp_path / "nowhere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read"):
        load_clip_weights(model, garbage)

    state = clip_state(tiny(seed=1))
    del state["ln_final.weight"]
    state["logit_bias"] = torch.zeros(())  # e.g. a SigLIP-style extra
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(UsageError, match="lacks 1 weights"):
        load_clip_weights(model, partial)
    report = load_clip_weights(model, partial, allow_missing=True)
    assert report.missing == ("ln_final.weight",) and report.unexpected == ("logit_bias",)


@pytest.mark.parametrize("projection", [False, True])
def test_a_transformers_clip_text_encoder_embeds_alike_in_the_text_tower(projection):
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(3)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=24, hidden_act="quick_gelu",
                            projection_dim=48 if projection else 64, eos_token_id=49407)
    theirs = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    ours = tiny(seed=4, quick_gelu=True, context_length=24, embed_dim=config.projection_dim)
    state = text_tower_from_transformers(theirs.state_dict())
    assert set(state) == {k for k in ours.clip.state_dict() if not k.startswith(("visual.", "logit_"))}
    ours.clip.load_state_dict(state, strict=False)
    # Captions of different lengths: the pooled token is each one's end-of-text.
    tokens = open_clip.tokenize(["a red circle", "a blue star and a green ring on a dark floor"], 24)
    with torch.no_grad():
        out = theirs(input_ids=tokens)
        expected = out.text_embeds if projection else out.pooler_output
        torch.testing.assert_close(ours.clip.encode_text(tokens), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UsageError, match="no encoder layers"):
        text_tower_from_transformers({k: v for k, v in theirs.state_dict().items() if ".layers." not in k})
    with pytest.raises(UsageError, match="is it a CLIP text model"):
        text_tower_from_transformers({"encoder.weight": torch.zeros(3)})


# --- optimiser groups --------------------------------------------------------------------------


@pytest.mark.parametrize("freeze", [True, False])
def test_param_groups_cover_trainable_parameters_once(freeze):
    model = tiny(freeze_backbone=freeze)
    groups = param_groups(model, lr=2e-5, weight_decay=0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable

    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(by_name) == ({"head", "head_no_decay"} | (set() if freeze else {"backbone", "backbone_no_decay"}))
    assert by_name["head"]["lr"] == pytest.approx(2e-4) and by_name["head"]["weight_decay"] == 0.01
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "prompts" in no_decay and "logit_scale" in no_decay and "query_norm.weight" in no_decay
    assert "query_in.bias" in no_decay and "query_in.weight" not in no_decay
    if not freeze:
        assert by_name["backbone"]["lr"] == pytest.approx(2e-5)
        assert {"clip.visual.positional_embedding", "clip.visual.class_embedding"} <= no_decay
        assert "clip.visual.conv1.weight" not in no_decay
    torch.optim.AdamW(groups)  # the extra keys are accepted
