"""The CPU linear: float32 projections on CPU through oneDNN's matmul, everything else through F.linear, and a
bias-free nn.Linear that uses it (checkpoint keys unchanged).

Imports nothing of medko's.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


# On CPU, float32 linears go through oneDNN's matmul (the kernel torch.compile emits for CPU linears) rather
# than F.linear's MKL sgemm: measured on a 2-core AMD EPYC, 7-20% faster for the decoder's projections, 25-35%
# for the 262k-row head at training sizes and 3x for it at decode sizes. Other devices and dtypes use F.linear.
# MEDKO_ONEDNN=0 turns it off, for logits that sum in transformers' order (its CPU matmul is F.linear's).
# Intel's reproducibility conditions for MKL (torch's CPU BLAS here): a fixed thread count, and MKL_DYNAMIC and
# OMP_DYNAMIC false, so that MKL never picks fewer threads at run time; MKL's default lets it. Set before the
# first BLAS call (this module is imported before any model runs); a value the user set wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
# oneDNN keeps what it built for every input shape it has seen, in two caches of 1,024 entries by default (ideep's,
# LRU_CACHE_CAPACITY, and oneDNN's own, ONEDNN_PRIMITIVE_CACHE_CAPACITY), and an exam or a data set of many lengths
# fills them: on the tiny model at 0.3x the real volumes the test step's peak grew 824 -> 1,153 MiB with the rows and
# is 522 MiB with 16 entries each; no slower measurably on the real 270M (docs/costs.md). Both are read when oneDNN
# first runs, below.
os.environ.setdefault("LRU_CACHE_CAPACITY", "16")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


def _onednn_linear_works() -> bool:
    """Whether this torch build has oneDNN's linear (a private op) and it gives F.linear's answer."""
    try:
        x, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


_ONEDNN_LINEAR = (os.environ.get("MEDKO_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
                  and _onednn_linear_works())


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T by oneDNN; the backward is two plain matmuls (oneDNN's op has no autograd formula)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_w


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, through oneDNN for float32 on CPU (see _ONEDNN_LINEAR) and F.linear elsewhere."""
    if (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.is_contiguous() and x.numel() > 0):
        return _OneDNNLinear.apply(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """A bias-free nn.Linear (same `weight` key) whose matmul is `linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
