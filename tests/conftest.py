import os
from pathlib import Path

# First: `python -m pytest` puts the checkout's root on sys.path, and importing the package
# takes it off again before any test imports transformers (see magicseg_engine/__init__.py).
import magicseg_engine  # noqa: F401
import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. The variable is read
# when a kernel is decorated, so it must be set before any kernel module is imported.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where tests that force the Triton kernels put their tensors: on a machine with a GPU the
# kernels are compiled and refuse CPU tensors, so there they run on it; elsewhere on the CPU,
# interpreted.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread. The tiny models' matrices are a few KB: on
    shared cores, intra-op threads spend far longer waiting for each other than computing
    (measured 10x to over 50x slower with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def triton_device() -> str:
    """"cuda" where a GPU is visible (compiled kernels), else "cpu" (TRITON_INTERPRET=1)."""
    return TRITON_DEVICE


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none is visible to torch here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """The tiny preset pretrained for its 400 steps on 256 coloured-shape samples (about a
    minute on 2 CPU cores): the pretraining output folder, shared by the learnability and the
    evaluation tests."""
    from magicseg_engine.train.loop import load_pretrain_preset, pretrain
    from magicseg_engine.train.synthetic import write_synthetic_run

    base = tmp_path_factory.mktemp("shapes-model")
    write_synthetic_run(base / "train", 256, size=64, seed=1)
    pretrain(load_pretrain_preset("tiny"), base / "train", base / "out")
    return base / "out"


# --- models and runs built once for the whole test run ----------------------------------------
# Building the tiny models takes little time once their libraries are imported, but many modules
# built the very same objects for themselves. These are shared by every test that only uses them:
# a test that changes one (assigns an attribute, installs processors or hooks without taking them
# off again, monkeypatches it) must build its own instead, or every later test would see the change.


@pytest.fixture(scope="session")
def tiny_sampler():
    """`build_sampler(load_preset("tiny"), "cpu")`, shared read-only: sample with it, wrap its
    models in another PairedSampler, or hook them inside try/finally; never change it in place."""
    from magicseg_engine.config import load_preset
    from magicseg_engine.pipeline import build_sampler

    return build_sampler(load_preset("tiny"), "cpu")


@pytest.fixture(scope="session")
def tiny_sam():
    """`build_sam("tiny", seed=0)` (eval mode, frozen), shared read-only."""
    from magicseg_engine.masks.sam import build_sam

    return build_sam("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`tiny_run(*flags)`: the folder of a finished `generate --device cpu *flags` run (the tiny
    preset unless the flags say otherwise), made in-process on the first call with those flags
    and handed to every later caller. Read it only; a test that changes a run copies it first
    (shutil.copytree) and changes the copy."""
    from typer.testing import CliRunner

    from magicseg_engine.cli import app

    runs: dict[tuple[str, ...], Path] = {}

    def make(*flags) -> Path:
        key = tuple(str(f) for f in flags)
        if key not in runs:
            out = tmp_path_factory.mktemp("tiny-run") / "run"
            result = CliRunner().invoke(app, ["generate", "--device", "cpu", *key, "--out", str(out)])
            assert result.exit_code == 0, result.output
            runs[key] = out
        return runs[key]

    return make
