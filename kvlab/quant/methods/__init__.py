"""One file per method; importing this package registers them all (see `kvlab.quant.registry`)."""
from . import identity, kivi, kvquant, uniform  # noqa: F401
