"""magicseg-engine: class names in, a segmentation pretraining dataset and model out."""

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("magicseg-engine")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def _keep_checkout_root_off_sys_path() -> None:
    """In a checkout, the source folder kernels/ (installed as magicseg_engine.kernels) would
    stand in for the `kernels` package that transformers imports whenever the checkout's root is
    on sys.path: `python -m ...` run there, or Ray workers started there. Take the root off the
    path (the package itself is found through the install, never through the root)."""
    root = Path(__file__).resolve().parents[2]
    if not ((root / "kernels" / "__init__.py").is_file() and (root / "python" / "magicseg_engine").is_dir()):
        return  # an installed wheel: no source folders beside the package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    wrong = sys.modules.get("kernels")
    if wrong is not None and Path(getattr(wrong, "__file__", "") or "").resolve().parent == root / "kernels":
        del sys.modules["kernels"]


_keep_checkout_root_off_sys_path()
