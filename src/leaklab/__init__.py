"""leaklab: measure how much private text leaks from shared gradients, adapter updates and embeddings."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("leaklab")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
