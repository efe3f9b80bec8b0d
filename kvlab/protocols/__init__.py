"""Evaluation protocols as cache policies: one class per file (`fake.py`, `prefill_decode.py`, `decode.py`).

`PROTOCOLS` names every protocol a session accepts; `protocol_class(name)` finds its class. A new
protocol is one file with a `Protocol` subclass (see `base.py` for the interface) and one entry here.
"""
from __future__ import annotations

from ..errors import KVLabError
from .base import Protocol
from .decode import Decode
from .fake import Fake
from .prefill_decode import PrefillDecode

_CLASSES: dict[str, type[Protocol]] = {cls.name: cls for cls in (Fake, PrefillDecode, Decode)}
PROTOCOLS: tuple[str, ...] = tuple(_CLASSES)


def check_protocol(method, protocol: str) -> None:
    """Raise a KVLabError before any model work when `method` cannot run under `protocol`.

    Methods that bring their own cache (HF QuantizedCache) store what the prefill produced, so their
    prefill always attends to full-precision K/V: in the teacher-forced `fake` protocol that would be
    the bare model, so they run in the protocols that score against a stored cache."""
    protocol_class(protocol)
    if getattr(method, "replaces_cache", False) and protocol == "fake":
        raise KVLabError(f"'{method.spec}' replaces the whole cache (HF QuantizedCache): its prefill attends to "
                         "full-precision K/V, so run it with protocol='prefill-decode'")


def supports(method, protocol: str) -> bool:
    """Whether `method` can run under `protocol` (`check_protocol` without the error)."""
    try:
        check_protocol(method, protocol)
    except KVLabError:
        return False
    return True


def protocol_class(name: str) -> type[Protocol]:
    """The policy class of protocol `name`; a KVLabError lists the known ones."""
    if name not in _CLASSES:
        raise KVLabError(f"unknown protocol '{name}'; use one of {PROTOCOLS}")
    return _CLASSES[name]


__all__ = ["PROTOCOLS", "Protocol", "Fake", "PrefillDecode", "Decode", "check_protocol", "protocol_class", "supports"]
