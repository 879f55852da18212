// The vocabulary projection's int4 scores (int4_logits) and the exact rescoring of their
// best candidates (int4_rescore), for models/int4.py's RescoredHead.

#pragma once

#include "common.h"
#include "sampling.h"

namespace {

#if PC_INT8_ROWS
#define PC_INT4_HEAD 1
// Scores of a vocabulary projection from 4-bit weights, for RescoredHead (models/int4.py) to
// pick the candidates it then scores exactly: logits [B, N] float32 ~= x [B, K] W^T.
//
// W is quantized per group of 64 inputs, w ~= q * scale + low with q in 0..15; x per row and
// group of 64 as int8, x ~= a * alpha (alpha = the group's largest |x| / 127). Then a group adds
// alpha * (scale * sum(a q) + low * sum(a)), sum(a q) in 32-bit integers by vpdpbusd (64
// products an instruction, unsigned q times signed a). Layouts (pack_int4_native):
//   packed [N / 16, K / 64, 8, 64] bytes: 16 output rows side by side; byte 4 o + i of step j
//     holds input 8 j + i of row o in its low nibble and input 8 j + 4 + i in its high one;
//   sl [N / 16, K / 64, 2, 16] bfloat16: the 16 rows' scales, then their lows;
//   a (x's int8) by blocks of 8 rows (fewer in the last) from a + b0 * K, the rows' inputs four
//     by four in turn: row b's inputs 4 c .. 4 c + 3 at (c * rows + b) * 4, so a step's words
//     of every row lie together (quantize_rows' layout; per-row pointers spilled on AVX2).
// Each row's scores depend on that row alone (the products are exact integers, the float sums
// go in group order), so a row scores alike in any batch. K a multiple of 64, N of 16.
#if PC_VNNI
template <int BN>
inline void int4_block(const int8_t* a, const float* alpha, const float* alpha_sum, int64_t K,
                       const uint8_t* pk, const uint16_t* sl, float* y, int64_t n0, int64_t N,
                       __m512* top) {
  const int64_t G = K / 64;
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  __m512 f[BN];
  for (int b = 0; b < BN; ++b) f[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* pg = pk + g * 512;
    const int8_t* ag = a + g * 64 * BN;  // the group's four-input words, row by row
    __m512i d[BN];
    for (int b = 0; b < BN; ++b) d[b] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      // One row streams the weights as fast as memory gives them: asked for into L2, further
      // on (a one-row engine step 7.51 -> 7.15 ms, 9.83 -> 8.18 after 4,160 tokens); with more
      // rows into L1 (into L2 was no faster at 8 rows).
      if constexpr (BN == 1)
        _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + 8192), _MM_HINT_T1);
      else
        _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + PREFETCH_AHEAD), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(pg + j * 64);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int b = 0; b < BN; ++b) {
        int32_t w0, w1;  // inputs 8 j .. 8 j + 3 and 8 j + 4 .. 8 j + 7
        std::memcpy(&w0, ag + ((2 * j) * BN + b) * 4, 4);
        std::memcpy(&w1, ag + ((2 * j + 1) * BN + b) * 4, 4);
        d[b] = _mm512_dpbusd_epi32(d[b], lo, _mm512_set1_epi32(w0));
        d[b] = _mm512_dpbusd_epi32(d[b], hi, _mm512_set1_epi32(w1));
      }
    }
    const __m512 scale = BF16::load16(sl + g * 32);
    const __m512 low = BF16::load16(sl + g * 32 + 16);
    for (int b = 0; b < BN; ++b) {
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d[b]), scale);
      f[b] = _mm512_fmadd_ps(t, _mm512_set1_ps(alpha[b * G + g]), f[b]);
      f[b] = _mm512_fmadd_ps(low, _mm512_set1_ps(alpha_sum[b * G + g]), f[b]);
    }
  }
  for (int b = 0; b < BN; ++b) {
    _mm512_storeu_ps(y + b * N + n0, f[b]);
    top[b] = _mm512_max_ps(top[b], f[b]);
  }
}
#else
// int4_block on AVX2: the same integer sums and float operations per lane as vpdpbusd's.
// vpmaddubsw multiplies the nibbles by a and adds pairs in 16 bits (at most 2 * 15 * 127), and
// 8 of those add in 16 bits too (|sum| <= 30,480 < 32,768) before vpmaddwd takes them to 32.
// Each 8-output half of a group in turn. Against the whole 16 outputs at once (32-bit sums
// after every product): one row of Gemma 3's head 6.8 -> 6.0 ms, 8 rows within noise.
template <int BN>
inline void int4_block(const int8_t* a, const float* alpha, const float* alpha_sum, int64_t K,
                       const uint8_t* pk, const uint16_t* sl, float* y, int64_t n0, int64_t N,
                       __m512* top) {
  const int64_t G = K / 64;
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(64) float acc[BN][16] = {};
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* pg = pk + g * 512;
    const int8_t* ag = a + g * 64 * BN;  // the group's four-input words, row by row
    for (int h = 0; h < 2; ++h) {
      asm("" : "+r"(ag));  // each word read as ag plus a constant (as vnni_block's)
      __m256i d[BN];
      for (int b = 0; b < BN; ++b) d[b] = _mm256_setzero_si256();
      for (int j0 = 0; j0 < 8; j0 += 4) {
        __m256i e[BN];
        for (int b = 0; b < BN; ++b) e[b] = _mm256_setzero_si256();
        for (int j = j0; j < j0 + 4; ++j) {
          if (h == 0) {
            if constexpr (BN == 1)
              _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + 8192), _MM_HINT_T1);
            else
              _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + PREFETCH_AHEAD),
                           _MM_HINT_T0);
          }
          const __m256i v =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pg + j * 64 + h * 32));
          const __m256i lo = _mm256_and_si256(v, nibble);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int b = 0; b < BN; ++b) {
            const auto word = [&](int64_t c) {  // four inputs to every lane, from memory
              return _mm256_castps_si256(
                  _mm256_broadcast_ss(reinterpret_cast<const float*>(ag + (c * BN + b) * 4)));
            };
            e[b] = _mm256_add_epi16(e[b], _mm256_maddubs_epi16(lo, word(2 * j)));
            e[b] = _mm256_add_epi16(e[b], _mm256_maddubs_epi16(hi, word(2 * j + 1)));
          }
        }
        for (int b = 0; b < BN; ++b) d[b] = _mm256_add_epi32(d[b], _mm256_madd_epi16(e[b], ones));
      }
      const auto bf16x8 = [](const uint16_t* q) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      };
      const __m256 scale = bf16x8(sl + g * 32 + 8 * h);
      const __m256 low = bf16x8(sl + g * 32 + 16 + 8 * h);
      for (int b = 0; b < BN; ++b) {
        float* f = acc[b] + 8 * h;
        const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(d[b]), scale);
        __m256 v = _mm256_fmadd_ps(t, _mm256_set1_ps(alpha[b * G + g]), _mm256_load_ps(f));
        v = _mm256_fmadd_ps(low, _mm256_set1_ps(alpha_sum[b * G + g]), v);
        _mm256_store_ps(f, v);
      }
    }
  }
  for (int b = 0; b < BN; ++b) {
    const __m512 f = _mm512_load_ps(acc[b]);
    _mm512_storeu_ps(y + b * N + n0, f);
    top[b] = _mm512_max_ps(top[b], f);
  }
}
#endif

// int4_block as a function of its own, for 2-4 rows on AVX2: inlined into int4_top_block's
// loop there, GCC kept the rows' broadcast words on the stack, and 4 rows took as long as 8
// (Gemma 3's head on a 2-core Zen 3, in turns: 4 rows 10.9-11.4 -> 7.2-7.4 ms; 4 streams
// decoding 149-160 -> 178-189 tok/s). 5-8 rows and 1 row measured no faster this way, and 3
// rows slower when only 4 were outlined: GCC's choices for the others move with it.
template <int BN>
__attribute__((noinline)) void int4_block_outlined(const int8_t* a, const float* alpha,
                                                   const float* alpha_sum, int64_t K,
                                                   const uint8_t* pk, const uint16_t* sl,
                                                   float* y, int64_t n0, int64_t N, __m512* top) {
  int4_block<BN>(a, alpha, alpha_sum, K, pk, sl, y, n0, N, top);
}

// The 8 x 16 output rows of one block of INT4_TOP_BLOCK scores for BN activation rows, and
// each row's largest score of the block into block_max [B, N / INT4_TOP_BLOCK] (when not null).
constexpr int64_t INT4_TOP_BLOCK = 128;

template <int BN>
inline void int4_top_block(const int8_t* a, const float* alpha, const float* alpha_sum,
                           int64_t K, const uint8_t* packed, const uint16_t* sl, float* y,
                           int64_t blk, int64_t N, float* block_max) {
  __m512 top[BN];
  for (int b = 0; b < BN; ++b) top[b] = _mm512_set1_ps(-INFINITY);
  for (int64_t nb = blk * 8; nb < blk * 8 + 8; ++nb) {
    const uint8_t* pk = packed + nb * 8 * K;
    const uint16_t* sb = sl + nb * 2 * K / 4;
    if constexpr (!PC_VNNI && BN >= 2 && BN <= 4)
      int4_block_outlined<BN>(a, alpha, alpha_sum, K, pk, sb, y, nb * 16, N, top);
    else
      int4_block<BN>(a, alpha, alpha_sum, K, pk, sb, y, nb * 16, N, top);
  }
  if (block_max)
    for (int b = 0; b < BN; ++b)
      block_max[b * (N / INT4_TOP_BLOCK) + blk] = _mm512_reduce_max_ps(top[b]);
}

//
// block_max (null: not wanted; else N a multiple of INT4_TOP_BLOCK): each row's largest score
// of each block of INT4_TOP_BLOCK, found as the scores are made, for top_indices' first pass.
template <class S>
void int4_logits(const typename S::T* x, int64_t B, int64_t K, const uint8_t* packed,
                 const uint16_t* sl, int64_t N, float* out, float* block_max) {
  const int64_t G = K / 64;
  std::vector<int8_t> a(B * K);
  std::vector<float> alpha(B * G), alpha_sum(B * G), row(K);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t b0 = b / 8 * 8, rows = std::min<int64_t>(8, B - b0);
    load_row<S>(x + b * K, K, row.data());
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = row.data() + g * 64;
      float big = 0.0f;
      for (int i = 0; i < 64; ++i) big = std::max(big, std::fabs(xg[i]));
      const float step = big / 127.0f;
      const float inv = big > 0.0f ? 127.0f / big : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < 64; ++i) {
        const int32_t q = std::clamp(static_cast<int32_t>(std::nearbyint(xg[i] * inv)), -127, 127);
        const int64_t c = (g * 64 + i) / 4;  // the four-input word (see int4_block's a)
        a[b0 * K + (c * rows + b - b0) * 4 + i % 4] = static_cast<int8_t>(q);
        sum += q;
      }
      alpha[b * G + g] = step;
      alpha_sum[b * G + g] = step * static_cast<float>(sum);
    }
  }
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const int64_t bn = B - b0 < 8 ? B - b0 : 8;
    const int8_t* ab = a.data() + b0 * K;
    const float* al = alpha.data() + b0 * G;
    const float* as = alpha_sum.data() + b0 * G;
    float* yb = out + b0 * N;
    float* mb = block_max ? block_max + b0 * (N / INT4_TOP_BLOCK) : nullptr;
    if (mb) {
      const auto top_block = [&](int64_t blk) {
        with_rows(bn, [&](auto r) {
          int4_top_block<decltype(r)::value>(ab, al, as, K, packed, sl, yb, blk, N, mb);
        });
      };
      // The threads take 16 blocks (~650 KB of weights) at a time in turn, so one that
      // memory or a neighbour slows does not leave the other waiting at the end. Gemma 3's
      // head on a 2-core Zen 3, medians in turns: one row (streaming the weights) 5.2-8.0 ->
      // 4.4-6.4 ms, 8 rows (computing) 15.1-21.1 -> 12.7-19.1 ms; 2-4 rows measured as fast
      // or faster in static shares.
      if (bn == 1 || bn > 4) {
#pragma omp parallel for schedule(dynamic, 16)
        for (int64_t blk = 0; blk < N / INT4_TOP_BLOCK; ++blk) top_block(blk);
      } else {
#pragma omp parallel for schedule(static)
        for (int64_t blk = 0; blk < N / INT4_TOP_BLOCK; ++blk) top_block(blk);
      }
      continue;
    }
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < N / 16; ++nb) {
      const uint8_t* pb = packed + nb * 8 * K;
      const uint16_t* sb = sl + nb * 2 * K / 4;
      __m512 top[8] = {};  // block maxima not wanted here
      with_rows(bn, [&](auto r) {
        int4_block<decltype(r)::value>(ab, al, as, K, pb, sb, yb, nb * 16, N, top);
      });
    }
  }
}
#else
#define PC_INT4_HEAD 0
#endif

#if PC_VEC16
// A candidate's exact logit: the row against the dense weight's row [K], as the dense matmul
// of that dtype computes it up to the order of its sums: bfloat16 pairs by vdpbf16ps summed in
// float32 and rounded to bfloat16 (K a multiple of 32), float32 products by FMAs (of 16).
template <class S>
inline float rescore_dot(const typename S::T* x, const typename S::T* w, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  if constexpr (std::is_same_v<S, F32>) {
    for (int64_t d = 0; d < K; d += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + d), _mm512_loadu_ps(w + d), acc);
    return _mm512_reduce_add_ps(acc);
  } else {
#if PC_DPBF16
    for (int64_t d = 0; d < K; d += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + d),
                             (__m512bh)_mm512_loadu_si512(w + d));
#endif
    return round_bf16(_mm512_reduce_add_ps(acc));
  }
}

// The rest of RescoredHead.scores_and_greedy after int4_logits took its block maxima, per row
// of x [B, K] (bfloat16 with AVX512-BF16, or float32), in one call where PyTorch's topk,
// gather, bmm, scatter and argmax took ~0.5 ms a row (1.1 ms for 8 in bfloat16; 0.7 and 1.5 ms
// in float32 on a 2-core AVX2 CPU):
// - the k columns of the highest approximate scores (top_indices' two passes: the k blocks of
//   the highest maxima, the lower block first on ties and NaN highest, as topk ranks them;
//   then the k highest of their columns, likewise);
// - their exact logits (rescore_dot) with the dense weight's rows [V, K], written over the
//   approximate ones in scores [B, V];
// - the row's argmax through argmax_blocks (-1 where a NaN leaves it to PyTorch).
// Each row depends on its own scores alone.
template <class S>
void int4_rescore(float* scores, int64_t B, int64_t V, const float* bmax, int64_t block,
                  const typename S::T* x, int64_t K, const typename S::T* weight, int64_t k,
                  int64_t* greedy) {
  const int64_t nb = V / block;
  // Higher first; NaN above everything; the lower index first among equals.
  const auto above = [](float a, int64_t i, float b, int64_t j) {
    const bool na = a != a, nb_ = b != b;
    if (na != nb_) return na;
    if (!na && a != b) return a > b;
    return i < j;
  };
#pragma omp parallel for schedule(static) if (B > 1)
  for (int64_t r = 0; r < B; ++r) {
    float* row = scores + r * V;
    const float* rmax = bmax + r * nb;
    std::vector<int64_t> blocks(nb), cols(k * block), top(k);
    for (int64_t b = 0; b < nb; ++b) blocks[b] = b;
    const int64_t kb = std::min(k, nb);
    std::partial_sort(blocks.begin(), blocks.begin() + kb, blocks.end(),
                      [&](int64_t i, int64_t j) { return above(rmax[i], i, rmax[j], j); });
    int64_t n = 0;
    for (int64_t i = 0; i < kb; ++i)
      for (int64_t j = blocks[i] * block; j < (blocks[i] + 1) * block; ++j) cols[n++] = j;
    const int64_t kc = std::min(k, n);
    std::partial_sort(cols.begin(), cols.begin() + kc, cols.begin() + n,
                      [&](int64_t i, int64_t j) { return above(row[i], i, row[j], j); });
    for (int64_t i = 0; i < kc; ++i) {
      const int64_t c = cols[i];
      row[c] = rescore_dot<S>(x + r * K, weight + c * K, K);
      top[i] = c;
    }
    argmax_blocks(row, 1, V, rmax, block, top.data(), kc, greedy + r);
  }
}
#endif

}  // namespace
