"""kvlab: capture, quantize and replace the KV cache of HF transformers models, and measure what it costs."""
from .errors import KVLabError
from .models import LoadedModel, load, tiny

__version__ = "0.1.0"
__all__ = ["KVLabError", "LoadedModel", "load", "tiny", "__version__"]
