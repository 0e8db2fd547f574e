"""The Python API: the user's objects in, a Result out. The CLI commands are thin layers over these."""

from .result import Result
from .sparsify import sparsify
from .vision import compress, prune, quantize

__all__ = ["Result", "prune", "compress", "quantize", "sparsify"]
