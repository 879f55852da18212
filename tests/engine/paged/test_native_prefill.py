"""The native prefill step (``native_prefill``): a chunk computed there is the same bits as
through the model's PyTorch forward (bfloat16: its products summed as oneDNN sums them;
float32: the same kernels), so a hit's suffix and the cold prompt agree exactly whichever way
each chunk went."""

from __future__ import annotations

import ctypes

import pytest
import torch

from promptcache.core.request import Sampling
from promptcache.engine.base import EngineRequest
from promptcache.engine.hf.testing import build_tiny_engine, prefilled, random_prompt, run_all
from promptcache.engine.paged import native
from promptcache.engine.paged.engine import PagedEngine
from promptcache.engine.paged.models.int8 import quantize_weight
from promptcache.engine.paged.models.layers import Linear
from promptcache.engine.paged.models.packed import PackedLinear, packing_available
from promptcache.engine.paged.models.panels import PanelLinear
from promptcache.engine.paged.native_decode import vnni_weight
from promptcache.engine.paged.native_prefill import NativePrefill, _calibrate, pair_dense
from promptcache.engine.paged.pool import PoolPayload
from tests.engine.paged.test_int8 import assert_hits_exact

KERNELS = native.kernels()
pytestmark = pytest.mark.skipif(
    KERNELS is None, reason="no C++ compiler or no AVX-512 or AVX2 here: PyTorch's path"
)
needs_bf16 = pytest.mark.skipif(
    KERNELS is None or KERNELS.prefill is None, reason="no AVX512-BF16 here: PyTorch's path"
)
# Float32 wherever the kernels run (its projections on models.panels); bfloat16 with
# AVX512-BF16.
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)]
needs_kv16 = pytest.mark.skipif(
    KERNELS is None or not KERNELS.kv16, reason="no F16C here: PyTorch's path for float16 pools"
)


def engine_of(
    kind: str,
    *,
    packed: bool = False,
    decode_int8: bool = False,
    step_tokens: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    kv_dtype: torch.dtype | None = None,
) -> PagedEngine:
    engine = build_tiny_engine(
        kind,
        dtype=dtype,
        kv_dtype=kv_dtype,
        packed=packed,
        decode_int8=decode_int8,
        max_batch_tokens=step_tokens,
    )
    assert engine.native_prefill is not None
    return engine


def written(engine: PagedEngine, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a prompt's prefill writes (every layer, every position) and the
    logits of its last row."""
    request = EngineRequest(tokens, Sampling(max_tokens=0), snapshot_at=[len(tokens)])
    snapshot = prefilled(run_all(engine, request)).snapshots[len(tokens)]
    assert isinstance(snapshot, PoolPayload)
    pool, bt = engine.pool, engine.pool.block_tokens
    slots = torch.tensor([b * bt + i for b in snapshot.blocks for i in range(bt)])
    slots = slots[: len(tokens)]
    layers = range(engine.model.shape.num_layers)
    kv = torch.stack([torch.stack([pool.keys(i)[slots], pool.values(i)[slots]]) for i in layers])
    return kv, engine.prompt_logits(EngineRequest(tokens, Sampling(max_tokens=1)))


def assert_same_bits_both_ways(engine: PagedEngine, tokens: list[int], chunks: int) -> None:
    """The prompt's keys, values and last logits with the native step (which ran at least
    ``chunks`` chunks) and through PyTorch are the same bits."""
    natively = engine.native_prefill
    assert natively is not None
    kv, logits = written(engine, tokens)
    assert natively.num_steps >= chunks
    engine.native_prefill = None
    kv_torch, logits_torch = written(engine, tokens)
    assert torch.equal(kv, kv_torch)
    assert torch.equal(logits, logits_torch)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize(
    ("dtype", "packed", "decode_int8", "kv_dtype"),
    [
        pytest.param(torch.bfloat16, False, False, None, marks=needs_bf16),
        pytest.param(torch.bfloat16, True, True, None, marks=needs_bf16),
        (torch.float32, False, False, None),
        (torch.float32, False, True, None),
        # A float16 pool: the steps round what they store as PyTorch's .to(torch.float16)
        # rounds, and read it back converted.
        pytest.param(torch.float32, False, True, torch.float16, marks=needs_kv16),
    ],
)
def test_a_chunk_is_the_same_bits_as_through_pytorch(
    kind: str, dtype: torch.dtype, packed: bool, decode_int8: bool, kv_dtype: torch.dtype | None
) -> None:
    # Chunks of 64, 64 and 22 (the tiny gemma3's window is 16: windowed masks in each).
    engine = engine_of(kind, packed=packed, decode_int8=decode_int8, dtype=dtype, kv_dtype=kv_dtype)
    assert_same_bits_both_ways(engine, random_prompt(150, seed=7), chunks=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_a_full_step_of_prompt_is_the_same_bits_as_through_pytorch(
    kind: str, dtype: torch.dtype
) -> None:
    """Chunks of a CPU's default step (512 tokens: the cold prompt's) and a short last one."""
    engine = engine_of(kind, packed=dtype == torch.bfloat16, step_tokens=512, dtype=dtype)
    assert engine.native_prefill is not None and engine.native_prefill.covers(0, [512])
    assert_same_bits_both_ways(engine, random_prompt(600, seed=8), chunks=4)  # 512 + 88, twice


@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [
        (torch.float32, None),
        pytest.param(torch.bfloat16, None, marks=needs_bf16),
        pytest.param(torch.float32, torch.float16, marks=needs_kv16, id="float16-pool"),
    ],
)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_hits_stay_exact(kind: str, dtype: torch.dtype, kv_dtype: torch.dtype | None) -> None:
    engine = engine_of(kind, packed=dtype == torch.bfloat16, dtype=dtype, kv_dtype=kv_dtype)
    assert_hits_exact(engine)
    assert engine.native_prefill is not None and engine.native_prefill.num_steps > 0


def test_a_float32_model_without_panels_keeps_pytorchs_path() -> None:
    engine = build_tiny_engine("llama", dtype=torch.float32, panels=False)
    assert engine.native_prefill is None


def test_it_takes_steps_of_one_short_chunk_alone() -> None:
    natively = engine_of("llama", dtype=torch.float32).native_prefill
    assert natively is not None
    assert natively.covers(0, [64])
    assert natively.covers(0, [1])
    assert not natively.covers(1, [64])  # decode rows in the step
    assert not natively.covers(0, [3, 4])  # two chunks
    assert not natively.covers(0, [natively.max_rows + 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_projection_with_a_bias_keeps_pytorchs_path(dtype: torch.dtype) -> None:
    engine = engine_of("llama", dtype=dtype)
    qkv = engine.model.layers[0].attn.qkv
    assert isinstance(qkv, (Linear, PanelLinear))
    qkv.bias = torch.nn.Parameter(torch.zeros(qkv.out_features, dtype=dtype), requires_grad=False)
    assert NativePrefill.build(engine.model, engine._attn, 64) is None


@needs_bf16
@pytest.mark.skipif(
    not packing_available(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here"
)
@pytest.mark.parametrize(
    ("n", "k", "seed"),
    [
        *((n, k, n + k) for n, k in [(1536, 640), (640, 1024), (4096, 640), (640, 2048)]),
        # SmolLM2-135M's: a weight on which 64 probe rows took one sum over all 576 inputs for
        # oneDNN's blocks of 256 pairs (seed 7), and its other three shapes.
        (576, 576, 7),
        *((n, k, n + k) for n, k in [(960, 576), (3072, 576), (576, 1536)]),
    ],
)
def test_the_products_are_onednns_bit_for_bit(n: int, k: int, seed: int) -> None:
    """Gemma 3 270M's and SmolLM2-135M's projection shapes: the block found on the probe rows
    makes every output of other rows, of any count, the same as oneDNN's packed matmul."""
    assert KERNELS is not None
    gemm = KERNELS.library.pc_gemm_bf16
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemm.restype, gemm.argtypes = None, [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64]
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
    onednn = PackedLinear(Linear(weight))
    paired = pair_dense(weight)
    block = _calibrate(gemm, onednn, paired, {})
    assert block is not None
    for rows in (1, 7, 60, 64, 100, 300):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        got = torch.empty(rows, n, dtype=torch.bfloat16)
        gemm(x.data_ptr(), k, rows, k, paired.data_ptr(), n, block, got.data_ptr(), n)
        with torch.inference_mode():
            assert torch.equal(got, onednn(x))


needs_int8_rows = pytest.mark.skipif(
    KERNELS is None or not KERNELS.library.pc_vnni_products(),
    reason="no AVX512-VNNI or AVX2 here: prompts keep their dense products",
)
# Float32 wherever the kernels multiply int8 rows; bfloat16 with AVX512-BF16 as well.
INT8_DTYPES = [
    pytest.param(torch.float32, marks=needs_int8_rows),
    pytest.param(torch.bfloat16, marks=[needs_int8_rows, needs_bf16]),
]
_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}


@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize(("n", "k"), [(48, 64), (640, 1024), (2048, 640)])
def test_the_integer_prompt_products_are_the_decode_steps_row_for_row(
    n: int, k: int, dtype: torch.dtype
) -> None:
    """``gemm_int8_vnni`` (a prompt chunk's rows, every count, read from and written into
    wider rows) gives each row the bits ``gemv_int8_vnni`` (a decode step's) gives it."""
    assert KERNELS is not None
    lib = KERNELS.library
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    gemv = getattr(lib, f"pc_gemv_int8_vnni_{_NAMES[dtype]}")
    gemm = getattr(lib, f"pc_gemm_int8_vnni_{_NAMES[dtype]}")
    gemv.restype, gemv.argtypes = None, [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr]
    gemm.restype, gemm.argtypes = None, [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr]
    gen = torch.Generator().manual_seed(n + k)
    q, scales = quantize_weight(torch.randn(n, k, generator=gen), dtype)
    packed = vnni_weight(q)
    for rows in (1, 7, 8, 9, 17, 64, 100):
        wide = torch.randn(rows, k + 64, generator=gen).to(dtype)
        x = wide[:, 32 : 32 + k]  # a row stride of k + 64
        y = torch.full((rows, n + 16), 7.0, dtype=dtype)
        scratch = torch.empty(rows * k * 2 + 128, dtype=torch.uint8)
        gemm(x.data_ptr(), k + 64, rows, k, packed.data_ptr(), scales.data_ptr(), n,
             y.data_ptr(), n + 16, scratch.data_ptr())  # fmt: skip
        for r in range(rows):
            row = x[r : r + 1].contiguous()
            want = torch.empty(1, n, dtype=dtype)
            gemv(row.data_ptr(), 1, k, packed.data_ptr(), scales.data_ptr(), None, n,
                 want.data_ptr(), scratch.data_ptr())  # fmt: skip
            assert torch.equal(y[r, :n], want[0]), (rows, r)
        assert bool((y[:, n:] == 7.0).all())  # past each row's n outputs: untouched


def integer_engine(kind: str, dtype: torch.dtype, step_tokens: int = 64) -> PagedEngine:
    engine = build_tiny_engine(
        kind,
        dtype=dtype,
        packed=dtype == torch.bfloat16,
        decode_int8=True,
        max_batch_tokens=step_tokens,
        integer_prompts=True,
    )
    assert engine.native_prefill is not None and engine.native_prefill.integer
    return engine


@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_integer_prompts_keep_hits_exact_whatever_the_chunks(kind: str, dtype: torch.dtype) -> None:
    """Every chunk of a prompt goes through the integer step (not PyTorch's dense forward, which
    would compute other bits), so a hit's suffix is what the cold prompt computed, and a prompt
    cut into other chunks writes the same keys and values."""
    engine = integer_engine(kind, dtype)
    assert_hits_exact(engine)
    tokens = random_prompt(150, seed=7)
    kv, logits = written(engine, tokens)
    assert engine.native_prefill is not None and engine.native_prefill.num_steps >= 3
    kv_small, logits_small = written(integer_engine(kind, dtype, step_tokens=24), tokens)
    assert torch.equal(kv, kv_small)
    assert torch.equal(logits, logits_small)


@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_integer_prompts_are_another_revision_close_to_the_dense_one(
    kind: str, dtype: torch.dtype
) -> None:
    """Other bits than the dense weights give (so another revision: a disk entry of one is not
    a hit of the other), but the same computation: the last logits agree to int8's error."""
    engine = integer_engine(kind, dtype)
    dense = engine_of(kind, packed=dtype == torch.bfloat16, decode_int8=True, dtype=dtype)
    assert not (dense.native_prefill is not None and dense.native_prefill.integer)
    assert engine.info.revision != dense.info.revision
    tokens = random_prompt(150, seed=9)
    kv, logits = written(engine, tokens)
    kv_dense, logits_dense = written(dense, tokens)
    assert not torch.equal(kv, kv_dense)
    cosine = torch.nn.functional.cosine_similarity(logits.float(), logits_dense.float(), dim=-1)
    assert float(cosine.min()) > 0.99
    assert int(logits.argmax()) == int(logits_dense.argmax())
