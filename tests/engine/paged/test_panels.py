"""Float32 projections on the engine's own product (``models.panels``): the products of the
plain weights to float32's precision, a row the same bits whatever rows come with it, eagerly
and inside a compiled graph, and an engine of such layers keeps hits exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptcache.engine.paged import native
from promptcache.engine.paged.compiled import compiler_available
from promptcache.engine.paged.models import Gemma3, from_hf
from promptcache.engine.paged.models.int8 import DecodeInt8Linear, add_decode_int8
from promptcache.engine.paged.models.layers import Linear
from promptcache.engine.paged.models.panels import (
    PanelLinear,
    panel_linears,
    panels_available,
    plain,
)
from tests.engine.paged.test_int8 import assert_hits_exact, logits
from tests.engine.paged.tiny_models import build

pytestmark = pytest.mark.skipif(
    not panels_available(torch.device("cpu"), torch.float32),
    reason="no AVX-512 or AVX2 here: the engine's CPU kernels are not used",
)


def plain_and_panels(bias: bool, out: int = 96, k: int = 72) -> tuple[Linear, PanelLinear]:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(out, k, generator=gen)
    b = torch.randn(out, generator=gen) if bias else None
    linear = Linear(weight, b)
    return linear, PanelLinear(linear)


def test_the_panels_hold_the_weight_exactly() -> None:
    linear, panels = plain_and_panels(False)
    assert torch.equal(plain(panels.panels), linear.weight)


@pytest.mark.parametrize("bias", [False, True])
def test_a_panel_projection_computes_the_plain_product(bias: bool) -> None:
    linear, panels = plain_and_panels(bias, out=160, k=333)  # K neither even nor a power of 2
    gen = torch.Generator().manual_seed(2)
    strided = torch.randn(2, 333, 3, generator=gen).transpose(1, 2)  # 3-D, not contiguous
    for x in (torch.randn(1, 333, generator=gen), torch.randn(67, 333, generator=gen), strided):
        out = panels(x)
        assert out.shape == (*x.shape[:-1], 160) and out.dtype == torch.float32
        exact = F.linear(x.double(), linear.weight.double(), None)
        if bias:
            exact = exact + linear.bias.double()  # type: ignore[union-attr]
        # One chain of float32 FMAs over 333 inputs: within a few ulps of the largest term.
        scale = (x.abs().double() @ linear.weight.abs().double().T).max()
        assert (out.double() - exact).abs().max() <= 1e-6 * scale + 1e-6


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 13, 64, 131])
def test_a_row_is_the_same_bits_in_any_company(rows: int) -> None:
    """Tiles of every size (the row counts around the register tile's) and any offset of the
    row in them: a row alone gives what it gives among others, the bias included."""
    _, panels = plain_and_panels(True, out=48, k=200)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 200, generator=gen)
    together = panels(x)
    for r in {0, rows // 2, rows - 1}:
        assert torch.equal(panels(x[r : r + 1]), together[r : r + 1])
    # The same computation where the kernels are off (tests, benchmarks): PyTorch's product.
    with native.disabled():
        torch.testing.assert_close(panels(x), together, rtol=1e-5, atol=1e-5)


def test_the_layers_take_panels_and_the_head_does_not() -> None:
    model = from_hf(build("gemma3_scaled"), torch.float32)  # tied embeddings
    twin = from_hf(build("gemma3_scaled"), torch.float32)
    assert isinstance(model, Gemma3) and isinstance(twin, Gemma3)
    add_decode_int8(model)
    add_decode_int8(twin)
    count = panel_linears(model)
    layer = model.layers[0]
    projections = (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down)
    assert count == len(projections) * len(model.layers)
    for proj in projections:
        assert isinstance(proj, DecodeInt8Linear) and isinstance(proj.dense, PanelLinear)
    assert not isinstance(model.lm_head, PanelLinear)
    ids = torch.arange(40)
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), rtol=1e-4, atol=1e-4)


def test_a_width_off_the_panel_keeps_its_plain_weight() -> None:
    odd = Linear(torch.randn(40, 32))  # 40 outputs: not a multiple of 16
    assert not PanelLinear.fits(odd)
    assert PanelLinear.fits(Linear(torch.randn(48, 32)))
    assert not PanelLinear.fits(Linear(torch.randn(48, 32).to(torch.bfloat16)))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_an_engine_of_panels_keeps_hits_exact(kind: str) -> None:
    from promptcache.engine.hf.testing import build_tiny_engine

    engine = build_tiny_engine(kind, decode_int8=True, panels=True)
    layer = engine.model.layers[0]
    assert isinstance(layer.mlp.down, DecodeInt8Linear)
    assert isinstance(layer.mlp.down.dense, PanelLinear)
    assert_hits_exact(engine)


@pytest.mark.skipif(not compiler_available(), reason="no C++ compiler (g++)")
def test_a_compiled_graph_calls_the_panel_kernel() -> None:
    """A compiled graph calls the ``promptcache::panel_linear`` operator: the same bits as
    eagerly."""
    _, panels = plain_and_panels(True)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = panels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * 2.0

    compiled = torch.compile(Block(), dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for rows in (3, 5, 8):
            x = torch.randn(rows, 72, generator=gen)
            assert torch.equal(compiled(x), panels(x) * 2.0)
