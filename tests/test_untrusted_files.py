"""Checkpoints from elsewhere: a pickle that would run code is refused in one line wherever a
checkpoint is loaded, and the code never runs; TorchScript archives are read without TorchScript."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.errors import UsageError


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


class _RunsCode:
    """Unpickling this calls os.system, which creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(path, marker, kind: str = "torch") -> None:
    """Write a checkpoint at `path` whose loading would create `marker`: as torch.save writes
    files ("torch", a zip), or as a bare pickle ("pickle", protocol 2 so the global is reached)."""
    payload = {"format": 1, "step": 1, "model": _RunsCode(marker), "sam": _RunsCode(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


def assert_refused(result, marker, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "pickled objects" in lines[0] and "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]
    assert not marker.exists()


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    from magicseg_engine.train.synthetic import write_synthetic_run

    run = tmp_path_factory.mktemp("shapes") / "train"
    write_synthetic_run(run, 8, size=64, seed=1)
    return run


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_pretrain_resume_from_a_poisoned_checkpoint_is_refused(shapes_run, tmp_path, kind):
    out, marker = tmp_path / "out", tmp_path / "ran"
    poison(out / "checkpoints" / "step-00000001.pt", marker, kind)
    result = invoke("pretrain", "--data", shapes_run, "--out", out, "--resume", "--device", "cpu")
    assert_refused(result, marker, "step-00000001.pt")
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "step-00000001.pt"]


def test_evaluate_refuses_a_poisoned_checkpoint(tmp_path):
    from magicseg_engine.evaluate.run import load_segmenter

    path, marker = tmp_path / "step-00000001.pt", tmp_path / "ran"
    poison(path, marker)
    with pytest.raises(UsageError, match="pickled objects") as err:
        load_segmenter(path)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.slow
def test_generate_refuses_a_poisoned_sam_checkpoint(tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "ran"
    poison(evil, marker, "pickle")
    out = tmp_path / "run"
    result = invoke("generate", "--classes", "voc", "--num-pairs", 1, "--out", out, "--device", "cpu",
                    "--sam-model", "tiny", "--sam-checkpoint", evil)
    assert_refused(result, marker, "SAM checkpoint", str(evil))
    assert not out.exists()


def test_train_world_resume_from_a_poisoned_state_is_refused(tmp_path):
    from magicseg_engine.world.shapes import World
    from magicseg_engine.world.train import STATE_DIR, WorldTrainConfig, train_world

    out, marker = tmp_path / "world", tmp_path / "ran"
    flags = {"samples": 8, "vae_steps": 2, "unet_steps": 1, "unet_batch": 2, "checkpoint_every": 1}

    def stop(stage, done, total, loss):
        if stage == "vae" and done == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_world(out, WorldTrainConfig(**flags), World(), progress=stop)
    poison(out / STATE_DIR / "vae.pt", marker)
    result = invoke("train-world", "--out", out, "--resume", "--samples", 8, "--vae-steps", 2, "--unet-steps", 1,
                    "--batch-size", 2, "--checkpoint-every", 1)
    assert_refused(result, marker, "vae.pt", "--overwrite")


def test_train_world_sam_resume_from_a_poisoned_state_is_refused(tmp_path):
    from magicseg_engine.world.sam import SamTrainConfig, train_world_sam
    from magicseg_engine.world.shapes import World
    from magicseg_engine.world.train import STATE_DIR

    out, marker = tmp_path / "sam", tmp_path / "ran"

    def stop(done, total, loss):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_world_sam(out, SamTrainConfig(steps=2, batch=2, checkpoint_every=1), World(), progress=stop)
    poison(out / STATE_DIR / "sam.pt", marker)
    result = invoke("train-world-sam", "--out", out, "--resume", "--steps", 2, "--batch-size", 2,
                    "--checkpoint-every", 1)
    assert_refused(result, marker, "sam.pt")


def _tiny_clip(seed: int):
    from magicseg_engine.train.model import MagicSegModel, SegModelConfig

    torch.manual_seed(seed)
    return MagicSegModel(SegModelConfig.preset("tiny"))


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_pretrain_refuses_poisoned_clip_weights(shapes_run, tmp_path, kind):
    evil, marker, out = tmp_path / "clip.pt", tmp_path / "ran", tmp_path / "out"
    poison(evil, marker, kind)
    result = invoke("pretrain", "--data", shapes_run, "--out", out, "--clip-weights", evil, "--steps", 1,
                    "--device", "cpu")
    assert_refused(result, marker, str(evil))
    assert not (out / "checkpoints").exists()


def _script_archive(path, data_pkl: bytes | None = None):
    """A TorchScript archive of the tiny CLIP towers; `data_pkl` replaces its pickled attributes."""
    import warnings

    source = _tiny_clip(1).clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(source).save(str(path))
    if data_pkl is None:
        return source
    with zipfile.ZipFile(path) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.endswith("/data.pkl") and n.count("/") == 1)
    entries[name] = data_pkl
    with zipfile.ZipFile(path, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    return source


def test_torchscript_weights_are_read_without_torchscript(tmp_path, monkeypatch):
    """OpenAI's CLIP archives load as before, but nothing of the archive runs: torch.jit.load,
    which would run a module's __setstate__, is never called."""
    from magicseg_engine.train.model import load_clip_weights

    source = _script_archive(tmp_path / "ViT.pt")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")
    monkeypatch.setattr(torch.jit, "load", refuse)
    model = _tiny_clip(2)
    report = load_clip_weights(model, tmp_path / "ViT.pt")
    assert not (report.missing or report.unexpected)
    for k, v in source.state_dict().items():
        assert torch.equal(model.clip.state_dict()[k], v), k


def test_a_torchscript_archive_whose_data_runs_code_is_refused(tmp_path):
    from magicseg_engine.train.model import load_clip_weights

    marker = tmp_path / "ran"
    path = tmp_path / "ViT.pt"
    _script_archive(path, pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(UsageError, match="pickled objects") as err:
        load_clip_weights(_tiny_clip(2), path)
    assert "\n" not in str(err.value) and not marker.exists()


@pytest.mark.parametrize("component, weights, pickled", [
    ("unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
])
def test_a_diffusers_folder_with_pickled_weights_that_run_code_is_refused(tmp_path, component, weights, pickled):
    """diffusers and transformers read .bin weights with the weights-only unpickler."""
    from families import write_family

    from magicseg_engine.config import DiffusionConfig
    from magicseg_engine.generate.models import load_diffusion

    root, marker = write_family(tmp_path / "model", "sd1"), tmp_path / "ran"
    (root / component / weights).unlink()
    poison(root / component / pickled, marker)
    config = DiffusionConfig(architecture="sd15", weights="pretrained", model=str(root), dtype="float32")
    with pytest.raises(UsageError, match=f"could not load .*{component}") as err:
        load_diffusion(config)
    assert "\n" not in str(err.value) and not marker.exists()


def test_a_detector_folder_with_pickled_weights_that_run_code_is_refused(tmp_path):
    from magicseg_engine.masks.detector import build_detector

    tiny = build_detector("tiny", seed=0)
    folder, marker = tmp_path / "detector", tmp_path / "ran"
    tiny.model.save_pretrained(folder)
    tiny.processor.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    poison(folder / "pytorch_model.bin", marker)
    with pytest.raises(UsageError, match="could not load the Grounding DINO model") as err:
        build_detector(str(folder))
    assert "\n" not in str(err.value) and not marker.exists()


def test_big_files_are_hashed_once_per_process_while_unchanged(tmp_path, monkeypatch):
    import hashlib

    import magicseg_engine.safe_files as safe_files

    hashed = []

    def counting(*args):
        hashed.append(1)
        return hashlib.sha256(*args)
    monkeypatch.setattr(safe_files, "hashlib", type("H", (), {"sha256": staticmethod(counting)}))
    monkeypatch.setattr(safe_files, "_digests", {})
    path = tmp_path / "model.onnx"
    path.write_bytes(b"a" * 1000)
    small = safe_files.file_sha256(path)
    assert safe_files.file_sha256(path) == small == hashlib.sha256(b"a" * 1000).hexdigest() and len(hashed) == 2

    monkeypatch.setattr(safe_files, "REMEMBER_FROM_BYTES", 100)  # "big" from 100 bytes on
    hashed.clear()
    assert safe_files.file_sha256(path) == safe_files.file_sha256(path) == small and len(hashed) == 1
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"b" * 1000)
    os.replace(fresh, path)  # same size, new bytes, as exports and engines are written: another inode
    assert safe_files.file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest() and len(hashed) == 2
    both = safe_files.sha256_files([path, path])
    assert both == hashlib.sha256(b"b" * 2000).hexdigest() and safe_files.sha256_files([path, path]) == both
    assert len(hashed) == 3
