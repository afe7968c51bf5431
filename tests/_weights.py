"""Comparing trained weights of two runs that should agree.

Every weight is compared at one tolerance except the attention key bias: its gradient is zero in
exact arithmetic (softmax ignores a constant added to every score of a query), so what it gets is
round-off noise, which Adam divides by its own tiny running norm and turns into steps of up to
~lr. Two paths that round differently (fused against foreach AdamW, DeepSpeed's optimizer, another
reduction order) then move it by lr-sized amounts while every other weight agrees to ~1e-6.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

KEY_BIAS = "attention.self.key.bias"


def assert_weights_close(got: Mapping, want: Mapping, atol: float, key_bias_atol: float | None,
                         rtol: float = 0.0) -> int:
    """Every name of `got` within `atol` of `want` (tensors or arrays); the key bias within
    `key_bias_atol`, or not compared when it is None. Returns how many weights were compared."""
    assert set(got) == set(want), set(got) ^ set(want)
    compared = 0
    for name in got:
        tol = key_bias_atol if name.endswith(KEY_BIAS) else atol
        if tol is None:
            continue
        a, b = (np.asarray(x.detach().float()) if isinstance(x, torch.Tensor) else np.asarray(x)
                for x in (got[name], want[name]))
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert np.allclose(a, b, atol=tol, rtol=rtol), (name, float(np.abs(a - b).max()))
        compared += 1
    return compared
