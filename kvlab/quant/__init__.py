"""Quantizers and methods: `parse(spec)` builds a method; `available()` lists names and presets."""
from .base import AttentionStats, LayerContext, Method, Quantized
from .registry import available, parse, preset, register

__all__ = ["AttentionStats", "LayerContext", "Method", "Quantized", "available", "parse", "preset", "register"]
