import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.engine.backends import make_runners, torch_runners, with_attention_kernel
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.sampler import PairedSampler
from magicseg_engine.pipeline import build_sampler


@pytest.fixture(scope="module")
def sampler(tiny_sampler):
    # The shared tiny sampler (conftest.py): these tests sample with it, wrap its models in
    # other samplers, and hook its UNet only inside try/finally.
    return tiny_sampler


def test_torch_runners_are_the_modules_themselves(sampler):
    r = torch_runners(sampler.models)
    ids = sampler.models.tokenizer(["a dog"])
    context, pooled = r.encode_text(ids)
    assert bool((context == sampler.models.text_encoder(ids)[0]).all()) and pooled is None


@pytest.mark.slow
def test_compile_backend_draws_what_eager_draws(sampler):
    compiled = PairedSampler(sampler.models, sampler.settings, sampler.device, sampler.dtype,
                             runners=make_runners("compile", sampler.models))
    a = compiled(["a dog on a beach"], ["nothing on a beach"], [3])
    b = sampler(["a dog on a beach"], ["nothing on a beach"], [3])
    assert np.abs(a.positives.astype(int) - b.positives.astype(int)).max() <= 2
    assert np.abs(a.negatives.astype(int) - b.negatives.astype(int)).max() <= 2


@pytest.mark.gpu
def test_compile_with_cuda_graphs_keeps_outputs_across_calls():
    """Under CUDA graphs a call's output may share memory with the next call's; the empty
    prompt's cached embedding and the VAE's chunks must survive later calls."""
    eager = build_sampler(load_preset("tiny"), "cuda")
    eager.settings.vae_batch_size = 1  # several decode calls per batch
    compiled = PairedSampler(eager.models, eager.settings, eager.device, eager.dtype,
                             runners=make_runners("compile", eager.models))
    prompts, negatives = ["a dog on a beach", "a cat on a sofa"], ["nothing on a beach", "nothing on a sofa"]
    for seeds in ([1, 2], [3, 4]):  # the second batch reuses the first batch's cached embedding
        a = compiled(prompts, negatives, seeds)
        b = eager(prompts, negatives, seeds)
        assert np.abs(a.positives.astype(int) - b.positives.astype(int)).max() <= 2
        assert np.abs(a.negatives.astype(int) - b.negatives.astype(int)).max() <= 2
        assert not np.array_equal(a.positives[0], a.positives[1])


def test_attention_kernel_is_held_in_the_unet_calls_only(sampler):
    import torch

    seen = []
    unet_forward = sampler.models.unet.forward

    def recording(*args, **kwargs):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return unet_forward(*args, **kwargs)

    math_only = PairedSampler(sampler.models, sampler.settings, sampler.device, sampler.dtype,
                              runners=with_attention_kernel(sampler.runners, sampler.models, "math"))
    sampler.models.unet.forward = recording
    try:
        a = math_only(["a dog on a beach"], ["nothing on a beach"], [3])
    finally:
        del sampler.models.unet.forward
    assert seen and all(flags == (False, True) for flags in seen)  # flash off, math on, in every UNet call
    assert torch.backends.cuda.flash_sdp_enabled()  # and as it was outside them
    b = sampler(["a dog on a beach"], ["nothing on a beach"], [3])
    assert np.abs(a.positives.astype(int) - b.positives.astype(int)).max() <= 2
    assert with_attention_kernel(sampler.runners, sampler.models, "auto") is sampler.runners


def test_an_attention_kernel_the_machine_lacks_is_refused_before_any_work(sampler):
    # This CPU build has no memory-efficient kernel; the probe finds out on the UNet's own head sizes.
    with pytest.raises(UsageError, match="no efficient attention kernel for .*-wide heads in torch.float32 on cpu"):
        with_attention_kernel(sampler.runners, sampler.models, "efficient")
    exported = dataclasses.replace(sampler.runners, backend="onnxruntime")
    with pytest.raises(UsageError, match="--backend onnxruntime does not run torch's attention"):
        with_attention_kernel(exported, sampler.models, "math")


def test_cli_attention_and_layout_reach_the_run(tmp_path):
    out = tmp_path / "r"
    bad = CliRunner().invoke(app, ["generate", "--classes", "voc", "--num-pairs", "1", "--out", str(out),
                                   "--device", "cpu", "--attention", "efficient"])
    assert bad.exit_code == 2 and "--attention efficient" in bad.stderr and not out.exists()
    ok = CliRunner().invoke(app, ["generate", "--classes", "voc", "--num-pairs", "1", "--out", str(out), "--no-sam",
                                  "--device", "cpu", "--attention", "math", "--channels-last"])
    assert ok.exit_code == 0, ok.output
    session = json.loads((out / "run.json").read_text())["sessions"][-1]
    assert (session["attention"], session["channels_last"]) == ("math", True)


def test_unknown_backend_is_refused_before_loading():
    with pytest.raises(UsageError, match="unknown backend 'tpu'"):
        build_sampler(load_preset("tiny"), "cpu", backend="tpu")


def test_cli_backend_flag(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--classes", "voc", "--num-pairs", "1", "--out", str(tmp_path / "r"),
                                      "--backend", "onnx", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown backend 'onnx'" in result.stderr
    assert not (tmp_path / "r").exists()


def test_missing_onnx_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = CliRunner().invoke(app, ["build-engines", "--out", str(tmp_path / "e"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "pip install 'magicseg-engine[onnx]'" in result.stderr and "onnxruntime" in result.stderr
    assert not (tmp_path / "e").exists()
