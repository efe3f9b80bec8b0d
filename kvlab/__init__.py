"""kvlab: capture, quantize and replace the KV cache of HF transformers models, and measure what it costs.

    lm = kvlab.load("smollm2-135m")
    with kvlab.quantize(lm, "kivi-2", protocol="fake") as run:
        lm.model(ids)
    run.summary()

Names are imported lazily so that `import kvlab.store` (sweep workers, the CLI) does not pay for
torch and transformers.
"""
from __future__ import annotations

import importlib

from .errors import KVLabError

__version__ = "0.1.0"

_LAZY = {
    "LoadedModel": "models", "load": "models", "tiny": "models",
    "quantize": "hooks", "capture": "hooks",
    "EvalSpec": "evaluation", "evaluate": "evaluation", "compare": "tasks", "run_task": "tasks",
    "Store": "store", "calibrate": "calibration",
}
_SUBMODULES = {"quant", "data", "models", "hooks", "evaluation", "calibration", "core", "protocols", "metrics",
               "store", "sweep", "plots", "notebook", "tasks", "choice", "summarize", "retrieval", "pack"}
__all__ = ["KVLabError", "__version__", *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
