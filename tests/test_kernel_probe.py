import pytest
import torch

from magicseg_engine.kernels.probe import scale_add, scale_add_reference


@pytest.mark.parametrize("n", [1, 127, 128, 129, 1000])
def test_probe_kernel_matches_reference(n, triton_device):
    # Interpreted on the CPU where no GPU is visible; compiled on the GPU where one is.
    x, y = torch.randn(n, device=triton_device), torch.randn(n, device=triton_device)
    torch.testing.assert_close(scale_add(x, y, -1.5), scale_add_reference(x, y, -1.5))


@pytest.mark.gpu
def test_probe_kernel_compiled_on_gpu():
    x, y = torch.randn(4099, device="cuda"), torch.randn(4099, device="cuda")
    torch.testing.assert_close(scale_add(x, y, 2.0), scale_add_reference(x, y, 2.0))
