"""kvlab.quant.allocation: PM-KVQ's budgeted bit allocation against brute force (QAQ's closed forms: test_qaq.py)."""
from __future__ import annotations

import itertools

import pytest
import torch

from kvlab.errors import KVLabError
from kvlab.quant.allocation import allocate_bits


def test_allocation_respects_budget_and_favours_sensitive_layers():
    s = torch.tensor([[1.0, 0.5, 0.1], [1.0, 0.5, 0.1], [100.0, 50.0, 1.0], [1.0, 0.5, 0.1]])
    bits = allocate_bits(s, (2, 4, 8), budget=4.0)
    # budget 4 avg over 4 layers = 16 bit-slots; the sensitive layer gets 8, the rest share 8: 2 + 2 + 4
    assert bits[2] == 8 and sum(bits) <= 16 and sorted(bits[:2] + bits[3:]) == [2, 2, 4]
    # exact: matches brute force on random sensitivities and uneven layer sizes
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(5, 3, generator=g).sort(dim=1, descending=True).values
        sizes = [int(z) for z in torch.randint(1, 4, (5,), generator=g)]
        budget = float(torch.empty(1).uniform_(2.0, 8.0, generator=g))
        got = allocate_bits(s, (2, 4, 8), budget, sizes)
        best = min((sum(s[l, (2, 4, 8).index(c)] for l, c in enumerate(combo)), combo)
                   for combo in itertools.product((2, 4, 8), repeat=5)
                   if sum(c * z for c, z in zip(combo, sizes)) <= budget * sum(sizes) + 1e-9)
        cost = sum(s[l, (2, 4, 8).index(c)] for l, c in enumerate(got))
        assert sum(c * z for c, z in zip(got, sizes)) <= budget * sum(sizes) + 1e-9
        assert float(cost) == pytest.approx(float(best[0]))
    with pytest.raises(KVLabError, match="budget"):
        allocate_bits(torch.ones(3, 3), (2, 4, 8), budget=1.5)
