import os

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
