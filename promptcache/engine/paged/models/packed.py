"""Projections whose bfloat16 weights are stored in oneDNN's blocked layout (``PackedLinear``).

On a CPU, ``F.linear`` with a bf16 weight runs oneDNN's matmul, which first reorders the plain
``[out, in]`` weight into the blocked layout its kernel reads, on every call: for a step of a
few rows that copy costs as much as the product. Reordering once at load time
(``torch.ops.mkldnn._reorder_linear_weight``, what Inductor's freezing does) and calling the
kernel on the packed weight (``_linear_pointwise``) gives the same products, bit for bit, at
about half the time for 8 rows and a quarter less for a 64-token chunk (docs/benchmarks.md).

Inside a compiled graph the product is the custom operator ``promptcache::packed_linear``:
Inductor's own lowering of ``_linear_pointwise`` accepts only the weights it froze itself.
"""

from __future__ import annotations

import torch
from torch import nn

from promptcache.engine.paged.models.base import CausalLM
from promptcache.engine.paged.models.layers import Linear, replace_layer_linears

ROWS_HINT = 8
"""The row count oneDNN is told to expect when it packs (any count works with any packing;
this one measured as fast as a per-count packing for 1 to 64 rows)."""

_LIBRARY = torch.library.Library("promptcache", "FRAGMENT")  # type: ignore[no-untyped-call]
_LIBRARY.define(  # type: ignore[no-untyped-call]
    "packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor"
)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [N, in] @ W^T + bias`` for ``packed``, W as ``_reorder_linear_weight`` packed it."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


# The packed weight is a oneDNN tensor: the dispatcher picks the op's kernel by its key.
for _key in ("CPU", "MkldnnCPU"):
    _LIBRARY.impl("packed_linear", packed_linear, _key)  # type: ignore[no-untyped-call]


def _shape_only(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What tracing sees of the op: ``[N, out]`` in ``x``'s dtype."""
    return x.new_empty((x.shape[0], packed.shape[0]))


torch.library.register_fake("promptcache::packed_linear", _shape_only, lib=_LIBRARY)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether bf16 weights can be packed here: a CPU whose oneDNN computes in bf16."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` packed; computes exactly what ``Linear`` computed."""

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        # A plain attribute, not a parameter: a oneDNN tensor has no storage to count, save or
        # move, and nothing else may read it as a weight.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        if torch.compiler.is_dynamo_compiling():
            out: torch.Tensor = torch.ops.promptcache.packed_linear(flat, self.packed, self.bias)
        else:
            out = packed_linear(flat, self.packed, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: CausalLM) -> int:
    """Replace the projections of ``model``'s layers (not the lm_head, whose weight is the
    embedding table's) with ``PackedLinear``, in place, including the dense half of int8
    decode layers; returns how many. The plain weights are freed once nothing else holds
    them."""
    return replace_layer_linears(model, PackedLinear, lambda _: True)


__all__ = ["ROWS_HINT", "PackedLinear", "pack_linears", "packed_linear", "packing_available"]
