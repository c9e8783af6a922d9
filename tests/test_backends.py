import numpy as np
import pytest
from typer.testing import CliRunner

from magicseg_engine.cli import app
from magicseg_engine.config import load_preset
from magicseg_engine.engine.backends import make_runners, torch_runners
from magicseg_engine.errors import UsageError
from magicseg_engine.generate.sampler import PairedSampler
from magicseg_engine.pipeline import build_sampler


@pytest.fixture(scope="module")
def sampler():
    return build_sampler(load_preset("tiny"), "cpu")


def test_torch_runners_are_the_modules_themselves(sampler):
    r = torch_runners(sampler.models)
    ids = sampler.models.tokenizer(["a dog"])
    assert bool((r.encode_text(ids) == sampler.models.text_encoder(ids)[0]).all())


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
