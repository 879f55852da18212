"""A whole narrow decode step in the engine's own kernels (``native_decode.NativeDecode``): the
hidden states the PyTorch model computes for the same planned step, for every model family,
and the engine's tokens unchanged by it (hits exact, batches as alone)."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from promptcache.core.chatformat import PLAIN
from promptcache.core.tokenizer import ByteTokenizer
from promptcache.engine.hf.testing import build_tiny_engine, random_prompt
from promptcache.engine.paged import native
from promptcache.engine.paged.attention import StepSeq
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.models import from_hf
from promptcache.engine.paged.models.int8 import Int8Linear, add_decode_int8
from tests.engine.paged.test_int8 import assert_hits_exact
from tests.engine.paged.tiny_models import KINDS, build

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "f32"}

pytestmark = pytest.mark.skipif(
    native.kernels() is None, reason="no C++ compiler or no AVX-512 here: the kernels are not used"
)


def engine_of(
    kind: str, dtype: torch.dtype, *, int8: bool = True, kv_dtype: torch.dtype | None = None
) -> PagedEngine:
    lean = from_hf(build(kind), dtype)
    switch = add_decode_int8(lean) if int8 else None
    return PagedEngine(
        lean,
        ByteTokenizer(),
        PLAIN,
        model_id=f"tiny-{kind}",
        revision=None,
        max_context_tokens=4096,
        stop_token_ids=(),
        pool_bytes=16 << 20,
        kv_dtype=kv_dtype,
        block_tokens=8,
        decode_switch=switch,
    )


def one_step(engine: PagedEngine, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A narrow decode step of ``rows`` sequences (contexts of different lengths, beyond the
    tiny models' sliding window) planned once, run natively and then through PyTorch."""
    step = engine.native_decode
    assert step is not None
    attn, pool, model = engine._attn, engine._pool, engine._model
    per_seq = 20
    blocks = pool.allocate(per_seq * rows)
    gen = torch.Generator().manual_seed(rows)
    # Keys and values already in the blocks: random, as a real context's would be.
    for b in blocks:
        pool.kv[:, :, b] = torch.randn(pool.kv[:, :, b].shape, generator=gen).to(pool.dtype)
    seqs = [StepSeq(blocks[per_seq * i : per_seq * (i + 1)], 37 + 17 * i, 1) for i in range(rows)]
    try:
        with torch.inference_mode():
            attn.plan(seqs, [])
            ids = torch.tensor(random_prompt(rows, seed=rows))
            positions = torch.tensor([s.start for s in seqs])
            # The PyTorch model on the int8 weights too, whatever the row count (its own
            # narrow steps stop at 4 rows; the native step takes up to MAX_ROWS).
            engine._decode_switch.on = True  # type: ignore[union-attr]
            before = pool.kv[:, :, blocks].clone()
            fast = step(ids, positions)
            written = pool.kv[:, :, blocks].clone()
            with integer_reference(model.dtype):
                slow = model(ids, positions, attn)
            # Both wrote the step's keys and values, alike, and nothing else.
            torch.testing.assert_close(pool.kv[:, :, blocks], written, **tolerance(pool.dtype))
            changed = (written != before).flatten(3).any(-1).flatten(0, 1).any(0)
            assert changed.sum().item() == rows  # one (block, position) per row
    finally:
        pool.decref(blocks)
    return fast, slow


@contextlib.contextmanager
def integer_reference(dtype: torch.dtype) -> Iterator[None]:
    """Where the native step multiplies its rows in integers (``gemv_int8_vnni``), the
    PyTorch model's int8 products do the same arithmetic (``integer_product``) while it runs:
    the step is compared with the products it means to compute."""
    from promptcache.engine.paged.native_decode import VNNI_GROUP, integer_rows

    kernels = native.kernels()
    if kernels is None or not integer_rows(kernels.library, dtype):
        yield
        return

    plain = Int8Linear.forward

    def forward(self: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        n, k = self.q.shape
        if n % 16 or k % VNNI_GROUP:
            return plain(self, x)  # the step multiplies these bfloat16 pairs too
        return integer_product(self, x.reshape(-1, k)).view(*x.shape[:-1], n)

    with mock.patch.object(Int8Linear, "forward", forward):
        yield


def integer_product(linear: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear``'s output for rows ``x [B, K]`` quantized per group as ``gemv_int8_vnni``
    quantizes them (``quantized_rows``): the groups' exact integer sums times their alphas,
    times the scale and rounded to ``x``'s dtype, then the bias added and rounded."""
    from promptcache.engine.paged.native_decode import VNNI_GROUP

    q, scales, bias = linear.q, linear.scales, linear.bias
    a, alpha = quantized_rows(x, VNNI_GROUP)
    sums = torch.einsum("bgi,ngi->bgn", a.double(), q.double().view(q.shape[0], -1, VNNI_GROUP))
    out = ((sums * alpha.double()[..., None]).sum(1) * scales.double()).to(x.dtype)
    return out if bias is None else (out.double() + bias.double()).to(x.dtype)


def quantized_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, alpha)``: each group of ``group`` inputs of ``x`` as int8 ``a`` (``x * 127 /
    max |x|`` rounded half to even) and its float32 ``alpha`` (``max |x| / 127``), as
    kernels/products.h' ``quantize_rows`` makes them."""
    xg = x.float().view(x.shape[0], -1, group)
    top = xg.abs().amax(dim=-1, keepdim=True)
    # A division (``127.0 / top`` is a reciprocal times 127 in PyTorch: an ulp apart).
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    return torch.round(xg * inv).to(torch.int8), (top / 127.0).squeeze(-1)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32: the order of additions; bfloat16: a rounding or two apart (2^-8 each)."""
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 4e-2, "rtol": 4e-2}


needs_kv16 = pytest.mark.skipif(
    (k := native.kernels()) is None or not k.kv16, reason="no F16C here: PyTorch's path"
)
FLOAT16_POOL = pytest.param(torch.float32, torch.float16, marks=needs_kv16, id="float16-pool")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("dtype", "kv_dtype"), [(torch.float32, None), (torch.bfloat16, None), FLOAT16_POOL]
)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_a_step_computes_what_the_pytorch_model_does(
    kind: str, dtype: torch.dtype, kv_dtype: torch.dtype | None, rows: int
) -> None:
    engine = engine_of(kind, dtype, kv_dtype=kv_dtype)
    assert engine.native_decode is not None
    fast, slow = one_step(engine, rows)
    assert fast.shape == slow.shape and fast.dtype == dtype
    close = tolerance(dtype)
    if kv_dtype == torch.float16:
        # Keys and values summed in another order (float32 rows where the kernels multiply
        # them in floats: AVX-512) can round to neighbouring float16 values, 2^-11 apart.
        close = {"atol": 1e-3, "rtol": 1e-3}
    torch.testing.assert_close(fast, slow, **close)


def test_it_takes_only_narrow_decode_steps() -> None:
    engine = engine_of("gemma3", torch.float32)
    step = engine.native_decode
    assert step is not None
    assert step.covers(1, 0) and step.covers(step.max_rows, 0)
    assert not step.covers(step.max_rows + 1, 0)  # wide batches: dense weights, PyTorch
    assert not step.covers(1, 5) and not step.covers(0, 5)  # prompt tokens: dense weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_multiply_in_integers_wherever_the_kernels_do(dtype: torch.dtype) -> None:
    """Both dtypes' decode rows are quantized and multiplied in integers wherever the library
    has the integer products (AVX512-VNNI, AVX2): float32 is the default dtype on AVX-512
    CPUs without BF16 too, where float rows over the int8 weights were ~4x slower at 8 rows.
    Every projection the kernel can take then has its vnni copy."""
    from promptcache.engine.paged.models.int8 import DecodeInt8Linear
    from promptcache.engine.paged.native_decode import VNNI_GROUP, integer_rows

    kernels = native.kernels()
    assert kernels is not None
    integer = bool(kernels.library.pc_vnni_products())
    assert integer_rows(kernels.library, dtype) == integer
    assert not integer_rows(kernels.library, torch.float16)
    engine = engine_of("gemma3", dtype)
    assert engine.native_decode is not None
    taken = [
        m
        for m in engine.model.modules()
        if isinstance(m, DecodeInt8Linear)
        and m.int8.q.shape[0] % 16 == 0
        and m.int8.q.shape[1] % VNNI_GROUP == 0
    ]
    assert taken
    assert all((m.vnni is not None) == integer for m in taken)


def test_models_it_does_not_run_keep_pytorch() -> None:
    assert engine_of("llama", torch.float32, int8=False).native_decode is None  # no int8
    engine = engine_of("gemma3", torch.float16)
    assert engine.native_decode is None  # a dtype the kernels do not have
    with native.disabled():
        assert engine_of("gemma3", torch.float32).native_decode is None


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize(("dtype", "kv_dtype"), [(torch.bfloat16, None), FLOAT16_POOL])
def test_the_engine_keeps_hits_exact_and_decodes_natively(
    kind: str, dtype: torch.dtype, kv_dtype: torch.dtype | None
) -> None:
    engine = build_tiny_engine(kind, dtype=dtype, kv_dtype=kv_dtype, decode_int8=True)
    assert engine.native_decode is not None
    assert_hits_exact(engine)
    assert engine.native_decode.num_steps > 0


@pytest.mark.parametrize(("dtype", "kv_dtype"), [(torch.bfloat16, None), FLOAT16_POOL])
def test_a_stream_decodes_the_same_alone_and_beside_others(
    dtype: torch.dtype, kv_dtype: torch.dtype | None
) -> None:
    """Up to the int8 row limit, the step is one call for every row: a row's tokens must not
    depend on the others (each row's products, norms and attention are its own). The prompts
    fit one step together, so that every later step is a narrow decode step."""

    engine = build_tiny_engine("gemma3", dtype=dtype, kv_dtype=kv_dtype, decode_int8=True)
    assert engine.native_decode is not None
    alone, together = alone_and_together(engine)
    assert together == alone
    assert all(len(t) > 1 for t in alone)


def alone_and_together(engine: PagedEngine) -> tuple[list[list[int]], list[list[int]]]:
    """Three prompts' greedy tokens, each run alone, then all three together (they fit one
    step, so that every later step is a narrow decode step)."""
    from promptcache.core.request import Sampling
    from promptcache.engine.base import EngineRequest, TokenOut
    from promptcache.engine.hf.testing import run_all, token_ids

    greedy = Sampling(max_tokens=24, temperature=0.0)
    prompts = [random_prompt(12 + 6 * i, seed=20 + i) for i in range(3)]
    alone = [token_ids(run_all(engine, EngineRequest(p, greedy))) for p in prompts]
    seqs = [engine.add(EngineRequest(p, greedy)) for p in prompts]
    together: dict[int, list[int]] = {s: [] for s in seqs}
    while engine.num_running:
        for seq, item in engine.step():
            assert not isinstance(item, Exception)
            if isinstance(item, TokenOut):
                together[seq].append(item.token_id)
    return alone, [together[s] for s in seqs]


@pytest.mark.skipif(
    (k := native.kernels()) is None or not k.library.pc_vnni_products(),
    reason="no integer products here",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (64, 576), (640, 1024)])
def test_the_integer_products_are_the_quantized_rows_products(
    n: int, k: int, dtype: torch.dtype
) -> None:
    """``vnni_weight``'s bytes multiply as the int8 weights they came from, every value
    -127..127, by each row quantized per group of 64 (a zero group, a group with one large
    value, ordinary ones): against the same products in float64 (the groups' integer sums
    times their alphas, times the scale, rounded to the dtype twice as the kernel rounds, to
    within its float32 order); and each row's outputs, bit for bit, the same alone as beside up
    to 8 others. Both storage types, whichever machine: the float32 rows are AVX2's default."""
    from promptcache.engine.paged.models.int8 import quantize_weight
    from promptcache.engine.paged.native_decode import VNNI_GROUP, vnni_weight

    kernels = native.kernels()
    assert kernels is not None
    gemv = getattr(kernels.library, f"pc_gemv_int8_vnni_{_DTYPE_NAMES[dtype]}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemv.restype, gemv.argtypes = None, [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    gen = torch.Generator().manual_seed(n)
    q, scales = quantize_weight(torch.randn(n, k, generator=gen), dtype)
    q.view(-1)[:255] = torch.arange(-127, 128, dtype=torch.int8)  # every value there is
    bias = torch.randn(n, generator=gen).to(dtype)
    packed = vnni_weight(q)
    # The layout, element by element: [N / 16, K / 4, 16 rows, 4 inputs], q + 128.
    want_layout = (q.to(torch.int16) + 128).view(n // 16, 16, k // 4, 4).transpose(1, 2)
    assert torch.equal(packed.view(n // 16, k // 4, 16, 4).to(torch.int16), want_layout)
    x = torch.randn(9, k, generator=gen).to(dtype)
    x[1, :VNNI_GROUP] = 0  # alpha 0
    x[2, 3] = 300.0  # the rest of its group rounds to a few levels
    x[3] = x[3] * 1e-30  # tiny alphas: still exact integer sums

    def product(rows: torch.Tensor) -> torch.Tensor:
        y = torch.empty(rows.shape[0], n, dtype=dtype)
        scratch = torch.empty(rows.numel() * 2 + 64, dtype=torch.uint8)
        gemv(
            rows.data_ptr(),
            rows.shape[0],
            k,
            packed.data_ptr(),
            scales.data_ptr(),
            bias.data_ptr(),
            n,
            y.data_ptr(),
            scratch.data_ptr(),
        )
        return y

    together = product(x)
    want = integer_product(Int8Linear(q, scales, bias), x)
    close = (
        {"atol": 1e-2, "rtol": 2**-7} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-5}
    )
    torch.testing.assert_close(together, want, **close)
    for r in range(9):
        assert torch.equal(product(x[r : r + 1].clone()), together[r : r + 1])
