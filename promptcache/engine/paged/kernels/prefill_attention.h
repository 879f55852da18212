// Attention of a prefill chunk over the KV pool (prefill_attention).

#pragma once

#include "common.h"

namespace {

struct PfUnit {
  int64_t kh, t0, t1;  // key head, the chunk's tokens [t0, t1)
};
// Rows of a unit: query heads x tokens that share a key head.
constexpr int64_t PF_LANES = 32;

#if PC_VEC16
// The exponentials of one vector of lanes' scores, s[2 * pairs][lanes] from an even position,
// less each lane's largest mx (-inf where the lane saw no key: taken as 0), written over them
// and summed per lane in key order, even and odd positions apart; returns 1 / each lane's sum
// (0 where it saw nothing). Both prompt attention kernels' softmax.
inline __m512 pf_exp_in_place(float* s, int64_t lanes, int64_t pairs, __m512 mx) {
  const __mmask16 empty = _mm512_cmp_ps_mask(mx, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
  const __m512 m = _mm512_maskz_mov_ps(static_cast<__mmask16>(~empty), mx);
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    float* s0 = s + 2 * p * lanes;
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s0), m));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s0 + lanes), m));
    _mm512_storeu_ps(s0, e0);
    _mm512_storeu_ps(s0 + lanes, e1);
    even = _mm512_add_ps(even, e0);
    odd = _mm512_add_ps(odd, e1);
  }
  const __m512 sum = _mm512_add_ps(even, odd);
  const __mmask16 some = _mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_maskz_mov_ps(some, _mm512_div_ps(_mm512_set1_ps(1.0f), sum));
}
#endif

#if PC_DPBF16
// Attention of a prefill chunk in bfloat16 (prefill_attention): the chunk's n queries q [n, H,
// D] (positions q0 ..) over its keys and values at slots [L] of the pool (positions k0 ..
// q0 + n), causal and, with a window, each query seeing its last `window` positions. The same
// roundings as attention.grouped (scores rounded to bfloat16, * scale, softmax in float32,
// probabilities rounded to bfloat16, their products with the values summed in float32 and
// rounded once; the roundings by the CPU's conversions, which make a subnormal 0 where
// PyTorch keeps it: the same exponentials from such a score, and such a probability weighs 0
// in vdpbf16ps either way); the additions in an order that depends on the query's own row
// alone:
//
// - a unit is one key head and the query heads that share it for up to PF_LANES / G tokens,
//   its rows (token-major) the 16-wide lanes of one or two vectors, so the softmax runs down
//   the keys in every lane at once and no sum crosses lanes;
// - the scores of up to PF_KEYS keys (read in place through the slots: no gather) against
//   every row of the unit at once, the keys' bfloat16 pairs broadcast to the rows' pairs;
// - the exponentials summed per lane in key order, even and odd positions apart; the values
//   taken two keys at a time, the pairs aligned to even absolute positions (a key no row of
//   the unit sees weighs an exact 0).
//
// So a query attends alike whichever chunk it came in and whichever tokens share its unit:
// a cache hit's suffix and the cold prompt's last chunk give the same bits.
constexpr int PF_KEYS = 12;
constexpr int PF_ROWS = 12;

// Word 2i from word i, word 2i + 1 from word 16 + i: BF16::pack32's halves as pairs.
inline __m512i pair_words() {
  alignas(64) static const uint16_t idx[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                               21, 6, 22, 7, 23, 8, 24, 9, 25, 10, 26,
                                               11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(idx);
}

// Scores of NK keys (krow[k]: a key head's row of the pool) for the NV * 16 rows of qp (the
// unit's query rows as bfloat16 pairs [D / 2][NV * 16]): acc[k * NV + v], lane i the product
// with row v * 16 + i.
template <int NK, int NV>
inline void pf_score_tile(const uint16_t* const* krow, const uint32_t* qp, int64_t D,
                          __m512* acc) {
  for (int i = 0; i < NK * NV; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < D / 2; ++p) {
    __m512bh w[NV];
    for (int v = 0; v < NV; ++v)
      w[v] = (__m512bh)_mm512_loadu_si512(qp + p * NV * 16 + v * 16);
    for (int k = 0; k < NK; ++k) {
      uint32_t pair;
      std::memcpy(&pair, krow[k] + 2 * p, sizeof pair);
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) acc[k * NV + v] = _mm512_dpbf16_ps(acc[k * NV + v], kb, w[v]);
    }
  }
}

// NR query rows' outputs, 16 * NC columns of a block of 32: their probability pairs pp
// ([pairs][lanes], the rows from r0) times the value pairs vb (the block's [pairs][32][2]),
// summed in pair order.
template <int NR, int NC>
inline void pf_value_tile(const uint32_t* pp, int64_t lanes, int64_t r0, const uint16_t* vb,
                          int64_t pairs, __m512* acc) {
  for (int i = 0; i < NC * NR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[NC];
    for (int c = 0; c < NC; ++c) w[c] = (__m512bh)_mm512_loadu_si512(vb + p * 64 + 32 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(pp[p * lanes + r0 + r]));
      for (int c = 0; c < NC; ++c) acc[NC * r + c] = _mm512_dpbf16_ps(acc[NC * r + c], b, w[c]);
    }
  }
}

// One unit of prefill_attention with NV vectors of rows. qp, sc: the thread's scratch.
template <int NV>
void pf_unit(const PfUnit& u, const uint16_t* q, int64_t q_stride, int64_t H, int64_t KVH,
             int64_t D, const uint16_t* keys, const int64_t* slots, int64_t k0, int64_t q0,
             int64_t window, float scale, const uint16_t* vint, int64_t pa0, int64_t vpairs,
             uint32_t* qp, float* sc, uint16_t* out, int64_t out_stride) {
  constexpr int64_t lanes = NV * 16;
  const int64_t G = H / KVH, rows = (u.t1 - u.t0) * G;
  // The rows as pairs, lane-major: qp[p * lanes + r] = row r's elements 2p, 2p + 1.
  for (int64_t r = 0; r < lanes; ++r) {
    if (r < rows) {
      const uint16_t* row = q + (u.t0 + r / G) * q_stride + (u.kh * G + r % G) * D;
      for (int64_t p = 0; p < D / 2; ++p) std::memcpy(qp + p * lanes + r, row + 2 * p, 4);
    } else {
      for (int64_t p = 0; p < D / 2; ++p) qp[p * lanes + r] = 0;
    }
  }
  // Each lane's position, and the last it does not see (-1: none): padding lanes see nothing.
  __m512i qpos[NV], qlow[NV];
  for (int v = 0; v < NV; ++v) {
    alignas(64) int32_t pos[16], low[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t r = v * 16 + i;
      pos[i] = r < rows ? static_cast<int32_t>(q0 + u.t0 + r / G) : -1;
      low[i] = window > 0 && r < rows ? pos[i] - static_cast<int32_t>(window) : -1;
    }
    qpos[v] = _mm512_load_si512(pos);
    qlow[v] = _mm512_load_si512(low);
  }
  const int64_t lo = window > 0 ? std::max(k0, q0 + u.t0 - window + 1) : k0;
  const int64_t hi = q0 + u.t1;  // keys [lo, hi)
  const int64_t pa = lo & ~int64_t{1}, pb = (hi + 1) & ~int64_t{1};  // their pairs
  const __m512 none = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
  __m512 mx[NV];
  for (int v = 0; v < NV; ++v) mx[v] = none;
  // Keys outside [lo, hi) that complete a pair weigh 0.
  for (int64_t l : {pa, pb - 1})
    if (l < lo || l >= hi)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(sc + (l - pa) * lanes + v * 16, none);
  auto scores = [&](auto nk, int64_t l0) {
    constexpr int NK = decltype(nk)::value;
    const uint16_t* krow[NK];
    for (int k = 0; k < NK; ++k) krow[k] = keys + (slots[l0 + k - k0] * KVH + u.kh) * D;
    __m512 acc[NK * NV];
    pf_score_tile<NK, NV>(krow, qp, D, acc);
    for (int k = 0; k < NK; ++k) {
      const __m512i vl = _mm512_set1_epi32(static_cast<int32_t>(l0 + k));
      for (int v = 0; v < NV; ++v) {
        const __mmask16 seen = _mm512_cmple_epi32_mask(vl, qpos[v]) &
                               _mm512_cmpgt_epi32_mask(vl, qlow[v]);
        const __m512 r = BF16::round16_score(acc[k * NV + v]);
        const __m512 s = _mm512_mask_mul_ps(none, seen, r, vscale);
        _mm512_storeu_ps(sc + (l0 + k - pa) * lanes + v * 16, s);
        mx[v] = _mm512_max_ps(mx[v], s);
      }
    }
  };
  int64_t l = lo;
  for (; l + PF_KEYS <= hi; l += PF_KEYS) scores(std::integral_constant<int, PF_KEYS>{}, l);
  for (; l + 4 <= hi; l += 4) scores(std::integral_constant<int, 4>{}, l);
  for (; l < hi; ++l) scores(std::integral_constant<int, 1>{}, l);
  // Exponentials in place and their sums (even and odd positions apart, pa being even); then
  // the probabilities, rounded, as pairs: over the scores (pair p's slot comes before the
  // scores it is made of).
  const int64_t pairs = (pb - pa) / 2;
  __m512 inv[NV];
  for (int v = 0; v < NV; ++v) inv[v] = pf_exp_in_place(sc + v * 16, lanes, pairs, mx[v]);
  uint32_t* pp = reinterpret_cast<uint32_t*>(sc);
  const __m512i interleave = pair_words();
  for (int64_t p = 0; p < pairs; ++p)
    for (int v = 0; v < NV; ++v) {
      const __m512 e0 = _mm512_mul_ps(_mm512_loadu_ps(sc + 2 * p * lanes + v * 16), inv[v]);
      const __m512 e1 = _mm512_mul_ps(_mm512_loadu_ps(sc + (2 * p + 1) * lanes + v * 16), inv[v]);
      _mm512_storeu_si512(pp + p * lanes + v * 16,
                          _mm512_permutexvar_epi16(interleave, BF16::pack32(e1, e0)));
    }
  // The values: pair p of the unit is pair (pa - pa0) / 2 + p of the chunk's interleaved copy
  // (vpairs of them a block of columns).
  for (int64_t j = 0; j < D; j += 32) {
    const int nc = D - j >= 32 ? 2 : 1;  // D is a multiple of 16
    const uint16_t* vb = vint + ((j / 32) * vpairs + (pa - pa0) / 2) * 64;
    for (int64_t r0 = 0; r0 < rows; r0 += PF_ROWS) {
      const int64_t nr = std::min<int64_t>(PF_ROWS, rows - r0);
      __m512 acc[2 * PF_ROWS];
      switch (nr * 2 + nc - 1) {
#define PC_CASE(n)                                                   \
  case n * 2:                                                        \
    pf_value_tile<n, 1>(pp, lanes, r0, vb, pairs, acc);               \
    break;                                                           \
  case n * 2 + 1:                                                    \
    pf_value_tile<n, 2>(pp, lanes, r0, vb, pairs, acc);               \
    break;
        PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6) PC_CASE(7) PC_CASE(8)
        PC_CASE(9) PC_CASE(10) PC_CASE(11) PC_CASE(12)
#undef PC_CASE
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        uint16_t* o = out + (u.t0 + row / G) * out_stride + (u.kh * G + row % G) * D + j;
        for (int c = 0; c < nc; ++c) BF16::store16(o + 16 * c, acc[nc * r + c]);
      }
    }
  }
}

// The chunk's values as pairs of keys (even absolute positions first), per key head and block
// of 32 columns: vint [KVH][D / 32 rounded up][pairs][32][2] from position pa0; positions
// outside [k0, k0 + L) are zeros. A block's pairs lie together, so the value tiles, which read
// one block's columns of every pair, stream through memory rather than stride 4 * D bytes
// (which kept a full layer's 4k keys from staying in the L2 cache between row tiles).
inline void pf_interleave(const uint16_t* values, const int64_t* slots, int64_t L, int64_t k0,
                          int64_t KVH, int64_t D, int64_t pa0, int64_t pairs, int64_t item,
                          const uint16_t* zeros, uint16_t* vint) {
  alignas(64) static const uint16_t idx[64] = {
      0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
      11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53,
      22, 54, 23, 55, 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo_idx = _mm512_load_si512(idx), hi_idx = _mm512_load_si512(idx + 32);
  const int64_t kh = item / pairs, p = item % pairs;
  const uint16_t* row[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t l = pa0 + 2 * p + i;
    row[i] = l >= k0 && l < k0 + L ? values + (slots[l - k0] * KVH + kh) * D : zeros;
  }
  const int64_t blocks = (D + 31) / 32;
  for (int64_t j = 0; j < D; j += 32) {  // D is a multiple of 16
    uint16_t* dst = vint + ((kh * blocks + j / 32) * pairs + p) * 64;
    const __mmask32 k = D - j >= 32 ? ~__mmask32{0} : __mmask32{0xffff};
    const __m512i a = _mm512_maskz_loadu_epi16(k, row[0] + j);
    const __m512i b = _mm512_maskz_loadu_epi16(k, row[1] + j);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo_idx, b));
    if (D - j >= 32) _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi_idx, b));
  }
}

// D a multiple of 16, H / KVH at most PF_LANES.
void prefill_attention(const uint16_t* q, int64_t q_stride, int64_t n, int64_t H, int64_t KVH,
                       int64_t D, const uint16_t* keys, const uint16_t* values,
                       const int64_t* slots, int64_t L, int64_t k0, int64_t q0, int64_t window,
                       float scale, uint16_t* out, int64_t out_stride) {
  const int64_t G = H / KVH;
  const int64_t per = std::max<int64_t>(1, PF_LANES / G);  // tokens a unit
  const int64_t blocks = (n + per - 1) / per, units = blocks * KVH;
  const int64_t pa0 = k0 & ~int64_t{1}, pairs = (k0 + L + 1 - pa0) / 2;
  const int threads = omp_get_max_threads();
  // Scratch kept by the calling thread between calls; the workers reach it by pointer.
  thread_local Scratch<uint16_t> vint_s, zeros_s;
  thread_local Scratch<uint32_t> qp_s;
  thread_local Scratch<float> sc_s;
  const int64_t sc_size = (L + 2) * PF_LANES;
  const int64_t per_head = (D + 31) / 32 * pairs * 64;  // a key head's interleaved values
  vint_s.reserve(KVH * per_head);
  zeros_s.reserve(D);
  qp_s.reserve(threads * D / 2 * PF_LANES);
  sc_s.reserve(threads * sc_size);
  std::memset(zeros_s.data(), 0, sizeof(uint16_t) * D);
  uint16_t* const vint = vint_s.data();
  const uint16_t* const zeros = zeros_s.data();
  uint32_t* const qp_all = qp_s.data();
  float* const sc_all = sc_s.data();
#pragma omp parallel if (units * L * D * G >= PARALLEL_MIN_WORK)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < KVH * pairs; ++item)
      pf_interleave(values, slots, L, k0, KVH, D, pa0, pairs, item, zeros, vint);
    const int t = omp_get_thread_num();
    uint32_t* qp = qp_all + t * D / 2 * PF_LANES;
    float* sc = sc_all + t * sc_size;
    // Later tokens see more keys: units dealt out one at a time, in turn.
#pragma omp for schedule(static, 1)
    for (int64_t i = 0; i < units; ++i) {
      const PfUnit u{i % KVH, (i / KVH) * per, std::min(n, (i / KVH + 1) * per)};
      const uint16_t* kv = vint + u.kh * per_head;
      if ((u.t1 - u.t0) * G > 16)
        pf_unit<2>(u, q, q_stride, H, KVH, D, keys, slots, k0, q0, window, scale, kv, pa0,
                   pairs, qp, sc, out, out_stride);
      else
        pf_unit<1>(u, q, q_stride, H, KVH, D, keys, slots, k0, q0, window, scale, kv, pa0,
                   pairs, qp, sc, out, out_stride);
    }
  }
}
#endif  // PC_DPBF16

#if PC_VEC16
// Attention of a prefill chunk in float32 (prefill_attention_f32), on AVX-512 and AVX2 alike:
// the units, masks and order of additions of the bfloat16 kernel above, with FMAs for its
// pairs and no rounding between the steps (as attention.grouped in float32 rounds nowhere):
// a score is one chain of FMAs over the head's dimensions, the exponentials summed per lane
// (even and odd absolute positions apart), and an output one chain of FMAs over the keys from
// the unit's first even position (a key the row does not see weighs an exact 0, which adds
// nothing). So a query's result depends on its own row alone, as there: a hit's suffix and
// the cold prompt's last chunk give the same bits, on either instruction set.
//
// Register tiles sized for 16 float lanes in one register (AVX-512) or two (AVX2's 16
// registers): keys a score tile, and rows x 16-column vectors a value tile.
constexpr int PF32_KEYS = PC_AVX512 ? 12 : 6;
constexpr int PF32_ROWS = PC_AVX512 ? 12 : 6;
constexpr int PF32_COLS = PC_AVX512 ? 2 : 1;
constexpr int64_t PF32_BLOCK = 16 * PF32_COLS;  // columns of a block of the values' copy
// Rows a unit takes: on AVX2 one vector of 16 (two-vector units score 2 keys a tile
// in its 16 registers, one-vector units 6, with the rows' copy, qf, 16 KiB at D = 256, kept
// in L1 beside them: ~25% faster there). A row's result does not depend on its unit, so the
// width changes no bits.
constexpr int64_t PF32_LANES = PC_AVX512 ? PF_LANES : 16;
// Groups of PF32_LANES rows a unit takes at most: 64 rows on either instruction set. The
// unit's groups share each tile of keys while it is in the L1 cache and each block of the
// values' copy while it is in the L2: a full layer's 4k keys (4 MiB of float32 keys and as
// many of values) do not stay in this machine's share of the L3 cache, and units of one group
// read them from memory each (a hit's suffix on Gemma 3 270M: 16 units a key head, the score
// tiles at ~16 GMAC/s a core where they run at ~35 from the caches).
constexpr int64_t PF32_GROUPS = PC_AVX512 ? 2 : 4;
// A unit of the float32 kernel: rows [r0, r1) of key head kh's n * G rows (token-major: row
// t * G + g is token t's query head kh * G + g), whole vectors of them whatever G (SmolLM2's
// 3 heads a key head fill 16 lanes, not 15), at most PF32_GROUPS groups of PF32_LANES.
struct Pf32Unit {
  int64_t kh, r0, r1;
};

template <int NK, int NV>
inline void pf32_score_tile(const float* const* krow, const float* qf, int64_t D, __m512* acc) {
  for (int i = 0; i < NK * NV; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(qf + d * NV * 16 + v * 16);
    for (int k = 0; k < NK; ++k) {
      const __m512 kb = _mm512_set1_ps(krow[k][d]);
      for (int v = 0; v < NV; ++v) acc[k * NV + v] = _mm512_fmadd_ps(kb, w[v], acc[k * NV + v]);
    }
  }
}

// pf32_score_tile as a call of its own, the sums stored to res [NK * NV][16]: inlined into the
// unit with its masks and stores around it, GCC spilled the tile's accumulators (SmolLM2's
// 64-wide heads attended at half the speed).
template <int NK, int NV>
__attribute__((noinline)) void pf32_scores(const float* const* krow, const float* qf, int64_t D,
                                           float* res) {
  __m512 acc[NK * NV];
  pf32_score_tile<NK, NV>(krow, qf, D, acc);
  for (int i = 0; i < NK * NV; ++i) _mm512_storeu_ps(res + 16 * i, acc[i]);
}

// NR rows' outputs, 16 * NC columns: their probabilities pr ([keys][lanes], the rows from r0)
// times the values vb (the block's [keys][PF32_BLOCK]), summed in key order.
template <int NR, int NC>
inline void pf32_value_tile(const float* pr, int64_t lanes, int64_t r0, const float* vb,
                            int64_t keys, __m512* acc) {
  for (int i = 0; i < NC * NR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t l = 0; l < keys; ++l) {
    __m512 w[NC];
    for (int c = 0; c < NC; ++c) w[c] = _mm512_loadu_ps(vb + l * PF32_BLOCK + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(pr[l * lanes + r0 + r]);
      for (int c = 0; c < NC; ++c) acc[NC * r + c] = _mm512_fmadd_ps(b, w[c], acc[NC * r + c]);
    }
  }
}

// One unit of prefill_attention_f32, its groups NV vectors of rows each (AVX2: 1). qf, sc: the
// thread's scratch, the groups' rows lane-major [group][D][lanes] and their scores
// [group][keys][lanes], sc_group floats a group (a value tile reads its group's alone).
template <int NV>
void pf32_unit(const Pf32Unit& u, const float* q, int64_t q_stride, int64_t H, int64_t KVH,
               int64_t D, const float* keys, const int64_t* slots, int64_t k0, int64_t q0,
               int64_t window, float scale, const float* vcopy, int64_t pa0, int64_t vkeys,
               float* qf, float* sc, int64_t sc_group, float* out, int64_t out_stride) {
  constexpr int64_t lanes = NV * 16;
  const int64_t G = H / KVH, rows = u.r1 - u.r0, groups = (rows + lanes - 1) / lanes;
  // Row r of the unit: the key head's row u.r0 + r, token (u.r0 + r) / G, query head % G.
  const auto row_at = [&](int64_t stride, int64_t r) {
    return (u.r0 + r) / G * stride + (u.kh * G + (u.r0 + r) % G) * D;
  };
  const int64_t t0 = u.r0 / G, t1 = (u.r1 - 1) / G + 1;  // the tokens it holds rows of
  // The rows lane-major: qf[(g * D + d) * lanes + i] = row g * lanes + i's element d.
  for (int64_t r = 0; r < groups * lanes; ++r) {
    const float* row = r < rows ? q + row_at(q_stride, r) : nullptr;
    float* dst = qf + (r / lanes) * D * lanes + r % lanes;
    for (int64_t d = 0; d < D; ++d) dst[d * lanes] = row ? row[d] : 0.0f;
  }
  // Each lane's position, and the last it does not see (-1: none), as floats (exact below
  // 2^24): padding lanes see nothing.
  __m512 qpos[PF32_GROUPS][NV], qlow[PF32_GROUPS][NV];
  for (int64_t g = 0; g < groups; ++g)
    for (int v = 0; v < NV; ++v) {
      alignas(64) float pos[16], low[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = g * lanes + v * 16 + i;
        pos[i] = r < rows ? static_cast<float>(q0 + (u.r0 + r) / G) : -1.0f;
        low[i] = window > 0 && r < rows ? pos[i] - static_cast<float>(window) : -1.0f;
      }
      qpos[g][v] = _mm512_load_ps(pos);
      qlow[g][v] = _mm512_load_ps(low);
    }
  const int64_t lo = window > 0 ? std::max(k0, q0 + t0 - window + 1) : k0;
  const int64_t hi = q0 + t1;  // keys [lo, hi)
  const int64_t pa = lo & ~int64_t{1}, pb = (hi + 1) & ~int64_t{1};  // whole pairs
  const __m512 none = _mm512_set1_ps(-INFINITY), vscale = _mm512_set1_ps(scale);
  __m512 mx[PF32_GROUPS][NV];
  for (int64_t g = 0; g < groups; ++g)
    for (int v = 0; v < NV; ++v) mx[g][v] = none;
  for (int64_t l : {pa, pb - 1})
    if (l < lo || l >= hi)
      for (int64_t g = 0; g < groups; ++g)
        for (int v = 0; v < NV; ++v)
          _mm512_storeu_ps(sc + g * sc_group + (l - pa) * lanes + v * 16, none);
  auto scores = [&](auto nk, int64_t l0) {
    constexpr int NK = decltype(nk)::value;
    const float* krow[NK];
    for (int k = 0; k < NK; ++k) krow[k] = keys + (slots[l0 + k - k0] * KVH + u.kh) * D;
    // Each group in turn against the same keys, read from memory once for all of them.
    for (int64_t g = 0; g < groups; ++g) {
      alignas(64) float res[NK * NV * 16];
      pf32_scores<NK, NV>(krow, qf + g * D * lanes, D, res);
      float* sg = sc + g * sc_group;
      for (int k = 0; k < NK; ++k) {
        const __m512 vl = _mm512_set1_ps(static_cast<float>(l0 + k));
        for (int v = 0; v < NV; ++v) {
          const __mmask16 seen = _mm512_cmp_ps_mask(vl, qpos[g][v], _CMP_LE_OQ) &
                                 _mm512_cmp_ps_mask(vl, qlow[g][v], _CMP_GT_OQ);
          const __m512 s =
              _mm512_mask_mul_ps(none, seen, _mm512_load_ps(res + 16 * (k * NV + v)), vscale);
          _mm512_storeu_ps(sg + (l0 + k - pa) * lanes + v * 16, s);
          mx[g][v] = _mm512_max_ps(mx[g][v], s);
        }
      }
    }
  };
  // Two vectors of rows take twice the registers a key (AVX2: 2 keys, not 3, or they spill).
  constexpr int NK = NV == 1 ? PF32_KEYS : PF32_KEYS / 2 - PC_AVX2;
  int64_t l = lo;
  for (; l + NK <= hi; l += NK) scores(std::integral_constant<int, NK>{}, l);
  for (; l + 2 <= hi; l += 2) scores(std::integral_constant<int, 2>{}, l);
  for (; l < hi; ++l) scores(std::integral_constant<int, 1>{}, l);
  // Exponentials and their sums (even and odd positions apart, pa being even), then the
  // probabilities, in place.
  const int64_t pairs = (pb - pa) / 2;
  for (int64_t g = 0; g < groups; ++g)
    for (int v = 0; v < NV; ++v) {
      float* sv = sc + g * sc_group + v * 16;
      const __m512 inv = pf_exp_in_place(sv, lanes, pairs, mx[g][v]);
      for (int64_t i = 0; i < 2 * pairs; ++i) {
        float* si = sv + i * lanes;
        _mm512_storeu_ps(si, _mm512_mul_ps(_mm512_loadu_ps(si), inv));
      }
    }
  // The values: key pa of the unit is key pa - pa0 of the chunk's copy (vkeys of them a
  // block of columns); each block for every group while it is in the L2 cache.
  const int64_t nkeys = pb - pa;
  for (int64_t j = 0; j < D; j += PF32_BLOCK) {
    const int nc = static_cast<int>(std::min<int64_t>(PF32_BLOCK, D - j) / 16);  // D % 16 == 0
    const float* vb = vcopy + ((j / PF32_BLOCK) * vkeys + (pa - pa0)) * PF32_BLOCK;
    for (int64_t g = 0; g < groups; ++g) {
      const float* sg = sc + g * sc_group;
      const int64_t group_rows = std::min(lanes, rows - g * lanes);
      for (int64_t r0 = 0; r0 < group_rows; r0 += PF32_ROWS) {
        const int64_t nr = std::min<int64_t>(PF32_ROWS, group_rows - r0);
        __m512 acc[PF32_COLS * PF32_ROWS];
        switch (nr * 2 + nc - 1) {
#define PC_CASE(n)                                                   \
  case n * 2:                                                        \
    pf32_value_tile<n, 1>(sg, lanes, r0, vb, nkeys, acc);            \
    break;                                                           \
  case n * 2 + 1:                                                    \
    pf32_value_tile<n, PF32_COLS>(sg, lanes, r0, vb, nkeys, acc);    \
    break;
          PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6)
#if PC_AVX512
          PC_CASE(7) PC_CASE(8) PC_CASE(9) PC_CASE(10) PC_CASE(11) PC_CASE(12)
#endif
#undef PC_CASE
        }
        for (int64_t r = 0; r < nr; ++r) {
          float* o = out + row_at(out_stride, g * lanes + r0 + r) + j;
          for (int c = 0; c < nc; ++c) _mm512_storeu_ps(o + 16 * c, acc[nc * r + c]);
        }
      }
    }
  }
}

// Groups of rows a unit takes (1 .. PF32_GROUPS) for a key head's `blocks` groups: the most
// whose units end soonest on `threads` threads, counting each unit's groups as its time
// (SmolLM2's hit, 12 groups a key head on 3 heads: 3 a unit, 12 units, rather than 4 and 9).
inline int64_t pf32_unit_groups(int64_t blocks, int64_t KVH, int64_t threads) {
  int64_t best = 1, span = 0;
  for (int64_t v = PF32_GROUPS; v >= 1; --v) {
    const int64_t units = KVH * ((blocks + v - 1) / v);
    const int64_t t = (units + threads - 1) / threads * v;
    if (span == 0 || t < span) best = v, span = t;
  }
  return best;
}

// D a multiple of 16 (any H / KVH: a unit is rows, not tokens). K: the pool's storage type,
// F32 or F16 (a float16 pool under a float32 model): F16 keys are converted to a float32 copy
// of the chunk's L keys first (once, where the units would each convert the keys they read),
// the values as they are copied anyway; the arithmetic after is the float32 pool's.
template <class K = F32>
void prefill_attention_f32(const float* q, int64_t q_stride, int64_t n, int64_t H, int64_t KVH,
                           int64_t D, const typename K::T* keys, const typename K::T* values,
                           const int64_t* slots, int64_t L, int64_t k0, int64_t q0,
                           int64_t window, float scale, float* out, int64_t out_stride) {
  constexpr bool f32 = std::is_same_v<K, F32>;
  const int64_t G = H / KVH;
  const int64_t R = n * G;  // a key head's rows, token-major
  const int64_t blocks = (R + PF32_LANES - 1) / PF32_LANES;  // groups of rows a key head
  const int threads = omp_get_max_threads();
  const int64_t per_unit = pf32_unit_groups(blocks, KVH, threads);
  const int64_t unit_rows = per_unit * PF32_LANES;
  const int64_t units = (blocks + per_unit - 1) / per_unit * KVH;
  // The values copied per key head and block of columns, the keys from an even position
  // (zeros outside [k0, k0 + L)): a value tile streams through memory, not strides of a slot.
  const int64_t pa0 = k0 & ~int64_t{1}, vkeys = (k0 + L + 1 - pa0) & ~int64_t{1};
  const int64_t vblocks = (D + PF32_BLOCK - 1) / PF32_BLOCK;
  const int64_t per_head = vblocks * vkeys * PF32_BLOCK;
  thread_local Scratch<float> vcopy_s, qf_s, sc_s, kcopy_s;
  thread_local Scratch<int64_t> order_s;
  if constexpr (!f32) {
    kcopy_s.reserve(L * KVH * D);
    order_s.reserve(L);
  }
  // The workers reach the scratch through these pointers (a thread_local name in their code
  // would be their own).
  float* const kcopy = kcopy_s.data();
  int64_t* const order = order_s.data();
  const float* const kf = f32 ? reinterpret_cast<const float*>(keys) : kcopy;
  const int64_t* const ks = f32 ? slots : order;
  const int64_t sc_group = (L + 2) * PF32_LANES, unit_size = PF32_GROUPS * PF32_LANES;
  vcopy_s.reserve(KVH * per_head);
  qf_s.reserve(threads * D * unit_size);
  sc_s.reserve(threads * PF32_GROUPS * sc_group);
  float* const vcopy = vcopy_s.data();
  float* const qf_all = qf_s.data();
  float* const sc_all = sc_s.data();
#pragma omp parallel if (blocks * KVH * L * D * G >= PARALLEL_MIN_WORK)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < KVH * vkeys; ++item) {
      const int64_t kh = item / vkeys, i = item % vkeys, pos = pa0 + i;
      const typename K::T* row =
          pos >= k0 && pos < k0 + L ? values + (slots[pos - k0] * KVH + kh) * D : nullptr;
      for (int64_t j = 0; j < D; j += PF32_BLOCK) {
        float* dst = vcopy + kh * per_head + ((j / PF32_BLOCK) * vkeys + i) * PF32_BLOCK;
        const int64_t w = std::min<int64_t>(PF32_BLOCK, D - j);
        if (!row)
          std::memset(dst, 0, sizeof(float) * w);
        else if constexpr (f32)
          std::memcpy(dst, row + j, sizeof(float) * w);
        else
          load_row<K>(row + j, w, dst);
      }
    }
    if constexpr (!f32) {
#pragma omp for schedule(static)
      for (int64_t l = 0; l < L; ++l) {
        load_row<K>(keys + slots[l] * KVH * D, KVH * D, kcopy + l * KVH * D);
        order[l] = l;
      }
    }
    const int t = omp_get_thread_num();
    float* qf = qf_all + t * D * unit_size;
    float* sc = sc_all + t * PF32_GROUPS * sc_group;
    // Units one at a time in turn: later tokens' units see more keys, and a thread that a
    // neighbour slows takes fewer (3-10% faster than round robin, in turns).
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < units; ++i) {
      const Pf32Unit u{i % KVH, (i / KVH) * unit_rows, std::min(R, (i / KVH + 1) * unit_rows)};
      const float* kv = vcopy + u.kh * per_head;
      if (PC_AVX512 && u.r1 - u.r0 > 16)
        pf32_unit<2>(u, q, q_stride, H, KVH, D, kf, ks, k0, q0, window, scale, kv, pa0,
                     vkeys, qf, sc, sc_group, out, out_stride);
      else
        pf32_unit<1>(u, q, q_stride, H, KVH, D, kf, ks, k0, q0, window, scale, kv, pa0,
                     vkeys, qf, sc, sc_group, out, out_stride);
    }
  }
}
#endif  // PC_VEC16

}  // namespace
