// Matrix products: a prompt chunk's over bfloat16 weights as oneDNN sums them (gemm_bf16),
// decode rows' over int8 weights (gemv_int8, gemv_int8_dpbf16, gemv_int8_vnni, project).

#pragma once

#include "common.h"

namespace {

#if PC_DPBF16
// y [M, N] = x [M, K] W^T in bfloat16, W laid out as native_prefill.pair_dense lays it out
// ([N / 32][K / 2][32][2]: 32 outputs side by side, two inputs each), each output summed as
// oneDNN's packed bfloat16 matmul sums it: the inputs cut into blocks of `block` pairs, each
// block summed from 0 by vdpbf16ps (pairs in order), the blocks added in order, one rounding.
// So a prompt row computed here is the same bits as through PyTorch (native_prefill checks the
// block against oneDNN for every weight before it uses one).
template <int R>
inline void gemm_tile(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w, int64_t block,
                      uint16_t* y, int64_t ldy, const char* ahead, int64_t ahead_lines) {
  // 2R block sums live in registers; the running totals (2R more: too many for the 32
  // registers) in memory, written by the first block and added to after.
  alignas(64) float acc[2 * R][16];
  for (int64_t k0 = 0; k0 < K / 2; k0 += block) {
    __m512 t[2 * R];
#pragma GCC unroll 32
    for (int i = 0; i < 2 * R; ++i) t[i] = _mm512_setzero_ps();
    const int64_t k1 = std::min(K / 2, k0 + block);
    for (int64_t p = k0; p < k1; ++p) {
      if (p < ahead_lines) _mm_prefetch(ahead + p * 64, _MM_HINT_T0);
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 64);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 64 + 32);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * ldx + 2 * p, sizeof pair);
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        t[2 * r] = _mm512_dpbf16_ps(t[2 * r], xb, w0);
        t[2 * r + 1] = _mm512_dpbf16_ps(t[2 * r + 1], xb, w1);
      }
    }
#pragma GCC unroll 32
    for (int i = 0; i < 2 * R; ++i)
      _mm512_store_ps(acc[i], k0 == 0 ? t[i] : _mm512_add_ps(_mm512_load_ps(acc[i]), t[i]));
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    BF16::store16(y + r * ldy, _mm512_load_ps(acc[2 * r]));
    BF16::store16(y + r * ldy + 16, _mm512_load_ps(acc[2 * r + 1]));
  }
}

// W [N, K] (bfloat16 pairs as 32-bit words, K2 = K / 2 of them a row) laid out as gemm_bf16
// reads it: [N / 32][K2][32] words, 32 outputs side by side (a start copies ~200 MB of Gemma 3
// 270M's layers this way: ~0.4 s as a PyTorch transpose, a few tens of ms here).
void pair_dense(const uint32_t* w, int64_t N, int64_t K2, uint32_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < N / 32; ++b) {
    // 16 pairs of each of the block's 32 rows at a time (one cache line each) through a small
    // buffer, written out in order: rows a power of two apart would otherwise evict each
    // other from the cache at every word.
    const uint32_t* rows = w + b * 32 * K2;
    uint32_t* o = out + b * K2 * 32;
    uint32_t tile[32][16];
    for (int64_t p0 = 0; p0 < K2; p0 += 16) {
      const int64_t m = std::min<int64_t>(16, K2 - p0);
      for (int64_t j = 0; j < 32; ++j) std::memcpy(tile[j], rows + j * K2 + p0, sizeof(uint32_t) * m);
      for (int64_t p = 0; p < m; ++p)
        for (int64_t j = 0; j < 32; ++j) o[(p0 + p) * 32 + j] = tile[j][p];
    }
  }
}

// N a multiple of 32, K even; the threads take blocks of 32 outputs, and each block's rows go
// in tiles of as even a size as fits (64 rows: 11, 11, 11, 11, 10, 10 rather than five of 12
// and one of 4, which reads the weights as often for a third of the work).
void gemm_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w, int64_t N,
               int64_t block, uint16_t* y, int64_t ldy) {
  constexpr int64_t TILE = 12;
  const int64_t tiles = (M + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_WORK)
  for (int64_t b = 0; b < N / 32; ++b) {
    const uint16_t* wb = w + b * 32 * K;
    // The next block's weights (K lines) on their way, a share of them during each tile: the
    // first tile of a block otherwise reads it from memory faster than memory gives it (~12%
    // of a 64-row product waited on it).
    const char* next = b + 1 < N / 32 ? reinterpret_cast<const char*>(wb + 32 * K) : nullptr;
    int64_t m = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t rows = M / tiles + (t < M % tiles ? 1 : 0);
      const uint16_t* xr = x + m * ldx;
      uint16_t* yr = y + m * ldy + b * 32;
      const int64_t lo = t * K / tiles, hi = (t + 1) * K / tiles;
      const char* ahead = next ? next + lo * 64 : nullptr;
      const int64_t lines = next ? hi - lo : 0;
      switch (rows) {
#define PC_CASE(n)                                                  \
  case n:                                                           \
    gemm_tile<n>(xr, ldx, K, wb, block, yr, ldy, ahead, lines);     \
    break;
        PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6) PC_CASE(7) PC_CASE(8)
        PC_CASE(9) PC_CASE(10) PC_CASE(11) PC_CASE(12)
#undef PC_CASE
        default:
          break;
      }
      m += rows;
    }
  }
}
#endif

// y [B, N] = x [B, K] W^T for int8 W [N, K] with one scale per output row (the storage
// type), and an optional bias: y = T(T(sum_k x w * s) + b), as models.int8.Int8Linear rounds
// (the product rounded once, then the bias added). xf: x converted to float32, [B, K].
template <class S>
void gemv_int8(const float* xf, int64_t B, int64_t K, const int8_t* w,
               const typename S::T* scales, const typename S::T* bias, int64_t N,
               typename S::T* y) {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WORK)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* wr = w + n * K;
    const float s = S::load(scales[n]);
    for (int64_t b0 = 0; b0 < B; b0 += 4) {
      const int64_t bn = B - b0 < 4 ? B - b0 : 4;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t k = 0;
#if PC_VEC16
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
      for (; k + 16 <= K; k += 16) {
        const __m512 wv = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k))));
        for (int64_t b = 0; b < bn; ++b)
          a[b] = _mm512_fmadd_ps(_mm512_loadu_ps(xf + (b0 + b) * K + k), wv, a[b]);
      }
      for (int64_t b = 0; b < bn; ++b) acc[b] = _mm512_reduce_add_ps(a[b]);
#endif
      for (; k < K; ++k)
        for (int64_t b = 0; b < bn; ++b) acc[b] += xf[(b0 + b) * K + k] * wr[k];
      for (int64_t b = 0; b < bn; ++b) {
        float v = S::round(acc[b] * s);
        if (bias) v = S::round(v + S::load(bias[n]));
        y[(b0 + b) * N + n] = S::store(v);
      }
    }
  }
}

#if PC_DPBF16
// gemv_int8 for bfloat16 activations x [B, K] as stored, on CPUs with AVX512-BF16: 32 int8
// weights become bfloat16 exactly (|q| <= 128 has 8 significant bits), and each row's products
// accumulate pairwise in float32 (vdpbf16ps: a product of two bfloat16 is exact in float32),
// half the instructions of the float32 path; K a multiple of 32.
void gemv_int8_dpbf16(const uint16_t* x, int64_t B, int64_t K, const int8_t* w,
                      const uint16_t* scales, const uint16_t* bias, int64_t N, uint16_t* y) {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WORK)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* wr = w + n * K;
    const float s = bf16_to_float(scales[n]);
    for (int64_t b0 = 0; b0 < B; b0 += 8) {
      const int64_t bn = B - b0 < 8 ? B - b0 : 8;
      __m512 a[8];
      for (int64_t b = 0; b < bn; ++b) a[b] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
        const __m512 hi =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
        const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);
        for (int64_t b = 0; b < bn; ++b) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (b0 + b) * K + k);
          a[b] = _mm512_dpbf16_ps(a[b], xv, wv);
        }
      }
      for (int64_t b = 0; b < bn; ++b) {
        float v = round_bf16(_mm512_reduce_add_ps(a[b]) * s);
        if (bias) v = round_bf16(v + bf16_to_float(bias[n]));
        y[(b0 + b) * N + n] = float_to_bf16(v);
      }
    }
  }
}

#endif  // PC_DPBF16

#if PC_INT8_ROWS
// Decode rows' products in integers (gemv_int8_vnni), as llama.cpp multiplies its quantized
// weights: each bfloat16 row is quantized per group of VNNI_GROUP inputs to int8 (a ~= x /
// alpha, alpha = the group's largest |x| / 127: an output of random rows moves by ~0.6% rms,
// and the model predicts as well as with bfloat16 rows, docs/benchmarks.md), and vpdpbusd
// sums 64 byte products an instruction in 32-bit integers, exactly: half the instructions of
// bfloat16 pairs, with no conversion of the weights (8 rows of Gemma 3 270M's layers: 5.3 ->
// 2.8 ms from the caches, ~5.8 -> ~3.8 ms from memory). An output adds its groups' exact
// integer sums times alpha in group order, then times its weight's scale: a row's outputs
// depend on that row alone. On AVX2 (float32 rows, where float32 is the default) the same
// integer sums come from vpmaddubsw (vnni_block's AVX2 form): the same outputs, bit for bit.
constexpr int64_t VNNI_GROUP = 64;
// The weights stream from memory once a step and are read once; asked for this far ahead into
// the L2 cache, whose miss buffers outnumber the L1's (into the L1, as the other kernels do,
// 8 rows took ~1.6x as long from memory as from the caches: the loads stalled before the
// products could overlap them).
constexpr int64_t VNNI_PREFETCH_AHEAD = 8192;

// Rows a block of vnni_block takes at once.
constexpr int64_t VNNI_ROWS = 8;

// Row b's groups of x [B, K] (K a multiple of VNNI_GROUP) as int8 a [B * K], their alphas [B,
// K / VNNI_GROUP] and 128 times their sums (the weights are stored plus 128: see vnni_block).
// a holds each block of VNNI_ROWS rows (fewer in the last) at a + b0 * K, its rows' inputs
// four by four in turn: row b's inputs 4 c .. 4 c + 3 at (c * rows + b) * 4, so a block's
// four-input words for one step lie together and vnni_block reads them from one pointer
// (8 rows' own pointers took more of AVX2's registers than it has, and spilled).
// sum32 (gemv_codes'): or null, each row's sums per block of 32 inputs, per block of VNNI_ROWS
// rows [K / 32][rows] from sum32 + b0 K / 32.
// ldx: x's row stride (0: K). A prompt's many rows are shared by the threads, a block of
// VNNI_ROWS at a time.
template <class S>
void quantize_rows(const typename S::T* x, int64_t B, int64_t K, int8_t* a, float* alpha,
                   int32_t* bias128, int32_t* sum32 = nullptr, int64_t ldx = 0) {
  const int64_t G = K / VNNI_GROUP;
  if (ldx == 0) ldx = K;
#pragma omp parallel for schedule(static) if (B > 2 * VNNI_ROWS && B * K >= PARALLEL_MIN_WORK)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t b0 = b / VNNI_ROWS * VNNI_ROWS, rows = std::min(VNNI_ROWS, B - b0);
    int8_t* block = a + b0 * K;
    for (int64_t g = 0; g < G; ++g) {
      const typename S::T* xg = x + b * ldx + g * VNNI_GROUP;
      constexpr int V = VNNI_GROUP / 16;
      __m512 v[V];
      __m512 big = _mm512_setzero_ps();
      for (int i = 0; i < V; ++i) {
        v[i] = S::load16(xg + 16 * i);
        big = _mm512_max_ps(big, _mm512_abs_ps(v[i]));
      }
      const float top = _mm512_reduce_max_ps(big);
      const __m512 inv = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      __m512i sum = _mm512_setzero_si512(), half = sum;
      for (int i = 0; i < V; ++i) {
        // Rounded to nearest even (the default rounding mode); |x| * 127 / top <= 127.
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
        sum = _mm512_add_epi32(sum, q);
        if (sum32) {
          half = i % 2 == 0 ? q : _mm512_add_epi32(half, q);
          if (i % 2 == 1) {  // a block of 32 inputs ends here
            const int64_t t = (g * VNNI_GROUP + 16 * i) / 32;
            sum32[b0 * (K / 32) + t * rows + b - b0] = _mm512_reduce_add_epi32(half);
          }
        }
        alignas(16) int8_t bytes[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(bytes), _mm512_cvtsepi32_epi8(q));
        for (int m = 0; m < 4; ++m) {
          const int64_t c = (g * VNNI_GROUP + 16 * i) / 4 + m;
          std::memcpy(block + (c * rows + b - b0) * 4, bytes + 4 * m, 4);
        }
      }
      alpha[b * G + g] = top / 127.0f;
      bias128[b * G + g] = 128 * _mm512_reduce_add_epi32(sum);
    }
  }
}

// The 16 outputs n0.. of BN rows from their float sums f: times the scale, rounded to the
// storage type, then the bias added and rounded (models.int8.Int8Linear's roundings).
template <class S, int BN>
inline void vnni_store(const __m512* f, const typename S::T* scales, const typename S::T* bias,
                       int64_t n0, int64_t N, typename S::T* y) {
  const __m512 s = S::load16(scales + n0);
  for (int b = 0; b < BN; ++b) {
    __m512 v = S::round16(_mm512_mul_ps(f[b], s));
    if (bias) v = S::round16(_mm512_add_ps(v, S::load16(bias + n0)));
    S::store16(y + b * N + n0, v);
  }
}

#if PC_VNNI
// 16 output rows n0 .. n0 + 15 of gemv_int8_vnni for BN (compile-time) activation rows. p: the
// block's [K / 4][16][4] weight bytes, q + 128 (vpdpbusd multiplies unsigned bytes by signed
// ones): sum(a (q + 128)) - 128 sum(a) = sum(a q), exactly.
template <class S, int BN>
inline void vnni_block(const int8_t* a, const float* alpha, const int32_t* bias128, int64_t K,
                       const uint8_t* p, const typename S::T* scales, const typename S::T* bias,
                       int64_t n0, int64_t N, typename S::T* y) {
  const int64_t G = K / VNNI_GROUP;
  __m512 f[BN];
  for (int b = 0; b < BN; ++b) f[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* pg = p + g * VNNI_GROUP * 16;
    __m512i d[BN];
    for (int b = 0; b < BN; ++b) d[b] = _mm512_set1_epi32(-bias128[b * G + g]);
#pragma GCC unroll 16
    for (int j = 0; j < VNNI_GROUP / 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + VNNI_PREFETCH_AHEAD), _MM_HINT_T1);
      const __m512i w = _mm512_loadu_si512(pg + j * 64);
      for (int b = 0; b < BN; ++b) {
        int32_t four;
        std::memcpy(&four, a + ((g * VNNI_GROUP / 4 + j) * BN + b) * 4, sizeof four);
        d[b] = _mm512_dpbusd_epi32(d[b], w, _mm512_set1_epi32(four));
      }
    }
    // |sum(a q)| <= 64 * 127 * 127 < 2^24: exact as a float.
    for (int b = 0; b < BN; ++b)
      f[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[b]), _mm512_set1_ps(alpha[b * G + g]), f[b]);
  }
  vnni_store<S, BN>(f, scales, bias, n0, N, y);
}
#else
// vnni_block on AVX2: the same integer sums and the same float operations per lane. The
// weights go back to q (q + 128 xor 128) and vpmaddubsw multiplies |q| by a with q's sign
// (vpsignb), adding pairs in 16 bits, which cannot saturate: |q|, |a| <= 127 (both symmetric),
// so a pair is at most 2 * 127 * 127 < 32768; vpmaddwd adds the pairs in 32 bits: sum(a q)
// exactly, as vpdpbusd's sum(a (q + 128)) - 128 sum(a). Each 8-output half of a group in turn:
// AVX2's 16 registers hold one half's accumulators for 8 rows (both halves at once spilled
// them on every product).
template <class S, int BN>
inline void vnni_block(const int8_t* a, const float* alpha, const int32_t*, int64_t K,
                       const uint8_t* p, const typename S::T* scales, const typename S::T* bias,
                       int64_t n0, int64_t N, typename S::T* y) {
  const int64_t G = K / VNNI_GROUP;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(64) float acc[BN][16] = {};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* pg = p + g * VNNI_GROUP * 16;
    const int8_t* ag = a + g * VNNI_GROUP * BN;  // the group's four-input words, row by row
    for (int h = 0; h < 2; ++h) {
      // Each word read as ag plus a constant: left to itself GCC kept a pointer per word and
      // step (128 for 8 rows) on the stack, and loaded one before each word.
      asm("" : "+r"(ag));
      __m256i d[BN];
      for (int b = 0; b < BN; ++b) d[b] = _mm256_setzero_si256();
#pragma GCC unroll 16
      for (int j = 0; j < VNNI_GROUP / 4; ++j) {
        if (h == 0)
          _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + VNNI_PREFETCH_AHEAD),
                       _MM_HINT_T1);
        const __m256i q = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + j * 64 + h * 32)), flip);
        const __m256i u = _mm256_abs_epi8(q);
        for (int b = 0; b < BN; ++b) {
          // Four inputs to every lane straight from memory (a load, no shuffle).
          const __m256i four = _mm256_castps_si256(_mm256_broadcast_ss(
              reinterpret_cast<const float*>(ag + (j * BN + b) * 4)));
          const __m256i s = _mm256_sign_epi8(four, q);
          d[b] = _mm256_add_epi32(d[b], _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
        }
      }
      for (int b = 0; b < BN; ++b) {
        float* f = acc[b] + 8 * h;
        _mm256_store_ps(f, _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[b]),
                                           _mm256_set1_ps(alpha[b * G + g]), _mm256_load_ps(f)));
      }
    }
  }
  __m512 f[BN];
  for (int b = 0; b < BN; ++b) f[b] = _mm512_load_ps(acc[b]);
  vnni_store<S, BN>(f, scales, bias, n0, N, y);
}
#endif

// The N / 16 blocks of 16 output rows of a decode product of bn rows, block(nb) each, shared by
// the threads.
template <class F>
inline void share_row_blocks(int64_t bn, int64_t N, int64_t K, const F& block) {
  // 5-8 rows: the threads share the blocks as they go, so one that a neighbour slows does
  // not leave the other waiting (8 streams of Gemma 3 270M on a 2-core Zen 3, in turns:
  // +5-9% tokens/s over static halves; fewer rows measured no faster). Guided, not 4
  // blocks at a time: a thread's first chunks are long runs of the weights, which its
  // prefetches (VNNI_PREFETCH_AHEAD) cover, where every 4-block chunk began with 8 KB not
  // asked for. The products of a step of 8 rows, weights from memory, in turns: Zen 4
  // 4.14-4.19 -> 3.62-3.67 ms (memory-bound there), its AVX2 build 10.6 -> 9.7 ms, and
  // with a busy loop sharing one of the two cores 11.6-12.7 -> 8.5-8.7 ms. (Each thread
  // draining its own half, then taking 4 blocks at a time from the other's: no faster.)
  if (bn > 4) {
#pragma omp parallel for schedule(guided, 4) if (N * K >= PARALLEL_MIN_WORK)
    for (int64_t nb = 0; nb < N / 16; ++nb) block(nb);
  } else {
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WORK)
    for (int64_t nb = 0; nb < N / 16; ++nb) block(nb);
  }
}

// y [B, N] = x [B, K] (q * scales)^T (+ bias) for rows x of the storage type, over q laid out by
// native_decode.vnni_weight ([N / 16][K / 4][16][4] bytes, q + 128: 16 output rows side by
// side, four inputs each, so that four of a row's int8 inputs broadcast to every lane multiply
// 16 outputs' four weights at once and each lane sums its own output). scratch: B * K bytes
// and 8 B K / VNNI_GROUP more. N a multiple of 16, K of VNNI_GROUP.
template <class S>
void gemv_int8_vnni(const typename S::T* x, int64_t B, int64_t K, const uint8_t* p,
                    const typename S::T* scales, const typename S::T* bias, int64_t N,
                    typename S::T* y, void* scratch) {
  const int64_t G = K / VNNI_GROUP;
  int8_t* a = static_cast<int8_t*>(scratch);
  float* alpha = reinterpret_cast<float*>(a + ((B * K + 63) & ~int64_t{63}));
  int32_t* bias128 = reinterpret_cast<int32_t*>(alpha + B * G);
  quantize_rows<S>(x, B, K, a, alpha, bias128);
  for (int64_t b0 = 0; b0 < B; b0 += VNNI_ROWS) {
    const int64_t bn = std::min(VNNI_ROWS, B - b0);
    const int8_t* ab = a + b0 * K;
    const float* al = alpha + b0 * G;
    const int32_t* bb = bias128 + b0 * G;
    typename S::T* yb = y + b0 * N;
    const auto block = [&](int64_t nb) {
      with_rows(bn, [&](auto r) {
        vnni_block<S, decltype(r)::value>(ab, al, bb, K, p + nb * 16 * K, scales, bias, nb * 16,
                                          N, yb);
      });
    };
    share_row_blocks(bn, N, K, block);
  }
}

// A prompt chunk's product in gemv_int8_vnni's integers: y [M, N] (row stride ldy) = x [M, K]
// (row stride ldx) (q * scales)^T, each row the same bits as gemv_int8_vnni gives it (the same
// quantized groups, integer sums and float operations, in the same order), so a prompt's token
// is projected as a decode step projects it. The loops turned inside out for many rows: the
// threads share the blocks of 16 output rows, and each block (16 K bytes, in L1) meets every
// block of VNNI_ROWS activation rows in turn, where gemv_int8_vnni streams all of the weights
// once per 8 rows. scratch: M * K bytes and 8 M K / VNNI_GROUP more (64-byte aligned).
template <class S>
void gemm_int8_vnni(const typename S::T* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* p,
                    const typename S::T* scales, int64_t N, typename S::T* y, int64_t ldy,
                    void* scratch) {
  const int64_t G = K / VNNI_GROUP;
  int8_t* a = static_cast<int8_t*>(scratch);
  float* alpha = reinterpret_cast<float*>(a + ((M * K + 63) & ~int64_t{63}));
  int32_t* bias128 = reinterpret_cast<int32_t*>(alpha + M * G);
  quantize_rows<S>(x, M, K, a, alpha, bias128, nullptr, ldx);
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_WORK)
  for (int64_t nb = 0; nb < N / 16; ++nb) {
    const uint8_t* pb = p + nb * 16 * K;
    for (int64_t b0 = 0; b0 < M; b0 += VNNI_ROWS) {
      const int64_t bn = std::min(VNNI_ROWS, M - b0);
      with_rows(bn, [&](auto r) {
        // vnni_store's N is y's row stride.
        vnni_block<S, decltype(r)::value>(a + b0 * K, alpha + b0 * G, bias128 + b0 * G, K, pb,
                                          scales, nullptr, nb * 16, ldy, y + b0 * ldy);
      });
    }
  }
}
#endif  // PC_INT8_ROWS

template <class S>
void to_float(const typename S::T* x, int64_t n, float* out) {
  load_row<S>(x, n, out);
}

// y = x W^T (+ bias) through whichever gemv_int8 suits x's type; xf: scratch of [B, K] floats.
template <class S>
void project(const typename S::T* x, float* xf, int64_t B, int64_t K, const int8_t* w,
             const uint8_t* vnni, const void* scales, const void* bias, int64_t N,
             typename S::T* y) {
  using T = typename S::T;
#if PC_INT8_ROWS
  if (vnni && N % 16 == 0 && K % VNNI_GROUP == 0) {
    gemv_int8_vnni<S>(x, B, K, vnni, static_cast<const T*>(scales), static_cast<const T*>(bias),
                      N, y, xf);
    return;
  }
#endif
#if PC_DPBF16
  if constexpr (std::is_same_v<S, BF16>) {
    if (K % 32 == 0) {
      gemv_int8_dpbf16(x, B, K, w, static_cast<const uint16_t*>(scales),
                       static_cast<const uint16_t*>(bias), N, y);
      return;
    }
  }
#endif
  to_float<S>(x, B * K, xf);
  gemv_int8<S>(xf, B, K, w, static_cast<const T*>(scales), static_cast<const T*>(bias), N, y);
}

}  // namespace
