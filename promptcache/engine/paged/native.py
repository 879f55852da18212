"""The engine's own CPU kernels (``native.cpp``, the C interface of ``kernels/*.h``), built with
the machine's C++ compiler and called through ctypes.

A decode step of a small model on a CPU pays a fixed cost per PyTorch operation (dispatch,
allocation, oneDNN's set-up for each small matmul) that is larger than the operation's
arithmetic: attention from one query over 128 keys took ~90 us through PyTorch and takes
~12 us here (docs/benchmarks.md). The source is plain C++ with no PyTorch headers, one
translation unit, so it builds in ~10 s, once per machine and source (``-march=native``: the
build is keyed by the CPU's features too), into ``directory()``; later starts load the built
library.

Two levels: ``Kernels`` wraps the per-operation kernels the layers call in every step
(attention, norms with their residual adds, q/k norm and rope, the gated activation), and
``native_decode.NativeDecode`` and ``native_prefill.NativePrefill`` call the whole-step
functions for narrow decode steps and for steps of one short prompt chunk.

The kernels are used only where they pay: an x86 CPU with AVX-512, or AVX2 with FMA (the vector
paths, written for AVX-512's 16 lanes and run on AVX2 as two 8-lane halves, ``kernels/avx2.h``;
elsewhere the portable loops would be slower than PyTorch), tensors in bfloat16 or float32.
Without a compiler, or with ``PROMPTCACHE_NATIVE=off``, everything runs through PyTorch as
before. ctypes releases the GIL for the call's duration, so the HTTP threads run beside a
kernel. The library is linked against ``libgomp.so.1`` by name, which resolves to the OpenMP
runtime PyTorch has already loaded (its CPU wheels ship one of that name): the kernels split
their work over PyTorch's own thread team, never a second one (``_openmp_runtimes`` warns if it
ever is).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.cpp")
HEADERS = Path(__file__).with_name("kernels")
"""The kernels ``SOURCE`` includes, by what they compute (attention, products, the head...)."""
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c++17",
)
"""No ``-ffast-math``: linking with it would set the CPU's flush-to-zero mode for the whole
process, PyTorch included. No contraction of ``a * b + c`` into one rounding: a loop's scalar
tail then computes exactly what its vector body computes."""

_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}

INT4_GROUP = 64
"""Inputs per scale of the int4 head's weights (``int4_logits``, kernels/head.h)."""

INT4_TOP_BLOCK = 128
"""Columns per block of ``int4_logits``' block maxima (kernels/head.h's, checked at load)."""

_lock = threading.Lock()
_loaded: Kernels | None = None
_tried = False
_directory: Path | None = None
_disabled = 0


def use_directory(path: Path) -> None:
    """Build into (and load from) ``path`` (the engine's cache directory) unless the user chose
    one (``PROMPTCACHE_NATIVE_DIR``) or a library is already loaded."""
    global _directory
    _directory = path


def directory() -> Path:
    chosen = os.environ.get("PROMPTCACHE_NATIVE_DIR")
    if chosen:
        return Path(chosen)
    if _directory is not None:
        return _directory
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "promptcache" / "native"


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where the OS lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def build_key(compiler_version: str) -> str:
    """What a built library is named by: its sources (``SOURCE`` and every header under
    ``HEADERS``), the compiler's version, the flags and the CPU's features."""
    sources = [SOURCE.read_text()]
    sources += [f"{h.name}\n{h.read_text()}" for h in sorted(HEADERS.glob("*.h"))]
    parts = (*sources, compiler_version, " ".join(FLAGS), _cpu_features())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(compiler: str, target_dir: Path) -> Path:
    """The library for this source, compiler and CPU under ``target_dir``, compiled now unless
    a previous build left it there. Raises ``RuntimeError`` when the compiler fails."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    target = target_dir / f"promptcache-native-{build_key(version)}.so"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a concurrent start never loads half a file.
    fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Kernels:
    """The loaded library's functions, over tensors."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        """The library itself (``native_decode`` calls its whole-step function)."""
        self._fns: dict[tuple[str, torch.dtype], Any] = {}
        ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        signatures = {
            "decode_attention": [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, f32],
            "rms_norm": [ptr, i64, i64, i64, ptr, f32, i32, ptr],
            "residual_norm": [ptr, ptr, i64, i64, ptr, f32, ptr, f32, i32, ptr, ptr],
            "qk_norm_rope": [ptr, i64, i64, i64, i64, ptr, f32, i32, ptr, ptr, ptr],
            "gated_act": [ptr, i64, i64, i32, ptr],
            "scale_mask_softmax": [ptr, i64, i64, ptr, i64, f32, ptr],
        }
        self._argmax = library.pc_argmax_rows
        self._argmax.restype = None
        self._argmax.argtypes = [ptr, i64, i64, ptr]
        self._sample_rows = library.pc_sample_rows
        self._sample_rows.restype = None
        self._sample_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr]
        self._argmax_blocks = library.pc_argmax_blocks
        self._argmax_blocks.restype = None
        self._argmax_blocks.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr]
        self._decode_plan = library.pc_decode_plan
        self._decode_plan.restype = None
        self._decode_plan.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, ptr]
        self._prefill_plan = library.pc_prefill_plan
        self._prefill_plan.restype = None
        self._prefill_plan.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr]
        self._gemm_f32 = library.pc_gemm_f32
        self._gemm_f32.restype = None
        self._gemm_f32.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64]
        self._panel_f32 = library.pc_panel_f32
        self._panel_f32.restype = None
        self._panel_f32.argtypes = [ptr, i64, i64, ptr]
        library.pc_f32_panel.restype = i64
        self.panel = int(library.pc_f32_panel())
        """Outputs side by side in ``panel_f32``'s layout (``gemm_f32`` takes N a multiple)."""
        self._rescore_fns: dict[torch.dtype, Any] = {torch.float32: library.pc_int4_rescore_f32}
        """``int4_rescore``'s function per dtype: float32 wherever the kernels run, bfloat16
        with AVX512-BF16."""
        if library.pc_int4_rescore_available():
            self._rescore_fns[torch.bfloat16] = library.pc_int4_rescore
        for fn in self._rescore_fns.values():
            fn.restype = None
            fn.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr]
        self.prefill: Any = None
        """``prefill_attention``'s function where it runs here (AVX512-BF16), else None."""
        if library.pc_prefill_attention_available():
            self.prefill = library.pc_prefill_attention_bf16
            self.prefill.restype = None
            self.prefill.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64]
            self.prefill.argtypes += [i64, f32, ptr, i64]
        self._prefill_fns: dict[torch.dtype, Any] = {}
        """``prefill_attention``'s function per dtype: float32 wherever the kernels run,
        bfloat16 with AVX512-BF16."""
        prefill_f32 = library.pc_prefill_attention_f32
        prefill_f32.restype = None
        prefill_args: list[Any] = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64]
        prefill_args += [i64, f32, ptr, i64]
        prefill_f32.argtypes = prefill_args
        self._prefill_fns[torch.float32] = prefill_f32
        if self.prefill is not None:
            self._prefill_fns[torch.bfloat16] = self.prefill
        self.kv16 = bool(library.pc_kv16_available())
        """Whether a float16 pool under a float32 model runs here (``--kv-dtype float16``:
        AVX-512 or F16C); the attention functions below then take its keys and values."""
        self._kv16_fns: dict[str, Any] = {}
        if self.kv16:
            decode16: Any = library.pc_decode_attention_f32_kv16
            decode16.restype = None
            decode16.argtypes = signatures["decode_attention"]
            prefill16 = library.pc_prefill_attention_f32_kv16
            prefill16.restype = None
            prefill16.argtypes = prefill_args
            self._kv16_fns = {"decode_attention": decode16, "prefill_attention": prefill16}
        self.int4_head = bool(library.pc_int4_head())
        """Whether ``int4_logits`` runs here (a CPU with AVX512-VNNI)."""
        if self.int4_head:
            library.pc_int4_top_block.restype = i64
            if library.pc_int4_top_block() != INT4_TOP_BLOCK:
                raise RuntimeError("kernels/head.h's INT4_TOP_BLOCK and native.py's disagree")
            for dtype, suffix in _DTYPES.items():
                fn = getattr(library, f"pc_int4_logits_{suffix}")
                fn.restype = None
                fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr]
                self._fns["int4_logits", dtype] = fn
        for op, argtypes in signatures.items():
            for dtype, suffix in _DTYPES.items():
                fn = getattr(library, f"pc_{op}_{suffix}")
                fn.restype = None
                fn.argtypes = argtypes
                self._fns[op, dtype] = fn

    def decode_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor | None:
        """``attention.decode_attend``'s result, or None when these tensors are not the
        kernel's (another dtype or device, a layout it does not read). ``keys, values``: the
        pool's, in ``q``'s dtype or float16 under a float32 ``q``."""
        fn = self._attention_fn("decode_attention", q, keys)
        b, h, d = q.shape
        if (
            fn is None
            or q.device.type != "cpu"
            or q.stride(2) != 1
            or q.stride(1) != d
            or not (keys.is_contiguous() and values.is_contiguous() and slots.is_contiguous())
            or values.dtype != keys.dtype
            or slots.dtype != torch.long
            or (mask is not None and (mask.dtype != torch.float32 or not mask.is_contiguous()))
        ):
            return None
        out = torch.empty((b, h, d), dtype=q.dtype)
        fn(
            q.data_ptr(),
            q.stride(0),
            keys.data_ptr(),
            values.data_ptr(),
            slots.data_ptr(),
            None if mask is None else mask.data_ptr(),
            out.data_ptr(),
            b,
            h,
            keys.shape[1],
            d,
            slots.shape[1],
            scale,
        )
        return out

    def _attention_fn(self, op: str, q: torch.Tensor, keys: torch.Tensor) -> Any:
        """``op``'s function (``decode_attention`` or ``prefill_attention``) for ``q``'s dtype
        over a pool of ``keys``' dtype, or None."""
        if keys.dtype == q.dtype:
            if op == "prefill_attention":
                return self._prefill_fns.get(q.dtype)
            return self._fns.get((op, q.dtype))
        if q.dtype == torch.float32 and keys.dtype == torch.float16:
            return self._kv16_fns.get(op)
        return None

    def panel_f32(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight [N, K]`` (float32, N a multiple of ``panel``) laid out for ``gemm_f32``:
        ``[N / panel, K, panel]``, ``panel`` outputs side by side."""
        n, k = weight.shape
        w = weight.detach().contiguous()
        out = torch.empty((n // self.panel, k, self.panel), dtype=torch.float32)
        self._panel_f32(w.data_ptr(), n, k, out.data_ptr())
        return out

    def gemm_f32(
        self, x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``x [M, K] W^T + bias`` in float32 for ``panels`` (``panel_f32`` of W): each output
        one chain of FMAs over its inputs in order, so a row is the same bits whatever rows
        come with it. ``x``: float32, its last dimension contiguous."""
        m, k = x.shape
        n = panels.shape[0] * panels.shape[2]
        out = torch.empty((m, n), dtype=torch.float32)
        self._gemm_f32(
            x.data_ptr(), x.stride(0), m, k, panels.data_ptr(), n, _ptr(bias), out.data_ptr(), n
        )
        return out

    def prefill_attention(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slots: torch.Tensor,
        positions: tuple[int, int],
        window: int | None,
        scale: float,
        out: torch.Tensor,
    ) -> bool:
        """Attention of a prefill chunk's queries ``q [n, H, D]`` over the pool's ``keys,
        values [slots, KVH, D]`` at ``slots [L]``, into ``out [n, H, D]``: ``positions`` are
        those of the first key and the first query (the keys end with the chunk's last query),
        causal, each query seeing its last ``window`` positions (None: all). What
        ``attention.grouped`` computes with the chunk's mask, in an order of additions that
        depends on each query's own row alone (kernels/prefill_attention.h). False, ``out``
        untouched, where the kernel does not run (bfloat16 without AVX512-BF16, another dtype
        or layout). Float32 sums without rounding between the steps, as ``grouped`` does.
        A float16 pool under float32 queries reads as its keys and values converted."""
        fn = self._attention_fn("prefill_attention", q, keys)
        n, h, d = q.shape
        kv = keys.shape[1] if keys.dim() == 3 else 0
        key_pos, query_pos = positions
        if (
            fn is None
            or q.device.type != "cpu"
            or not (keys.dtype == values.dtype and out.dtype == q.dtype)
            or not (keys.is_contiguous() and values.is_contiguous() and slots.is_contiguous())
            or kv == 0
            or keys.shape != values.shape
            or keys.shape[2] != d
            or d % 16
            or h % kv
            or h // kv > 32
            or q.stride(2) != 1
            or q.stride(1) != d
            or out.shape != q.shape
            or out.stride(2) != 1
            or out.stride(1) != d
            or slots.dtype != torch.long
            or slots.dim() != 1
            or not 0 <= key_pos <= query_pos
            or key_pos + slots.shape[0] != query_pos + n
        ):
            return False
        fn(
            q.data_ptr(),
            q.stride(0),
            n,
            h,
            kv,
            d,
            keys.data_ptr(),
            values.data_ptr(),
            slots.data_ptr(),
            slots.shape[0],
            key_pos,
            query_pos,
            window or 0,
            scale,
            out.data_ptr(),
            out.stride(0),
        )
        return True

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool
    ) -> torch.Tensor | None:
        """``layers.OffsetRMSNorm`` (``offset``: ``weight`` is ``1 + w`` in float32) or
        ``layers.RMSNorm`` (``weight`` in ``x``'s dtype) of ``x [..., n]``; None when not
        this kernel's."""
        fn = self._fns.get(("rms_norm", x.dtype))
        n = x.shape[-1]
        if fn is None or not _fits(x, weight, offset) or weight.dim() != 1 or x.stride(-1) != 1:
            return None
        flat = x if x.dim() == 2 else x.reshape(-1, n)
        if flat.dim() != 2 or flat.stride(1) != 1:
            return None
        out = torch.empty(x.shape, dtype=x.dtype)
        fn(
            flat.data_ptr(),
            flat.stride(0),
            flat.shape[0],
            n,
            weight.data_ptr(),
            eps,
            _mode(offset),
            out.data_ptr(),
        )
        return out

    def residual_norm(
        self,
        x: torch.Tensor,
        a: torch.Tensor,
        pre: tuple[torch.Tensor, float] | None,
        post: tuple[torch.Tensor, float],
        offset: bool,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``x + pre(a)`` (``x + a`` without ``pre``) and ``post`` of that, each norm given as
        ``(weight, eps)`` as ``rms_norm`` takes them; None when not this kernel's."""
        fn = self._fns.get(("residual_norm", x.dtype))
        weights = [post[0]] if pre is None else [pre[0], post[0]]
        if (
            fn is None
            or a.dtype != x.dtype
            or a.shape != x.shape
            or not (x.is_contiguous() and a.is_contiguous())
            or not all(_fits(x, w, offset) and w.dim() == 1 for w in weights)
        ):
            return None
        n = x.shape[-1]
        x_out = torch.empty(x.shape, dtype=x.dtype)
        h_out = torch.empty(x.shape, dtype=x.dtype)
        fn(
            x.data_ptr(),
            a.data_ptr(),
            x.numel() // n,
            n,
            None if pre is None else pre[0].data_ptr(),
            0.0 if pre is None else pre[1],
            post[0].data_ptr(),
            post[1],
            _mode(offset),
            x_out.data_ptr(),
            h_out.data_ptr(),
        )
        return x_out, h_out

    def qk_norm_rope(
        self,
        qk: torch.Tensor,
        norm: tuple[torch.Tensor, float] | None,
        offset: bool,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """``layers.HeadNorm`` (``norm``: its ``(table, eps)``) then ``layers.apply_rope`` on
        ``qk [T, heads, D]``, either one optional; None when not this kernel's."""
        fn = self._fns.get(("qk_norm_rope", qk.dtype))
        t, heads, d = qk.shape
        if (
            fn is None
            or qk.stride(2) != 1
            or qk.stride(1) != d
            or (norm is not None and not _fits(qk, norm[0], offset))
            or (norm is not None and norm[0].shape != (heads, d))
        ):
            return None
        if rope is not None:
            cos, sin = rope
            if not (
                cos.dtype == sin.dtype == qk.dtype
                and cos.is_contiguous()
                and sin.is_contiguous()
                and cos.numel() == sin.numel() == t * d
            ):
                return None
        out = torch.empty((t, heads, d), dtype=qk.dtype)
        fn(
            qk.data_ptr(),
            qk.stride(0),
            t,
            heads,
            d,
            None if norm is None else norm[0].data_ptr(),
            0.0 if norm is None else norm[1],
            -1 if norm is None else _mode(offset),
            None if rope is None else rope[0].data_ptr(),
            None if rope is None else rope[1].data_ptr(),
            out.data_ptr(),
        )
        return out

    def gated_act(self, gate_up: torch.Tensor, act: int) -> torch.Tensor | None:
        """``act(gate) * up`` for ``gate_up [..., 2I]`` (gate then up), rounded as PyTorch
        rounds each; ``act``: ``layers.kernel_act``'s code. None when not this kernel's."""
        fn = self._fns.get(("gated_act", gate_up.dtype))
        if fn is None or gate_up.device.type != "cpu" or not gate_up.is_contiguous():
            return None
        i = gate_up.shape[-1] // 2
        out = torch.empty((*gate_up.shape[:-1], i), dtype=gate_up.dtype)
        fn(gate_up.data_ptr(), gate_up.numel() // (2 * i), i, act, out.data_ptr())
        return out

    def scale_mask_softmax(
        self, scores: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> torch.Tensor | None:
        """``softmax(scores.float() * scale + mask).to(scores.dtype)`` over the last dim of
        ``scores [..., Lq, W]``, ``mask`` an additive float32 ``[Lq, W]`` (or broadcastable
        to it from the front); None when not this kernel's."""
        fn = self._fns.get(("scale_mask_softmax", scores.dtype))
        if fn is None or scores.device.type != "cpu" or not scores.is_contiguous():
            return None
        w = scores.shape[-1]
        mask_rows = 1
        if mask is not None:
            if mask.dtype != torch.float32 or mask.shape[-1] != w:
                return None
            if any(n != 1 for n in mask.shape[:-2]):  # one mask for every head and batch row
                return None
            mask = mask.reshape(-1, w)
            mask_rows = mask.shape[0]
            if not mask.is_contiguous() or mask_rows not in (1, scores.shape[-2]):
                return None
        out = torch.empty_like(scores)
        rows = scores.numel() // w
        fn(scores.data_ptr(), rows, w, _ptr(mask), mask_rows, scale, out.data_ptr())
        return out

    def int4_logits(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        scale_low: torch.Tensor,
        block_max: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Approximate ``x W^T`` as float32 ``[rows, N]`` (N: ``packed``'s output rows, a
        multiple of 16) from ``int4.pack_int4_native``'s copy of W; None where it does not run
        (no AVX2 or AVX-512, another dtype or device). ``block_max``: a float32 ``[rows, N /
        INT4_TOP_BLOCK]`` to fill with each row's largest score of each block of
        ``INT4_TOP_BLOCK`` columns (N must be a multiple of it), found as the scores are made."""
        fn = self._fns.get(("int4_logits", x.dtype))
        blocks, groups = packed.shape[0], packed.shape[1]
        if (
            fn is None
            or x.device.type != "cpu"
            or x.dim() != 2
            or x.shape[1] != groups * INT4_GROUP
            or packed.dtype != torch.uint8
            or scale_low.dtype != torch.bfloat16
            or not (packed.is_contiguous() and scale_low.is_contiguous())
        ):
            return None
        n = blocks * 16
        if block_max is not None and (
            n % INT4_TOP_BLOCK
            or block_max.shape != (x.shape[0], n // INT4_TOP_BLOCK)
            or block_max.dtype != torch.float32
            or not block_max.is_contiguous()
        ):
            raise ValueError("block_max must be float32 [rows, N / INT4_TOP_BLOCK]")
        x = x.contiguous()
        out = torch.empty((x.shape[0], n), dtype=torch.float32)
        fn(
            x.data_ptr(),
            x.shape[0],
            x.shape[1],
            packed.data_ptr(),
            scale_low.data_ptr(),
            n,
            out.data_ptr(),
            None if block_max is None else block_max.data_ptr(),
        )
        return out

    def argmax(self, logits: torch.Tensor) -> list[int] | None:
        """``torch.argmax(logits, dim=-1).tolist()`` for float32 ``logits [R, W]`` (the first
        index on ties), several times sooner over a 262k vocabulary; None for other tensors or
        where a row holds a NaN (PyTorch's own answer then, which ranks NaN highest)."""
        if (
            logits.dtype != torch.float32
            or logits.dim() != 2
            or logits.device.type != "cpu"
            or not logits.is_contiguous()
        ):
            return None
        out = torch.empty(logits.shape[0], dtype=torch.long)
        self._argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
        found: list[int] = out.tolist()
        return None if -1 in found else found

    def sample(
        self,
        logits: torch.Tensor,
        temperatures: list[float],
        uniforms: list[float],
        top_ps: list[float] | None = None,
        floors: list[float] | None = None,
    ) -> list[int] | None:
        """One token per row of float32 ``logits [R, W]`` drawn from ``softmax(logits /
        temperature)`` at the uniform draw in ``[0, 1)`` given for the row, as
        ``sampling.draw`` draws it (the first index whose cumulative probability passes the
        draw), in one pass over the row; None for other tensors or where a row has a NaN or
        nothing finite (PyTorch's own answer then). ``top_ps``: each row's nucleus, as
        ``sampling.apply_top_p`` cuts it (1: none); ``floors``: each row's least logit kept
        (top-k's threshold; ``-inf``: none)."""
        rows = logits.shape[0] if logits.dim() == 2 else 0
        if (
            rows == 0
            or logits.dtype != torch.float32
            or logits.device.type != "cpu"
            or not logits.is_contiguous()
            or len(temperatures) != rows
            or len(uniforms) != rows
            or any(t <= 0.0 for t in temperatures)
            or (top_ps is not None and len(top_ps) != rows)
            or (floors is not None and len(floors) != rows)
        ):
            return None
        inv = torch.tensor([1.0 / t for t in temperatures], dtype=torch.float32)
        draws = torch.tensor(uniforms, dtype=torch.float64)
        nuclei = None if top_ps is None else torch.tensor(top_ps, dtype=torch.float32)
        least = None if floors is None else torch.tensor(floors, dtype=torch.float32)
        out = torch.empty(rows, dtype=torch.long)
        self._sample_rows(
            logits.data_ptr(),
            rows,
            logits.shape[1],
            inv.data_ptr(),
            _ptr(nuclei),
            _ptr(least),
            draws.data_ptr(),
            out.data_ptr(),
        )
        found: list[int] = out.tolist()
        return None if -1 in found else found

    def argmax_blocks(
        self, logits: torch.Tensor, block_max: torch.Tensor, touched: torch.Tensor
    ) -> list[int]:
        """``argmax`` of float32 ``logits [R, W]`` whose maxima over blocks of ``W /
        block_max.shape[1]`` columns are ``block_max`` except in the blocks of the columns
        ``touched [R, k]`` (written after the maxima were taken), which are searched: a row
        reads its block maxima and k blocks. Rows it cannot answer (a NaN) it leaves to
        ``argmax`` and PyTorch."""
        rows, w = logits.shape
        if (
            logits.dtype != torch.float32
            or not logits.is_contiguous()
            or block_max.shape[0] != rows
            or w % block_max.shape[1]
            or block_max.dtype != torch.float32
            or not block_max.is_contiguous()
            or touched.dtype != torch.long
            or touched.shape[0] != rows
        ):
            raise ValueError("argmax_blocks: float32 logits [R, W], block_max [R, W / block]")
        touched = touched.contiguous()
        out = torch.empty(rows, dtype=torch.long)
        self._argmax_blocks(
            logits.data_ptr(),
            rows,
            w,
            block_max.data_ptr(),
            w // block_max.shape[1],
            touched.data_ptr(),
            touched.shape[1],
            out.data_ptr(),
        )
        return self._argmax_rest(logits, out)

    def _argmax_rest(self, logits: torch.Tensor, out: torch.Tensor) -> list[int]:
        """``out``'s argmaxes as a list, the rows a kernel left (-1: a NaN) by ``argmax``."""
        found: list[int] = out.tolist()
        for r, at in enumerate(found):
            if at < 0:
                whole = self.argmax(logits[r : r + 1])
                found[r] = int(torch.argmax(logits[r])) if whole is None else whole[0]
        return found

    def decode_plan(
        self, tables: torch.Tensor, starts: torch.Tensor, block_tokens: int, window: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decode rows' keys for one window (``window`` 0: all), as
        ``attention.PagedAttention._decode_keys`` reads them: slots ``[B, width]`` (int64,
        the rows' positions through their block tables ``tables [B, N]``, packed from the
        left; slot 0 past a row's end), and which are real: ``valid [B, width]`` (bool) and
        the same as an additive float32 mask (0 / -inf). One call where PyTorch took ~15
        small operations a window."""
        rows, n = tables.shape
        if tables.dtype != torch.long or starts.dtype != torch.long or starts.shape != (rows,):
            raise ValueError("decode_plan: int64 tables [B, N] and starts [B]")
        tables, starts = tables.contiguous(), starts.contiguous()
        slots = torch.empty(rows, width, dtype=torch.long)
        valid = torch.empty(rows, width, dtype=torch.bool)
        additive = torch.empty(rows, width, dtype=torch.float32)
        self._decode_plan(
            tables.data_ptr(),
            rows,
            n,
            starts.data_ptr(),
            block_tokens,
            window,
            width,
            slots.data_ptr(),
            valid.data_ptr(),
            additive.data_ptr(),
        )
        return slots, valid, additive

    def prefill_plan(
        self,
        blocks: torch.Tensor,
        block_tokens: int,
        lo: int,
        start: int,
        end: int,
        window: int,
        *,
        mask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A prefill chunk's keys for one window (``window`` 0: all), as
        ``attention.PagedAttention._prefill_keys`` reads them: the slots of positions ``lo ..
        end - 1`` through the block table ``blocks`` (int64), and with ``mask`` which of them
        each query ``start .. end - 1`` sees (bool ``[end - start, end - lo]``)."""
        if blocks.dtype != torch.long or blocks.dim() != 1 or blocks.numel() * block_tokens < end:
            raise ValueError("prefill_plan: an int64 block table covering the chunk")
        blocks = blocks.contiguous()
        slots = torch.empty(end - lo, dtype=torch.long)
        allowed = torch.empty(end - start, end - lo, dtype=torch.bool) if mask else None
        self._prefill_plan(
            blocks.data_ptr(),
            block_tokens,
            lo,
            start,
            end,
            window,
            slots.data_ptr(),
            _ptr(allowed),
        )
        return slots, allowed

    def int4_rescore(
        self,
        scores: torch.Tensor,
        block_max: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        k: int,
    ) -> list[int] | None:
        """``RescoredHead.scores_and_greedy`` after ``int4_logits``: the ``k`` columns of each
        row's highest approximate ``scores [R, V]`` (float32, found through ``block_max``, as
        ``int4.top_indices`` finds them) rescored exactly, in place, with the dense ``weight
        [V, K]`` against the row of ``x [R, K]`` (both bfloat16: products summed in float32,
        rounded to bfloat16; or both float32), and each row's argmax (the first on ties); None
        where it does not run (another dtype, bfloat16 without AVX512-BF16)."""
        rows, v = scores.shape
        fn = self._rescore_fns.get(x.dtype)
        if (
            fn is None
            or weight.dtype != x.dtype
            or scores.dtype != torch.float32
            or block_max.dtype != torch.float32
            or not (scores.is_contiguous() and block_max.is_contiguous())
            or not weight.is_contiguous()
            or x.shape[0] != rows
            or weight.shape != (v, x.shape[1])
            or x.shape[1] % (32 if x.dtype == torch.bfloat16 else 16)
            or block_max.shape[0] != rows
            or v % block_max.shape[1]
        ):
            return None
        x = x.contiguous()
        out = torch.empty(rows, dtype=torch.long)
        fn(
            scores.data_ptr(),
            rows,
            v,
            block_max.data_ptr(),
            v // block_max.shape[1],
            x.data_ptr(),
            x.shape[1],
            weight.data_ptr(),
            k,
            out.data_ptr(),
        )
        return self._argmax_rest(scores, out)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _mode(offset: bool) -> int:
    """kernels/elementwise.h's NormMode."""
    return 0 if offset else 1


def _fits(x: torch.Tensor, weight: torch.Tensor, offset: bool) -> bool:
    """Whether ``weight`` is a norm weight the kernels read for ``x``: contiguous, as long as
    ``x``'s rows (or a table of such rows), float32 for an offset norm, else ``x``'s dtype."""
    return (
        x.device.type == "cpu"
        and weight.is_contiguous()
        and weight.dtype == (torch.float32 if offset else x.dtype)
        and weight.shape[-1] == x.shape[-1]
    )


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run PyTorch's code instead of the kernels inside (side-by-side benchmarks, tests);
    affects every thread."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def kernels() -> Kernels | None:
    """The kernels, built and loaded on first use; None where they are not used (see the
    module's docstring, and ``disabled``). A failed build is logged once and not retried."""
    global _loaded, _tried
    if _disabled:
        return None
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            _loaded = _load()
            _tried = True
    return _loaded


def _load() -> Kernels | None:
    if os.environ.get("PROMPTCACHE_NATIVE", "").lower() in ("0", "off", "false", "no"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler: the engine's CPU kernels are not built")
        return None
    try:
        library = ctypes.CDLL(str(build(compiler, directory())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("the engine's CPU kernels could not be built, using PyTorch's: %s", exc)
        return None
    if not library.pc_vectorized():
        log.info("neither AVX-512 nor AVX2 here: the engine's CPU kernels are not used")
        return None
    runtimes = _openmp_runtimes()
    if len(runtimes) > 1:
        # Two thread teams on the same cores: every kernel of one waits for the other's
        # spinning workers (engine/threads.py measured 1.5x slower steps from that).
        log.warning("two OpenMP runtimes are loaded (%s): steps may be slower", ", ".join(runtimes))
    return Kernels(library)


def _openmp_runtimes() -> list[str]:
    """The GNU OpenMP libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line}
    return sorted(paths)


__all__ = [
    "FLAGS",
    "INT4_GROUP",
    "INT4_TOP_BLOCK",
    "SOURCE",
    "Kernels",
    "build",
    "directory",
    "disabled",
    "kernels",
    "use_directory",
]
