"""protloc: self-supervised Vision Transformers for protein localization in microscopy images."""

from protloc.errors import ProtlocError

__version__ = "0.1.0"
__all__ = ["ProtlocError", "__version__"]
