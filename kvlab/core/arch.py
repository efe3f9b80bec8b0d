"""Architecture discovery: where each layer's attention is, where its pre-RoPE keys come out, its shapes.

Everything kvlab needs to know about a model's layout, read once when a session is installed:

* the attention module of every layer (it carries `layer_idx` and dispatches through transformers'
  AttentionInterface, which kvlab wraps);
* where the keys leave the projection *before* the rotary embedding and in which layout:
  `flat` (`k_proj` output [b, t, kvh*d]), `heads` (qwen3's `k_norm` on [b, t, kvh, d]), `bhtd`
  (gemma3's `k_norm` on [b, kvh, t, d]) or `fused` (the key slice of phi3's `qkv_proj`);
* key/value heads, query heads per KV head (GQA), head_dim.

Version-specific transformers knowledge lives here, in `kvlab.core.cache` and `kvlab.core.attention`.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch

from ..errors import KVLabError


@dataclass
class AttnSite:
    """One layer's attention module and the module whose output holds its pre-RoPE keys."""

    module: torch.nn.Module          # the attention module (has layer_idx)
    key_module: torch.nn.Module      # where pre-RoPE keys come out
    key_layout: str                  # "flat" [b,t,kvh*d] | "heads" [b,t,kvh,d] | "bhtd" | "fused" (qkv slice)
    key_offset: int = 0              # fused: first key column


@dataclass
class Architecture:
    """The attention sites of a model (one per layer, in layer order) and its head geometry."""

    sites: list[AttnSite]
    kv_heads: int
    head_dim: int
    n_groups: int                    # query heads per KV head (GQA)

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Architecture":
        cfg = text_config(model)
        return cls(find_attention(model), cfg.num_key_value_heads, head_dim(cfg),
                   cfg.num_attention_heads // cfg.num_key_value_heads)


def text_config(model_or_config):
    """The decoder's config of a model or of a config (multimodal models nest it)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def head_dim(cfg) -> int:
    """Per-head dimension: `head_dim` when the config has one, else hidden_size / heads."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def find_attention(model: torch.nn.Module) -> list[AttnSite]:
    """Locate every self-attention module and its pre-RoPE key output; fail naming what is missing."""
    cfg = text_config(model)
    sites: dict[int, AttnSite] = {}
    for _, mod in model.named_modules():
        if not (type(mod).__name__.endswith("Attention") and hasattr(mod, "layer_idx")):
            continue
        if hasattr(mod, "k_norm") and isinstance(getattr(mod, "k_norm"), torch.nn.Module):
            # qwen3 normalises [b, t, kvh, d] before the transpose; gemma3 normalises [b, kvh, t, d] after it
            src = inspect.getsource(type(mod).forward)
            site = AttnSite(mod, mod.k_norm, "heads" if "k_norm(self.k_proj" in src else "bhtd")
        elif hasattr(mod, "k_proj"):
            site = AttnSite(mod, mod.k_proj, "flat")
        elif hasattr(mod, "qkv_proj"):
            site = AttnSite(mod, mod.qkv_proj, "fused", cfg.num_attention_heads * head_dim(cfg))
        else:
            raise KVLabError(f"unsupported architecture {type(model).__name__}: attention module "
                             f"{type(mod).__name__} has no k_proj, k_norm or qkv_proj to read pre-RoPE keys from")
        sites[int(mod.layer_idx)] = site
    n_layers = getattr(cfg, "num_hidden_layers", None)
    if not sites or (n_layers is not None and len(sites) != n_layers):
        raise KVLabError(f"unsupported architecture {type(model).__name__}: found {len(sites)} attention modules with "
                         f"a layer_idx for {n_layers} layers. kvlab supports decoder models whose attention uses "
                         "transformers' AttentionInterface (llama, mistral, qwen2, qwen3, gemma2/3, phi3, ...)")
    if not hasattr(model, "_can_set_attn_implementation") or not model._can_set_attn_implementation():
        raise KVLabError(f"unsupported architecture {type(model).__name__}: it does not dispatch attention through "
                         "transformers' AttentionInterface, so kvlab cannot wrap its attention function")
    return [sites[i] for i in sorted(sites)]


def to_heads(out: torch.Tensor, site: AttnSite, kvh: int, d: int) -> torch.Tensor:
    """The key projection's output as [b, kv_heads, t, head_dim]."""
    if site.key_layout == "bhtd":
        return out
    if site.key_layout == "heads":
        return out.transpose(1, 2)
    if site.key_layout == "fused":
        out = out[..., site.key_offset: site.key_offset + kvh * d]
    return out.view(*out.shape[:2], kvh, d).transpose(1, 2)


def from_heads(k: torch.Tensor, out: torch.Tensor, site: AttnSite) -> torch.Tensor:
    """Put keys [b, kv_heads, t, head_dim] back into the projection's output layout (`out`)."""
    if site.key_layout == "bhtd":
        return k
    if site.key_layout == "heads":
        return k.transpose(1, 2)
    flat = k.transpose(1, 2).reshape(*out.shape[:2], -1)
    if site.key_layout == "fused":
        return torch.cat([out[..., :site.key_offset], flat, out[..., site.key_offset + flat.shape[-1]:]], dim=-1)
    return flat


def apply_rope(attn_module: torch.nn.Module, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotary embedding of `attn_module`'s own modeling file to pre-RoPE keys [b, kvh, t, d]."""
    rope = sys.modules[type(attn_module).__module__].apply_rotary_pos_emb
    return rope(k, k, cos, sin)[1]
