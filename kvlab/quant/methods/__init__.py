"""One file per method; importing this package registers them all (see `kvlab.quant.registry`)."""
from . import hf_cache, identity, kivi, kvpress_press, kvquant, pmkvq, qaq, qhitter, quarot, select, uniform  # noqa: F401
