"""Projections packed in oneDNN's layout (``models.packed``): the same products, bit for bit, as
the plain bf16 weights, eagerly and inside a compiled graph, and an engine of packed layers
keeps hits exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine.paged.compiled import compiler_available
from promptcache.engine.paged.models import Gemma3, from_hf
from promptcache.engine.paged.models.int8 import DecodeInt8Linear, add_decode_int8
from promptcache.engine.paged.models.layers import Linear
from promptcache.engine.paged.models.packed import PackedLinear, pack_linears, packing_available
from tests.engine.paged.test_int8 import assert_hits_exact, logits
from tests.engine.paged.tiny_models import build

pytestmark = pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.bfloat16),
    reason="this CPU's oneDNN does not compute in bfloat16",
)


def plain_and_packed(bias: bool) -> tuple[Linear, PackedLinear]:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if bias else None
    plain = Linear(weight, b)
    return plain, PackedLinear(plain)


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_projection_computes_what_the_plain_one_does(bias: bool) -> None:
    plain, packed = plain_and_packed(bias)
    gen = torch.Generator().manual_seed(2)
    strided = torch.randn(2, 64, 3, generator=gen).transpose(1, 2)  # 3-D, not contiguous
    for x in (torch.randn(1, 64, generator=gen), torch.randn(67, 64, generator=gen), strided):
        x = x.to(torch.bfloat16)
        out = packed(x)
        assert out.shape == (*x.shape[:-1], 96) and out.dtype == torch.bfloat16
        # The models' activations are 2-D rows (for 3-D ones, F.linear adds the bias apart).
        flat = x.reshape(-1, 64)
        assert torch.equal(out.reshape(-1, 96), plain(flat))
        # Row by row as in the whole batch: a row's product never depends on its neighbours.
        assert torch.equal(packed(flat[:1]), plain(flat[:1]))


def test_layers_are_packed_and_the_head_is_not() -> None:
    model = from_hf(build("gemma3_scaled"), torch.bfloat16)  # tied embeddings
    twin = from_hf(build("gemma3_scaled"), torch.bfloat16)
    assert isinstance(model, Gemma3) and isinstance(twin, Gemma3)
    add_decode_int8(model)
    add_decode_int8(twin)
    count = pack_linears(model)
    layer = model.layers[0]
    projections = (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)
    assert count == len(projections) * len(model.layers)
    for proj in projections:
        assert isinstance(proj, DecodeInt8Linear) and isinstance(proj.dense, PackedLinear)
    assert not isinstance(model.lm_head, PackedLinear)
    # Prompt tokens run the dense weights: the packed model's logits are the plain model's.
    ids = torch.arange(40)
    assert torch.equal(logits(model, ids), logits(twin, ids))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_a_packed_engine_keeps_hits_exact(kind: str) -> None:
    from promptcache.engine.hf.testing import build_tiny_engine

    engine = build_tiny_engine(kind, decode_int8=True, dtype=torch.bfloat16, packed=True)
    assert_hits_exact(engine)


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler (g++)")
def test_a_compiled_graph_calls_the_packed_kernel() -> None:
    """Inductor lowers ``_linear_pointwise`` only for weights it packed itself: the graph calls
    the ``promptcache::packed_linear`` operator instead, and gets the same products."""
    plain, packed = plain_and_packed(True)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = packed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.gelu(self.proj(x)).sum(-1)

    block = Block()
    compiled = torch.compile(block, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for rows in (3, 5, 8):
            x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
            expected = F.gelu(plain(x).float()).sum(-1)
            torch.testing.assert_close(compiled(x).float(), expected, atol=0.05, rtol=0.02)
