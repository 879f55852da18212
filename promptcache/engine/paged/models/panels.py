"""Projections whose float32 weights are laid out for the engine's own product (``PanelLinear``).

Float32 is the default dtype on CPUs without bfloat16 arithmetic (AVX2), where every prompt
token's products went to MKL's sgemm: ~35-60 GMAC/s on two Zen 3 cores, ~20-25 at the 64 rows
of a cache hit's suffix. ``kernels/gemm_f32.h`` computes them at ~55-65 at any row count
(docs/benchmarks.md) over a copy of the weight laid out in panels of 16 outputs, which replaces
the plain weight (no memory more). Each output is one chain of FMAs over its inputs in order,
so a row's result never depends on the rows beside it: the same whether a prompt chunk runs
alone, beside decode rows, or through the whole-step kernels.

Inside a compiled graph the product is the custom operator ``promptcache::panel_linear``;
where the kernels are off (``native.disabled``) it is PyTorch's ``F.linear`` over the panels
seen as the plain weight (a copy per call: tests only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine.paged import native
from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.layers import Linear, frozen, replace_layer_linears

_LIBRARY = torch.library.Library("promptcache", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIBRARY.define(  # type: ignore[no-untyped-call]
    "panel_linear(Tensor x, Tensor panels, Tensor? bias) -> Tensor"
)


def plain(panels: torch.Tensor) -> torch.Tensor:
    """The ``[N, K]`` weight ``panels`` (``[N / P, K, P]``) holds, as a strided view."""
    blocks, k, p = panels.shape
    return panels.permute(0, 2, 1).reshape(blocks * p, k)


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ W^T + bias`` for ``panels`` (``Kernels.panel_f32`` of W)."""
    fast = native.kernels()
    if fast is None:
        return F.linear(x, plain(panels), bias)
    return fast.gemm_f32(x, panels, bias)


_LIBRARY.impl("panel_linear", panel_linear, "CPU")  # type: ignore[no-untyped-call]


def _shape_only(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What tracing sees of the op: ``[M, N]`` in float32."""
    return x.new_empty((x.shape[0], panels.shape[0] * panels.shape[2]))


torch.library.register_fake("promptcache::panel_linear", _shape_only, lib=_LIBRARY)


def panels_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether float32 projections run on the engine's product here: a CPU where its kernels
    are built and used."""
    return device.type == "cpu" and dtype == torch.float32 and native.kernels() is not None


class PanelLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` in panels; computes what ``Linear`` computes, the sums in
    another order (the same bits for a row in any step)."""

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        fast = native.kernels()
        assert fast is not None
        weight = linear.weight.detach()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.panels = frozen(fast.panel_f32(weight))
        self.bias = None if linear.bias is None else frozen(linear.bias.detach().contiguous())

    @classmethod
    def fits(cls, linear: Linear) -> bool:
        """Whether ``linear`` is one the product takes: float32 on a CPU, its outputs a
        multiple of the panel."""
        fast = native.kernels()
        weight = linear.weight
        return (
            fast is not None
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.shape[0] % fast.panel == 0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        if torch.compiler.is_dynamo_compiling():
            out: torch.Tensor = torch.ops.promptcache.panel_linear(flat, self.panels, self.bias)
        else:
            out = panel_linear(flat, self.panels, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def panel_linears(model: CausalLM) -> int:
    """Replace the projections of ``model``'s layers (not the lm_head) that ``PanelLinear``
    takes with it, in place, including the dense half of int8 decode layers; returns how
    many. The plain weights are freed once nothing else holds them."""
    return replace_layer_linears(model, PanelLinear, PanelLinear.fits)


__all__ = ["PanelLinear", "panel_linear", "panel_linears", "panels_available", "plain"]
