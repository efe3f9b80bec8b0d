"""kvlab: capture, quantize and replace the KV cache of HF transformers models, and measure what it costs.

    lm = kvlab.load("smollm2-135m")
    with kvlab.quantize(lm, "kivi-2", protocol="fake") as run:
        lm.model(ids)
    run.summary()
"""
from . import quant
from .errors import KVLabError
from .evaluate import EvalSpec, compare, evaluate
from .hooks import capture, quantize
from .models import LoadedModel, load, tiny

__version__ = "0.1.0"
__all__ = ["KVLabError", "LoadedModel", "EvalSpec", "capture", "compare", "evaluate", "load", "quant",
           "quantize", "tiny", "__version__"]
