"""Building blocks shared by the model families, and the helpers that adopt transformers'
weights into them.

Weights are adopted, not copied, wherever the dtype already matches: a plain projection keeps
the transformers tensor itself, and a fused one (q/k/v, gate/up) is one new tensor whose slices
then replace the transformers module's weights, so the two models share storage and the source
model keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine.paged import native
from promptcache.engine.paged.models.base import Attention

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_new": partial(F.gelu, approximate="tanh"),
}


KERNEL_ACTS = {
    id(ACTIVATIONS["gelu_pytorch_tanh"]): 0,
    id(ACTIVATIONS["gelu_new"]): 0,
    id(ACTIVATIONS["silu"]): 1,
}
"""The activations ``native`` computes, by identity, with their codes (kernels/elementwise.h's
Act)."""


def kernel_act(act: Activation) -> int | None:
    """``act``'s code for the ``native`` kernels, or None when they do not compute it."""
    return KERNEL_ACTS.get(id(act))


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


def adopt(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``: the same storage when it already is, else a converted copy."""
    return tensor.detach().to(dtype)


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class Linear(nn.Module):
    """``y = x W^T + b`` over adopted weights (no initialisation, no autograd)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.bias = None if bias is None else frozen(bias)

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def adopt(cls, linear: Any, dtype: torch.dtype) -> Linear:
        bias = getattr(linear, "bias", None)
        return cls(adopt(linear.weight, dtype), None if bias is None else adopt(bias, dtype))

    @classmethod
    def fuse(cls, linears: Sequence[Any], dtype: torch.dtype) -> Linear:
        """One projection whose output is the ``linears``' outputs side by side."""
        weights = [lin.weight.detach() for lin in linears]
        weight = torch.cat([w.to(dtype) for w in weights])
        biases = [getattr(lin, "bias", None) for lin in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    torch.zeros(w.shape[0], dtype=dtype, device=w.device)
                    if b is None
                    else b.detach().to(dtype)
                    for w, b in zip(weights, biases, strict=True)
                ]
            )
        if all(w.dtype == dtype for w in weights):
            # Point the source modules at slices of the fused tensor: one copy of the weights
            # in memory, and the transformers model still computes the same thing.
            _share_rows(linears, "weight", weight)
            if bias is not None and all(b is not None for b in biases):
                _share_rows(linears, "bias", bias)
        return cls(weight, bias)


def replace_layer_linears(
    model: nn.Module, make: Callable[[Linear], nn.Module], fits: Callable[[Linear], bool]
) -> int:
    """Replace every ``Linear`` of ``model``'s layers that ``fits`` (not the lm_head, whose
    weight is the embedding table's) with ``make`` of it, in place, including the dense half
    of int8 decode layers; returns how many. The replaced weights are freed once nothing
    else holds them."""
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, Linear) and not name.startswith("lm_head") and fits(m)
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, make(module))
    return len(targets)


def _share_rows(linears: Sequence[Any], name: str, fused: torch.Tensor) -> None:
    start = 0
    for lin in linears:
        param = getattr(lin, name)
        rows = param.shape[0]
        param.data = fused[start : start + rows]
        start += rows


class RMSNorm(nn.Module):
    """Llama-style RMSNorm: normalise in float32, cast back, then scale by ``w`` (in dtype).

    ``F.rms_norm`` without a weight computes in float32 and rounds once, which is exactly
    transformers' ``x.float()`` ... ``.to(dtype)`` in one kernel."""

    offset = False

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.eps = eps

    @property
    def kernel_args(self) -> tuple[torch.Tensor, float]:
        """The weight and epsilon as ``native`` takes them."""
        return self.weight, self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = _kernels()
        if fast is not None:
            out = fast.rms_norm(x, self.weight, self.eps, offset=False)
            if out is not None:
                return out
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    @classmethod
    def adopt(cls, norm: Any, dtype: torch.dtype) -> RMSNorm:
        return cls(adopt(norm.weight, dtype), _eps(norm))


class OffsetRMSNorm(nn.Module):
    """Gemma-style RMSNorm: scale by ``1 + w`` in float32, then cast back.

    ``1 + w`` is precomputed once in float32 (what transformers computes on every call)."""

    offset = True

    def __init__(self, scale: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.scale = frozen(scale)
        self.eps = eps

    @property
    def kernel_args(self) -> tuple[torch.Tensor, float]:
        """The weight and epsilon as ``native`` takes them."""
        return self.scale, self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = _kernels()
        if fast is not None:
            out = fast.rms_norm(x, self.scale, self.eps, offset=True)
            if out is not None:
                return out
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, self.eps).to(x.dtype)

    @classmethod
    def adopt(cls, norm: Any) -> OffsetRMSNorm:
        return cls(1.0 + norm.weight.detach().float(), _eps(norm))


Norm = RMSNorm | OffsetRMSNorm


def _kernels() -> native.Kernels | None:
    """The engine's CPU kernels, except in code Dynamo traces (the compiled decode step fuses
    the PyTorch operations itself)."""
    if torch.compiler.is_dynamo_compiling():
        return None
    return native.kernels()


def chained(
    layers: Iterable[Any], final_norm: Norm
) -> tuple[Norm, Iterator[tuple[Any, Norm, bool]]]:
    """The first layer's input norm, and each layer with the norm whose output it hands on (the
    next layer's input norm, the final norm for the last) and whether it is the last: a layer
    ends with ``residual_norm`` into the next one's input."""
    stack = list(layers)

    def links() -> Iterator[tuple[Any, Norm, bool]]:
        for i, layer in enumerate(stack):
            last = i == len(stack) - 1
            yield layer, final_norm if last else stack[i + 1].input_norm, last

    first: Norm = stack[0].input_norm
    return first, links()


def residual_norm(
    x: torch.Tensor, a: torch.Tensor, pre: Norm | None, post: Norm
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream between two parts of a layer: ``x + pre(a)`` (``x + a`` without
    ``pre``), and ``post`` of it (the next part's input), in one pass where ``native`` runs."""
    fast = _kernels()
    if fast is not None and (pre is None or pre.offset == post.offset):
        done = fast.residual_norm(
            x, a, None if pre is None else pre.kernel_args, post.kernel_args, post.offset
        )
        if done is not None:
            return done
    x = x + (a if pre is None else pre(a))
    return x, post(x)


class HeadNorm(nn.Module):
    """q_norm and k_norm applied at once to the ``[T, num_heads + num_kv_heads, head_dim]``
    q/k slab: one normalisation and one multiply by a per-head table of the two weights."""

    def __init__(self, table: torch.Tensor, eps: float, offset: bool) -> None:
        super().__init__()
        self.table = frozen(table)
        self.eps = eps
        self.offset = offset

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        if self.offset:  # Gemma: (x * (1 + w)) in float32, then cast
            normed = F.rms_norm(qk.float(), (qk.shape[-1],), eps=self.eps)
            return (normed * self.table).to(qk.dtype)
        # Llama/Qwen3: normalise (in float32, rounded once), then w * x in dtype.
        return self.table * F.rms_norm(qk, (qk.shape[-1],), eps=self.eps)

    @classmethod
    def adopt(
        cls,
        q_norm: Any,
        k_norm: Any,
        num_heads: int,
        num_kv_heads: int,
        dtype: torch.dtype,
        *,
        offset: bool,
    ) -> HeadNorm:
        if offset:
            q, k = (1.0 + n.weight.detach().float() for n in (q_norm, k_norm))
        else:
            q, k = (n.weight.detach().to(dtype) for n in (q_norm, k_norm))
        table = torch.cat([q.expand(num_heads, -1), k.expand(num_kv_heads, -1)])
        return cls(table.contiguous(), _eps(q_norm), offset)


def _eps(norm: Any) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = norm.eps
    return float(eps)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, gate_up: Linear, down: Linear, act: Activation) -> None:
        super().__init__()
        self.gate_up = gate_up
        self.down = down
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        fast = _kernels()
        code = kernel_act(self.act)
        mid = None if fast is None or code is None else fast.gated_act(gate_up, code)
        if mid is None:
            gate, up = gate_up.chunk(2, dim=-1)
            mid = self.act(gate) * up
        out: torch.Tensor = self.down(mid)
        return out

    @classmethod
    def adopt(cls, mlp: Any, act: Activation, dtype: torch.dtype) -> GatedMLP:
        return cls(
            Linear.fuse([mlp.gate_proj, mlp.up_proj], dtype),
            Linear.adopt(mlp.down_proj, dtype),
            act,
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` in transformers' rotate-half layout, given ``cos`` and
    ``sin`` ``[T, 1, head_dim]`` from ``Rotary`` (``sin``'s first half negated).

    ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) * sin == roll(x) * sin``: four
    kernels instead of eight, each product rounded as transformers rounds it."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class SelfAttention(nn.Module):
    """Fused q/k/v projection, optional q/k norms, rope, the engine's attention, o_proj."""

    def __init__(
        self,
        layer: int,
        qkv: Linear,
        o: Linear,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        head_norm: HeadNorm | None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.qkv = qkv
        self.o = o
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.head_norm = head_norm

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn: Attention,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``keep``: project only these rows' attention outputs (the model's last layer; the
        keys and values of every row are still written)."""
        tokens = x.shape[0]
        heads, qk_heads = self.num_heads, self.num_heads + self.num_kv_heads
        qkv = self.qkv(x).view(tokens, qk_heads + self.num_kv_heads, self.head_dim)
        # q and k travel together through the norm and the rotation: half the kernel launches.
        qk, v = qkv[:, :qk_heads], qkv[:, qk_heads:]
        fast = _kernels()
        norm = self.head_norm
        done = None
        if fast is not None:
            args = None if norm is None else (norm.table, norm.eps)
            done = fast.qk_norm_rope(qk, args, norm is not None and norm.offset, rope)
        if done is not None:
            qk = done
        else:
            if norm is not None:
                qk = norm(qk)
            if rope is not None:
                qk = apply_rope(qk, *rope)
        out = attn(self.layer, qk[:, :heads], qk[:, heads:], v)
        if keep is not None:
            out = out[keep]
        result: torch.Tensor = self.o(out.reshape(out.shape[0], heads * self.head_dim))
        return result
