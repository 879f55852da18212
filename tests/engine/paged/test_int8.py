"""Weight-only int8: the layer computes exactly with its dequantized weight, and a quantized
model stays about as close to float32 as bfloat16 is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.models import Gemma3, Llama, from_hf
from promptcache.engine.paged.models.int8 import (
    Int8Linear,
    kernel_dtype,
    quantize_int8,
    quantize_weight,
)
from promptcache.engine.paged.models.layers import Linear
from promptcache.engine.paged.models.reference import ContiguousAttention
from tests.engine.paged.tiny_models import build

LENGTH = 48


def logits(model: Llama | Gemma3, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(ids, torch.arange(ids.shape[0]), ContiguousAttention(model.attn_specs))
        return model.logits(hidden).float()


def test_rounding_is_within_half_a_step() -> None:
    weight = torch.randn(96, 64)
    weight[3] = 0.0  # an all-zero channel must not divide by zero
    q, scales = quantize_weight(weight, torch.float32)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    error = (q.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_multiplies_by_its_dequantized_weight(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    layer = Int8Linear.from_linear(Linear(weight.to(dtype), bias.to(dtype)))
    deq, b = layer.dequantized().float(), bias.to(dtype).float()
    rows = kernel_dtype(dtype)
    assert layer.kernel_scales.dtype == rows
    # 3-D and strided activations reach the kernel as 2-D rows, contiguous.
    strided = torch.randn(2, 64, 3, generator=gen).transpose(1, 2)
    for x in (torch.randn(5, 64, generator=gen), strided):
        x = x.to(dtype)
        expected = F.linear(x.to(rows).float(), deq, b)
        out = layer(x)
        assert out.dtype == dtype and out.shape == expected.shape
        # float32 rows: summation order only. bfloat16 rows (or float32 rows the kernel takes
        # as bfloat16): its output and the bias add each round to 8 bits, so two half-ulps of
        # the largest output.
        tol = 1e-4 if rows == torch.float32 else 2**-7 * float(expected.abs().max())
        assert (out.float() - expected).abs().max() <= tol


def test_float32_rows_take_the_kernels_vector_code() -> None:
    """On x86 PyTorch's int8 kernel has vector code for bfloat16 rows only: float32 rows go
    through it as bfloat16 there, as they are elsewhere."""
    x86 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert kernel_dtype(torch.float32) == (torch.bfloat16 if x86 else torch.float32)
    assert kernel_dtype(torch.bfloat16) == torch.bfloat16


def test_float32_models_take_the_int8_copies_in_wider_steps_where_rows_go_as_bfloat16() -> None:
    from promptcache.engine.paged.models.int8 import (
        NARROW_ROWS,
        NARROW_ROWS_AS_BF16,
        add_decode_int8,
        narrow_rows,
    )

    assert narrow_rows(torch.bfloat16) == NARROW_ROWS
    as_bf16 = kernel_dtype(torch.float32) == torch.bfloat16
    assert narrow_rows(torch.float32) == (NARROW_ROWS_AS_BF16 if as_bf16 else NARROW_ROWS)
    for dtype in (torch.float32, torch.bfloat16):
        model = from_hf(build("llama"), dtype)
        assert add_decode_int8(model).max_rows == narrow_rows(dtype)


def test_a_row_is_multiplied_alike_alone_and_in_a_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = Int8Linear.from_linear(Linear(torch.randn(160, 128, generator=gen)))
    x = torch.randn(9, 128, generator=gen)
    batch = layer(x)
    assert torch.equal(torch.cat([layer(x[i : i + 1]) for i in range(9)]), batch)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_quantized_model_stays_as_close_as_bfloat16(kind: str, lm_head: bool) -> None:
    """Per-channel int8 rounds each weight by at most half of max|w|/127 of its channel, an
    error of the order of bfloat16's 8-bit mantissa; measured on these tiny models the logits'
    mean error is 1.0-1.3x bf16's and top-1 agrees on 96-100% of positions. Bounds: 2x, 90%."""
    ids = torch.randint(0, 256, (LENGTH,), generator=torch.Generator().manual_seed(5))
    model = from_hf(build(kind))
    assert isinstance(model, Llama | Gemma3)
    ref = logits(model, ids)
    bf16_error = (logits(from_hf(build(kind), torch.bfloat16), ids) - ref).abs().mean()
    quantize_int8(model, lm_head=lm_head)
    ours = logits(model, ids)
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().mean() <= 2 * bf16_error
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_what_gets_quantized() -> None:
    model = from_hf(build("gemma3_scaled"), torch.bfloat16)  # tied embeddings
    assert isinstance(model, Gemma3)
    embed = model.embed
    quantize_int8(model)
    layer = model.layers[0]
    for proj in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up, layer.mlp.down):
        assert isinstance(proj, Int8Linear)
        assert proj.scales.dtype == torch.bfloat16
    assert isinstance(model.lm_head, Linear)
    quantize_int8(model, lm_head=True)
    assert isinstance(model.lm_head, Int8Linear)
    assert model.embed is embed and model.embed.dtype == torch.bfloat16
    ids = torch.arange(20)
    assert torch.isfinite(logits(model, ids)).all()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_int8_decode_weights_keep_hits_exact(kind: str) -> None:
    """With int8 decode weights, prompt tokens still use the dense weights: a whole-prompt hit
    (one prompt token computed) and a partial hit give the cold run's tokens; the decode tokens
    themselves come from the int8 weights, so they may differ from the dense-only engine's."""
    from promptcache.engine.hf.testing import build_tiny_engine

    assert_hits_exact(build_tiny_engine(kind, decode_int8=True, dtype=torch.bfloat16))


def assert_hits_exact(engine: PagedEngine) -> None:
    """A whole-prompt hit (one prompt token computed) and a partial hit give the cold tokens."""
    from promptcache.core.request import Sampling
    from promptcache.engine.base import EngineRequest
    from promptcache.engine.hf.testing import prefilled, random_prompt, run_all, token_ids

    tokens = random_prompt(70, seed=4)
    greedy = Sampling(max_tokens=16, temperature=0.0)
    cold = run_all(engine, EngineRequest(tokens, greedy, snapshot_at=(40, 70)))
    snaps = prefilled(cold).snapshots
    for x, reuse in ((40, 40), (70, 69)):
        warm = run_all(engine, EngineRequest(tokens, greedy, snaps[x], reuse))
        assert token_ids(warm) == token_ids(cold)


def test_decode_switch_is_on_only_in_narrow_decode_steps() -> None:
    from promptcache.engine.paged.models.int8 import DecodeSwitch

    switch = DecodeSwitch(max_rows=4)
    for decode, prefill, on in (
        (1, 0, True),
        (4, 0, True),
        (5, 0, False),
        (1, 3, False),
        (0, 2, False),
    ):
        switch.set_step(decode, prefill)
        assert switch.on is on


def test_a_compilation_on_another_thread_leaves_the_eager_choice_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the compile thread traces, PyTorch's process-wide ``is_compiling`` flag is set on
    every thread: the engine thread's eager steps must still choose by the switch (prompt
    tokens dense, even three of them; a last layer with no sampled row has zero rows)."""
    from promptcache.engine.paged.models.int8 import DecodeInt8Linear, DecodeSwitch

    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling()
    gen = torch.Generator().manual_seed(6)
    dense = Linear(torch.randn(96, 64, generator=gen))
    switch = DecodeSwitch(max_rows=4)
    layer = DecodeInt8Linear(dense, switch)
    switch.set_step(0, 3)  # a step of three prompt tokens
    for rows in (3, 0):
        x = torch.randn(rows, 64, generator=gen)
        assert torch.equal(layer(x), dense(x))


def test_auto_quantize_is_int8_decode_on_a_cpu_for_small_models() -> None:
    from promptcache.engine.hf.loader import resolve_quantize
    from promptcache.engine.hf.testing import build_tiny_model

    model = build_tiny_model("llama")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_quantize(None, cpu, model) == "int8"
    assert resolve_quantize("auto", cuda, model) == "none"
    assert resolve_quantize("none", cpu, model) == "none"
    with pytest.raises(ValueError, match="quantization"):
        resolve_quantize("int3", cpu, model)
