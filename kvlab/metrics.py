"""Metrics: plain functions of tensors (logits [b, t, vocab], token ids [b, t]).

Every function returns 0-d tensors (or per-layer tensors) so callers can batch the host transfer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token: logits[:, i] predicts targets[:, i]. [b, t]"""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def perplexity(nll_sum: torch.Tensor | float, n_tokens: int) -> float:
    """exp(mean NLL) from a summed NLL over n_tokens scored tokens."""
    return float(torch.exp(torch.as_tensor(nll_sum, dtype=torch.float64) / n_tokens))


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position in nats, summed over the vocabulary: never negative. [b, t] float32

    KL is >= 0 by definition (Gibbs' inequality), but summing p_ref * (log p_ref - log p) over a
    50k-token vocabulary in fp32 rounds to about -1e-8 when the two distributions are nearly equal,
    and whether it does depends on the CPU's reduction order. So the log-probabilities are taken in
    fp32 (the model's precision), each token's sum is accumulated in float64, and the per-token value
    is clamped at 0 — the clamp only ever removes rounding noise of order 1e-7 and below.
    """
    ref = ref_logits.float().log_softmax(-1)
    terms = ref.exp() * (ref - logits.float().log_softmax(-1))
    return terms.sum(-1, dtype=torch.float64).clamp_min(0.0).float()


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """1 where the argmax token equals the reference argmax. [b, t]"""
    return (logits.argmax(-1) == ref_logits.argmax(-1)).float()


def relative_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x_hat - x|| / ||x|| over the whole tensor (a ratio of norms: never negative)."""
    return (x_hat.float() - x.float()).norm() / x.float().norm().clamp_min(1e-12)


def attention_output_error(out_hat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Relative error of attention outputs (or any hidden states)."""
    return relative_error(out_hat, out)


def accuracy_ci(correct: torch.Tensor, z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy with a Wilson score interval (z = 1.96 for 95%)."""
    n = correct.numel()
    p = float(correct.float().mean()) if n else float("nan")
    if n == 0:
        return p, float("nan"), float("nan")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return p, centre - half, centre + half
