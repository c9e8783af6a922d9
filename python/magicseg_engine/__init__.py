"""magicseg-engine: class names in, a segmentation pretraining dataset and model out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("magicseg-engine")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
