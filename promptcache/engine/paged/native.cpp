// CPU kernels for the small operations of a decode step (promptcache/engine/paged/native.py
// builds this file with the machine's C++ compiler and calls it through ctypes).
//
// A decode step of a small model on a CPU spends as much time in the fixed cost of small
// operations as in its matmuls: attending from one query over a few hundred keys through
// PyTorch is a gather, two oneDNN matmuls and a softmax, ~90 us of which a few are arithmetic.
// Each function here does one such piece in a single pass over plain memory.
//
// Every function exists for bfloat16 (uint16_t storage) and float32, and computes in float32,
// rounding to the storage type exactly where the PyTorch code it replaces rounds (documented
// per function), so the two paths agree up to the order of float additions.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define PC_AVX512 1
#else
#define PC_AVX512 0
#endif
// bfloat16 pairs multiplied and summed in float32 (vdpbf16ps): a product of two bfloat16 is
// exact in float32, so only the order of the additions differs from float32 FMAs.
#if PC_AVX512 && defined(__AVX512BF16__)
#define PC_DPBF16 1
#else
#define PC_DPBF16 0
#endif
// The decode products' paired int8 weights convert by byte-table lookups (vpermi2b).
#if PC_DPBF16 && defined(__AVX512VBMI__)
#define PC_PAIRED 1
#else
#define PC_PAIRED 0
#endif

namespace {

// Elements of work below which a kernel stays on the calling thread: waking the others
// (OpenMP, the same runtime and threads as PyTorch's) costs more than it saves.
constexpr int64_t PARALLEL_MIN_WORK = 1 << 16;
// The same for the norms, which pass over each element four times or more (a 64-token chunk
// of Gemma 3 270M, 64 x 640: 40 -> 26 us a residual_norm on two threads).
constexpr int64_t PARALLEL_MIN_NORM = PARALLEL_MIN_WORK / 4;

// Bytes ahead of the one in hand that a kernel streaming a weight asks the cache for (measured
// best from 2 to 6 KB; a prefetch never faults: past the end of a weight it is only wasted).
constexpr int64_t PREFETCH_AHEAD = 3072;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as PyTorch's float -> bfloat16 conversion (NaN stays NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

struct BF16 {
  using T = uint16_t;
  static float load(T x) { return bf16_to_float(x); }
  static T store(float f) { return float_to_bf16(f); }
  static float round(float f) { return bf16_to_float(float_to_bf16(f)); }
#if PC_AVX512
  static __m512 load16(const T* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  // float_to_bf16 on 16 lanes, by integer arithmetic: the bfloat16 bits in each 32-bit lane's
  // low half.
  static __m512i bits16_long(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), quiet);
  }
  // float_to_bf16 on 16 lanes, packed. Where the CPU converts (vcvtneps2bf16: the same
  // rounding to nearest even and the same quieted NaN) it does, one instruction for the
  // ~8 above; but it reads subnormal inputs as 0, so a vector holding one (softmax tails
  // can) takes the long way and every value rounds as PyTorch rounds it.
  static __m256i pack16(__m512 v) {
#if PC_DPBF16 && defined(__AVX512DQ__)
    if (_mm512_fpclass_ps_mask(v, 0x20) == 0) return (__m256i)_mm512_cvtneps_pbh(v);
#endif
    return _mm512_cvtepi32_epi16(bits16_long(v));
  }
  static void store16(T* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack16(v));
  }
  // Rounded in place (the attention kernels' scores and probabilities, whose subnormal tails
  // would send pack16 the long way often): the integer arithmetic alone.
  static __m512i bits16(__m512 v) { return bits16_long(v); }
  static __m512 round16(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits16(v), 16)); }
  static __m512 load16(__mmask16 k, const T* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static void store16(T* p, __mmask16 k, __m512 v) {
    _mm256_mask_storeu_epi16(p, k, pack16(v));
  }
#endif
};

struct F32 {
  using T = float;
  static float load(T x) { return x; }
  static T store(float f) { return f; }
  static float round(float f) { return f; }
#if PC_AVX512
  static __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
  static void store16(T* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static __m512 round16(__m512 v) { return v; }
  static __m512 load16(__mmask16 k, const T* p) { return _mm512_maskz_loadu_ps(k, p); }
  static void store16(T* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
#endif
};

#if PC_AVX512
// The lanes of a 16-wide step at j of a row of n: all of them but in the row's last step.
// Every element of a row sits in lane j % 16 whatever the row's length, so a sum over a row
// that a longer row extends with zeros (masked keys) adds in the same order.
inline __mmask16 lanes(int64_t j, int64_t n) {
  return n - j >= 16 ? static_cast<__mmask16>(0xffff)
                     : static_cast<__mmask16>((1u << (n - j)) - 1u);
}
#endif

// Rows between the storage type and float32, 16 lanes at a time where AVX-512 is at hand.
template <class S>
inline void load_row(const typename S::T* x, int64_t n, float* out) {
#if PC_AVX512
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(i, n);
    _mm512_mask_storeu_ps(out + i, k, S::load16(k, x + i));
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = S::load(x[i]);
#endif
}

template <class S>
inline void store_row(const float* x, int64_t n, typename S::T* out) {
#if PC_AVX512
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(i, n);
    S::store16(out + i, k, _mm512_maskz_loadu_ps(k, x + i));
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = S::store(x[i]);
#endif
}

#if PC_AVX512
// exp(x) for a vector, ~1 ulp (Cephes' polynomial); exactly 0 for x below -88 (-inf included).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-88.0f);
  __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~zero), _mm512_scalef_ps(p, n));
}

#else
inline float exp1(float x) { return x < -88.0f ? 0.0f : std::exp(x); }
#endif

#if PC_AVX512
// exp(s - mx) of a row of W scores, in place; returns 1 / their sum in every lane. Lane j % 16
// sums element j, whatever W (masked tail).
inline __m512 exps_in_place(float* s, int64_t W, float mx) {
  const __m512 none = _mm512_set1_ps(-INFINITY);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < W; j += 16) {
    const __mmask16 k = lanes(j, W);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(none, k, s + j), vmx));
    _mm512_mask_storeu_ps(s + j, k, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  return _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
}
#endif

// Softmax of each of the G rows of scores [G, W] in place, each probability rounded to the
// storage type (PyTorch: softmax in float32, then .to(dtype)).
template <class S>
void softmax_rows(float* scores, int64_t G, int64_t W) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * W;
#if PC_AVX512
    const __m512 none = _mm512_set1_ps(-INFINITY);
    __m512 vmx = none;
    for (int64_t j = 0; j < W; j += 16)
      vmx = _mm512_max_ps(vmx, _mm512_mask_loadu_ps(none, lanes(j, W), s + j));
    const __m512 inv = exps_in_place(s, W, _mm512_reduce_max_ps(vmx));
    for (int64_t j = 0; j < W; j += 16) {
      const __mmask16 k = lanes(j, W);
      _mm512_mask_storeu_ps(s + j, k, S::round16(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), inv)));
    }
#else
    float mx = -INFINITY;
    for (int64_t j = 0; j < W; ++j) mx = s[j] > mx ? s[j] : mx;
    float sum = 0.0f;
    for (int64_t j = 0; j < W; ++j) {
      s[j] = exp1(s[j] - mx);
      sum += s[j];
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < W; ++j) s[j] = S::round(s[j] * inv);
#endif
  }
}

#if PC_AVX512
// One key head's part of decode_attention, for GQ (a compile-time count) query heads per key
// head, D a multiple of 32: the accumulators stay in registers.
template <class S, int GQ>
void attend_head(const float* qf, const typename S::T* keys, const typename S::T* values,
                 const int64_t* srow, const float* mrow, float* sc, float* acc, int64_t KVH,
                 int64_t kh, int64_t D, int64_t W, float scale) {
  using T = typename S::T;
  for (int64_t j = 0; j < W; ++j) {
    const float m = mrow ? mrow[j] : 0.0f;
    if (m == -INFINITY) {
      for (int g = 0; g < GQ; ++g) sc[g * W + j] = -INFINITY;
      continue;
    }
    const T* kp = keys + (srow[j] * KVH + kh) * D;
    __m512 a[GQ];
    for (int g = 0; g < GQ; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 k = S::load16(kp + d);
      for (int g = 0; g < GQ; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + d), k, a[g]);
    }
    for (int g = 0; g < GQ; ++g) sc[g * W + j] = S::round(_mm512_reduce_add_ps(a[g])) * scale + m;
  }
  softmax_rows<S>(sc, GQ, W);
  // 32 values of D at a time: each pass reads its own 64 bytes of each value row.
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    __m512 a0[GQ], a1[GQ];
    for (int g = 0; g < GQ; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
    for (int64_t j = 0; j < W; ++j) {
      if (mrow && mrow[j] == -INFINITY) continue;
      const T* vp = values + (srow[j] * KVH + kh) * D + d0;
      const __m512 v0 = S::load16(vp), v1 = S::load16(vp + 16);
      for (int g = 0; g < GQ; ++g) {
        const __m512 p = _mm512_set1_ps(sc[g * W + j]);
        a0[g] = _mm512_fmadd_ps(p, v0, a0[g]);
        a1[g] = _mm512_fmadd_ps(p, v1, a1[g]);
      }
    }
    for (int g = 0; g < GQ; ++g) {
      _mm512_storeu_ps(acc + g * D + d0, a0[g]);
      _mm512_storeu_ps(acc + g * D + d0 + 16, a1[g]);
    }
  }
}
#endif

#if PC_DPBF16
// attend_head for bfloat16 with vdpbf16ps (D a multiple of 32): scores as 32-element bfloat16
// dot products, then the values two keys at a time, their rows interleaved so that each lane
// holds one column's pair, times the pair of (rounded, so exact) probabilities. qb: the query
// heads in bfloat16 [GQ, D]; live, pairs: scratch of W keys and GQ * (W / 2 + 1) pairs.
// Lane i of the result: the sum of a[i]'s 16 lanes, added in the same order for every i
// (pairs of lanes, then of 128-bit quarters): the transposed sums of 16 vectors in 45
// instructions, where 16 horizontal sums take ~8 each.
inline __m512 sum16(const __m512* a) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// A buffer that only grows and is never cleared (std::vector would zero what it adds).
template <class E>
struct Scratch {
  std::unique_ptr<E[]> p;
  int64_t n = 0;
  void reserve(int64_t want) {
    if (want > n) {
      p.reset(new E[want]);
      n = want;
    }
  }
  E* data() { return p.get(); }
  E& operator[](int64_t i) { return p[i]; }
};

constexpr int64_t KEY_CHUNK = 256;
// Live keys per work item of decode_attention_dp (even, a multiple of 16).
constexpr int64_t KV_AHEAD = 4;
// Blocks of keys ahead of the one in hand that dp_scores asks the cache for (decode attention
// of 8 rows x 1,024 keys on 2 cores: 6.1 -> 5.1 ms a step with NEXT_UNIT_KEYS).
constexpr int64_t NEXT_UNIT_KEYS = 64;
// Keys of a thread's next unit that decode_attention_dp asks the cache for ahead.

// Asks the cache for the D bfloat16 of a key or value row (HINT: _MM_HINT_T0 or _T1).
template <_mm_hint HINT>
inline void prefetch_row(const uint16_t* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(p + b, HINT);
}

// One block of scores: KB = 16 / GQ keys x GQ query heads, one accumulator each (lane
// j * GQ + g of sum16), each key row and query row read once per block.
template <int GQ>
inline void score_block(const uint16_t* qb, const uint16_t* const* kp, int64_t D, float* sums) {
  constexpr int KB = 16 / GQ;
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __m512bh qv[GQ];
    for (int g = 0; g < GQ; ++g) qv[g] = (__m512bh)_mm512_loadu_si512(qb + g * D + d);
    for (int j = 0; j < KB; ++j) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kp[j] + d);
      for (int g = 0; g < GQ; ++g) a[j * GQ + g] = _mm512_dpbf16_ps(a[j * GQ + g], qv[g], k);
    }
  }
  _mm512_storeu_ps(sums, sum16(a));
}

// One unit (a row's key head) of decode_attention_dp, as its chunk-wise pieces read it.
struct DpUnit {
  const uint16_t* qb;     // its GQ query heads, bfloat16 [GQ, D]
  const int64_t* live;    // its unmasked keys (indices into its row of slots / mask)
  int64_t n;              // how many
  const int64_t* slots;   // its row of slots [W]
  const float* mask;      // its row of the mask [W], or null
  float* sc;              // [GQ, W] by live index: scores, then exponentials
  int64_t W, kh, KVH, D;
};

// Scores of live keys [i0, i1) (16 (key, head) pairs a block, summed across lanes together),
// rounded to bfloat16, * scale + mask; returns their maximum per head in mx.
template <int GQ>
void dp_scores(const DpUnit& u, const uint16_t* keys, const uint16_t* values, int64_t i0,
               int64_t i1, float scale, float* mx) {
  constexpr int KB = 16 / GQ;
  for (int g = 0; g < GQ; ++g) mx[g] = -INFINITY;
  for (int64_t i = i0; i < i1; i += KB) {
    const int kb = i1 - i < KB ? static_cast<int>(i1 - i) : KB;
    // The keys KV_AHEAD blocks on into L1, and this block's values into L2 for dp_values: a
    // row lies wherever its block of the pool does, so the hardware prefetcher cannot see the
    // next one coming, and the weights streamed since the last step have evicted them.
    const int64_t ahead = std::min(i + KB * (KV_AHEAD + 1), i1);
    for (int64_t j = i == i0 ? i : i + KB * KV_AHEAD; j < ahead; ++j)
      prefetch_row<_MM_HINT_T0>(keys + (u.slots[u.live[j]] * u.KVH + u.kh) * u.D, u.D);
    for (int j = 0; j < kb; ++j)
      prefetch_row<_MM_HINT_T1>(values + (u.slots[u.live[i + j]] * u.KVH + u.kh) * u.D, u.D);
    const uint16_t* kp[KB];
    for (int j = 0; j < KB; ++j)  // past the last key: the first again, its sums unused
      kp[j] = keys + (u.slots[u.live[i + (j < kb ? j : 0)]] * u.KVH + u.kh) * u.D;
    alignas(64) float sums[16];
    score_block<GQ>(u.qb, kp, u.D, sums);
    for (int j = 0; j < kb; ++j) {
      const float m = u.mask ? u.mask[u.live[i + j]] : 0.0f;
      for (int g = 0; g < GQ; ++g) {
        const float v = BF16::round(sums[j * GQ + g]) * scale + m;
        u.sc[g * u.W + i + j] = v;
        mx[g] = std::max(mx[g], v);
      }
    }
  }
}

// exp(score - mx) of live keys [i0, i1) in place; their sum per head as 16 lanes (key i in
// lane i % 16) into sums [GQ, 16].
template <int GQ>
void dp_exps(const DpUnit& u, int64_t i0, int64_t i1, const float* mx, float* sums) {
  for (int g = 0; g < GQ; ++g) {
    const __m512 vmx = _mm512_set1_ps(mx[g]);
    float* s = u.sc + g * u.W;
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t i = i0; i < i1; i += 16) {
      const __mmask16 k = lanes(i, i1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), vmx));
      _mm512_mask_storeu_ps(s + i, k, e);
      vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(k, e));
    }
    _mm512_storeu_ps(sums + g * 16, vsum);
  }
}

// The probabilities of live keys [i0, i1) (exponential * inv, rounded to bfloat16) times their
// values, two keys a lane, into partial [GQ, D] (float32, columns in order).
template <int GQ>
void dp_values(const DpUnit& u, const uint16_t* values, int64_t i0, int64_t i1, const float* inv,
               float* partial) {
  const int64_t np = (i1 - i0 + 1) / 2;
  uint32_t pairs[GQ][KEY_CHUNK / 2];
  for (int g = 0; g < GQ; ++g) {
    const float* s = u.sc + g * u.W;
    for (int64_t p = 0; p < np; ++p) {
      const int64_t i = i0 + 2 * p;
      const uint32_t lo = float_to_bf16(s[i] * inv[g]);
      const uint32_t hi = i + 1 < i1 ? float_to_bf16(s[i + 1] * inv[g]) : 0u;
      pairs[g][p] = lo | (hi << 16);
    }
  }
  // Lane l of the low (high) interleave holds column 8 (l / 4) + l % 4 (+ 4): back in order.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t d0 = 0; d0 < u.D; d0 += 32) {
    __m512 lo[GQ], hi[GQ];
    for (int g = 0; g < GQ; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; ++p) {
      const int64_t i = i0 + 2 * p;
      const __m512i v0 = _mm512_loadu_si512(values + (u.slots[u.live[i]] * u.KVH + u.kh) * u.D + d0);
      const __m512i v1 =
          i + 1 < i1 ? _mm512_loadu_si512(values + (u.slots[u.live[i + 1]] * u.KVH + u.kh) * u.D + d0)
                     : _mm512_setzero_si512();
      const __m512bh l = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
      const __m512bh h = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
      for (int g = 0; g < GQ; ++g) {
        const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[g][p]));
        lo[g] = _mm512_dpbf16_ps(lo[g], pv, l);
        hi[g] = _mm512_dpbf16_ps(hi[g], pv, h);
      }
    }
    for (int g = 0; g < GQ; ++g) {
      _mm512_storeu_ps(partial + g * u.D + d0, _mm512_permutex2var_ps(lo[g], first, hi[g]));
      _mm512_storeu_ps(partial + g * u.D + d0 + 16, _mm512_permutex2var_ps(lo[g], second, hi[g]));
    }
  }
}

// 1 / the sum of the chunks' exponentials, per head: the chunks' lanes added in chunk order.
template <int GQ>
void dp_inverse(const float* chunk_sums, int64_t chunks, float* inv) {
  for (int g = 0; g < GQ; ++g) {
    __m512 t = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) t = _mm512_add_ps(t, _mm512_loadu_ps(chunk_sums + (c * GQ + g) * 16));
    inv[g] = 1.0f / _mm512_reduce_add_ps(t);
  }
}

// decode_attention for bfloat16 with vdpbf16ps (D a multiple of 32, GQ query heads per key
// head). A unit's unmasked keys are cut into chunks of KEY_CHUNK: the scores and their maximum,
// then per chunk the exponentials and their sum (the chunks' sums added in chunk order), then per
// chunk the probabilities (rounded to bfloat16) times the values, the chunks' partial outputs
// added in chunk order. The cut depends on the unit's keys alone, so a row attends alike alone
// and in any batch. With fewer units than threads (one stream), the chunks of each phase are
// shared by the threads (a long context no longer waits on one core); otherwise each thread
// takes whole units. Both do the same arithmetic in the same order: the same results.
template <int GQ>
void decode_attention_dp(const uint16_t* q, int64_t q_stride, const uint16_t* keys,
                         const uint16_t* values, const int64_t* slots, const float* mask,
                         uint16_t* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t W,
                         float scale) {
  const int64_t units = B * KVH;
  // Scratch kept by the calling thread between calls (allocating and clearing ~1 MB a call
  // cost more than the attention of a few short rows); the workers reach it through the
  // pointers below (a thread_local name in their code would be their own).
  thread_local Scratch<int64_t> live_s, first_s, owner_s;
  thread_local Scratch<float> sc_s, cmax_s, csum_s, part_s;
  thread_local Scratch<uint16_t> qb_s;
  live_s.reserve(units * W);
  sc_s.reserve(units * GQ * W);
  qb_s.reserve(units * GQ * D);
  int64_t* const live = live_s.data();
  float* const sc = sc_s.data();
  uint16_t* const qb = qb_s.data();
  // A unit's live keys and query heads, gathered by whichever thread takes it.
  auto prepare = [&](int64_t u) {
    const int64_t b = u / KVH;
    const float* mrow = mask ? mask + b * W : nullptr;
    int64_t* lv = live + u * W;
    int64_t n = 0;
    for (int64_t j = 0; j < W; ++j)
      if (!mrow || mrow[j] != -INFINITY) lv[n++] = j;
    uint16_t* qu = qb + u * GQ * D;
    for (int g = 0; g < GQ; ++g)
      std::memcpy(qu + g * D, q + b * q_stride + ((u % KVH) * GQ + g) * D, sizeof(uint16_t) * D);
    return DpUnit{qu, lv, n, slots + b * W, mrow, sc + u * GQ * W, W, u % KVH, KVH, D};
  };
  auto store = [&](int64_t u, const float* acc) {
    uint16_t* op = out + ((u / KVH) * H + (u % KVH) * GQ) * D;
    for (int64_t i = 0; i < GQ * D; i += 16) BF16::store16(op + i, _mm512_loadu_ps(acc + i));
  };
  auto add_into = [&](float* acc, const float* partial) {
    for (int64_t i = 0; i < GQ * D; i += 16)
      _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), _mm512_loadu_ps(partial + i)));
  };
  const bool parallel = units * W * D >= PARALLEL_MIN_WORK;
  if (units >= omp_get_max_threads() || W <= KEY_CHUNK || !parallel) {
    // Whole units a thread.
#pragma omp parallel if (units > 1 && parallel)
    {
      std::vector<float> acc(GQ * D), partial(GQ * D), sums;
      // This thread's units, in order; while one is computed, the next one's first keys come.
      const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
      DpUnit next = u0 < u1 ? prepare(u0) : DpUnit{};
      for (int64_t u = u0; u < u1; ++u) {
        const DpUnit du = next;
        if (u + 1 < u1) {
          next = prepare(u + 1);
          for (int64_t j = 0; j < std::min<int64_t>(next.n, NEXT_UNIT_KEYS); ++j)
            prefetch_row<_MM_HINT_T1>(keys + (next.slots[next.live[j]] * KVH + next.kh) * D, D);
        }
        const int64_t chunks = (du.n + KEY_CHUNK - 1) / KEY_CHUNK;
        sums.resize(chunks * GQ * 16);
        float mx[GQ], m[GQ], inv[GQ];
        for (int g = 0; g < GQ; ++g) mx[g] = -INFINITY;
        for (int64_t c = 0; c < chunks; ++c) {
          dp_scores<GQ>(du, keys, values, c * KEY_CHUNK, std::min((c + 1) * KEY_CHUNK, du.n),
                        scale, m);
          for (int g = 0; g < GQ; ++g) mx[g] = std::max(mx[g], m[g]);
        }
        for (int64_t c = 0; c < chunks; ++c)
          dp_exps<GQ>(du, c * KEY_CHUNK, std::min((c + 1) * KEY_CHUNK, du.n), mx,
                      sums.data() + c * GQ * 16);
        dp_inverse<GQ>(sums.data(), chunks, inv);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t c = 0; c < chunks; ++c) {
          dp_values<GQ>(du, values, c * KEY_CHUNK, std::min((c + 1) * KEY_CHUNK, du.n), inv,
                        partial.data());
          add_into(acc.data(), partial.data());
        }
        store(u, acc.data());
      }
    }
    return;
  }
  // Fewer units than threads: each phase's chunks shared by the threads.
  thread_local Scratch<DpUnit> unit_s;
  unit_s.reserve(units);
  first_s.reserve(units + 1);
  DpUnit* const unit = unit_s.data();
  int64_t* const first = first_s.data();
  first[0] = 0;
  for (int64_t u = 0; u < units; ++u) {
    unit[u] = prepare(u);
    first[u + 1] = first[u] + (unit[u].n + KEY_CHUNK - 1) / KEY_CHUNK;
  }
  const int64_t items = first[units];
  owner_s.reserve(items);
  cmax_s.reserve(items * GQ);
  csum_s.reserve(items * GQ * 16);
  part_s.reserve(items * GQ * D);
  int64_t* const owner = owner_s.data();
  float* const cmax = cmax_s.data();
  float* const csum = csum_s.data();
  float* const part = part_s.data();
  for (int64_t u = 0; u < units; ++u)
    for (int64_t c = first[u]; c < first[u + 1]; ++c) owner[c] = u;
  auto span = [&](int64_t c, int64_t* i0, int64_t* i1) {
    *i0 = (c - first[owner[c]]) * KEY_CHUNK;
    *i1 = std::min(*i0 + KEY_CHUNK, unit[owner[c]].n);
  };
#pragma omp parallel
  {
    int64_t i0, i1;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < items; ++c) {
      span(c, &i0, &i1);
      dp_scores<GQ>(unit[owner[c]], keys, values, i0, i1, scale, cmax + c * GQ);
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < items; ++c) {
      const int64_t u = owner[c];
      float mx[GQ];
      for (int g = 0; g < GQ; ++g) {
        mx[g] = -INFINITY;
        for (int64_t k = first[u]; k < first[u + 1]; ++k) mx[g] = std::max(mx[g], cmax[k * GQ + g]);
      }
      span(c, &i0, &i1);
      dp_exps<GQ>(unit[u], i0, i1, mx, csum + c * GQ * 16);
    }
#pragma omp for schedule(static)
    for (int64_t c = 0; c < items; ++c) {
      const int64_t u = owner[c];
      float inv[GQ];
      dp_inverse<GQ>(csum + first[u] * GQ * 16, first[u + 1] - first[u], inv);
      span(c, &i0, &i1);
      dp_values<GQ>(unit[u], values, i0, i1, inv, part + c * GQ * D);
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      std::vector<float> acc(GQ * D, 0.0f);
      for (int64_t c = first[u]; c < first[u + 1]; ++c) add_into(acc.data(), part + c * GQ * D);
      store(u, acc.data());
    }
  }
}
#endif

// One key head's part of decode_attention, any shape: plain loops.
template <class S>
void attend_head_any(const float* qf, const typename S::T* keys, const typename S::T* values,
                     const int64_t* srow, const float* mrow, float* sc, float* acc, int64_t G,
                     int64_t KVH, int64_t kh, int64_t D, int64_t W, float scale) {
  using T = typename S::T;
  for (int64_t j = 0; j < W; ++j) {
    const float m = mrow ? mrow[j] : 0.0f;
    if (m == -INFINITY) {
      for (int64_t g = 0; g < G; ++g) sc[g * W + j] = -INFINITY;
      continue;
    }
    const T* kp = keys + (srow[j] * KVH + kh) * D;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * S::load(kp[d]);
      sc[g * W + j] = S::round(s) * scale + m;
    }
  }
  softmax_rows<S>(sc, G, W);
  for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.0f;
  for (int64_t j = 0; j < W; ++j) {
    if (mrow && mrow[j] == -INFINITY) continue;
    const T* vp = values + (srow[j] * KVH + kh) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = sc[g * W + j];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * S::load(vp[d]);
    }
  }
}

// Attention of the decode queries q [B, H, D] (row stride q_stride, heads contiguous) over
// the pool's keys and values [slots, KVH, D] at slots [B, W], with the additive float32 mask
// [B, W] (nullptr: none); out [B, H, D] contiguous. Query head h reads key head h / (H / KVH).
// As PyTorch's decode_attend: scores q.k rounded to the storage type, then * scale + mask and
// softmax in float32, probabilities rounded, their product with the values accumulated in
// float32 and rounded once. A masked key (-inf) is not read at all.
template <class S>
void decode_attention(const typename S::T* q, int64_t q_stride, const typename S::T* keys,
                      const typename S::T* values, const int64_t* slots, const float* mask,
                      typename S::T* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                      int64_t W, float scale) {
  using T = typename S::T;
  const int64_t G = H / KVH;
  const int64_t units = B * KVH;
#if PC_DPBF16
  if constexpr (std::is_same_v<S, BF16>) {
    if (D % 32 == 0 && G >= 1 && G <= 8) {
      switch (G) {
#define PC_CASE(n)                                                                             \
  case n:                                                                                      \
    decode_attention_dp<n>(q, q_stride, keys, values, slots, mask, out, B, H, KVH, D, W, scale); \
    return;
        PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6) PC_CASE(7) PC_CASE(8)
#undef PC_CASE
      }
    }
  }
#endif
  // Units (a row's key head) split over the threads when there are several and enough work
  // to cover waking them (a unit's result does not depend on which thread computes it).
#pragma omp parallel if (units > 1 && units * W * D >= PARALLEL_MIN_WORK)
  {
    std::vector<float> qf(G * D), sc(G * W), acc(G * D);
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < units; ++unit) {
      const int64_t b = unit / KVH, kh = unit % KVH;
      const int64_t* srow = slots + b * W;
      const float* mrow = mask ? mask + b * W : nullptr;
      for (int64_t g = 0; g < G; ++g) {
        const T* qp = q + b * q_stride + (kh * G + g) * D;
        load_row<S>(qp, D, qf.data() + g * D);
      }
      const float* f = qf.data();
      float* s = sc.data();
      float* a = acc.data();
      bool done = false;
#if PC_AVX512
      if (D % 32 == 0) {
        done = true;
        switch (G) {
#define PC_CASE(n) \
  case n:          \
    attend_head<S, n>(f, keys, values, srow, mrow, s, a, KVH, kh, D, W, scale); \
    break;
          PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6) PC_CASE(7)
          PC_CASE(8)
#undef PC_CASE
          default:
            done = false;
        }
      }
#endif
      if (!done) attend_head_any<S>(f, keys, values, srow, mrow, s, a, G, KVH, kh, D, W, scale);
      for (int64_t g = 0; g < G; ++g) {
        T* op = out + (b * H + kh * G + g) * D;
        store_row<S>(acc.data() + g * D, D, op);
      }
    }
  }
}

#if PC_DPBF16
// Attention of a prefill chunk in bfloat16 (prefill_attention): the chunk's n queries q [n, H,
// D] (positions q0 ..) over its keys and values at slots [L] of the pool (positions k0 ..
// q0 + n), causal and, with a window, each query seeing its last `window` positions. The same
// roundings as attention.grouped (scores rounded to bfloat16, * scale, softmax in float32,
// probabilities rounded to bfloat16, their products with the values summed in float32 and
// rounded once); the additions in an order that depends on the query's own row alone:
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
constexpr int64_t PF_LANES = 32;
constexpr int PF_KEYS = 12;
constexpr int PF_ROWS = 12;

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

struct PfUnit {
  int64_t kh, t0, t1;  // key head, the chunk's tokens [t0, t1)
};

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
        const __m512 s = _mm512_mask_mul_ps(none, seen, BF16::round16(acc[k * NV + v]), vscale);
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
  for (int v = 0; v < NV; ++v) {
    const __mmask16 empty = _mm512_cmp_ps_mask(mx[v], none, _CMP_EQ_OQ);
    const __m512 m = _mm512_mask_mov_ps(mx[v], empty, _mm512_setzero_ps());
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      float* s0 = sc + 2 * p * lanes + v * 16;
      const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s0), m));
      const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s0 + lanes), m));
      _mm512_storeu_ps(s0, e0);
      _mm512_storeu_ps(s0 + lanes, e1);
      even = _mm512_add_ps(even, e0);
      odd = _mm512_add_ps(odd, e1);
    }
    const __m512 sum = _mm512_add_ps(even, odd);
    const __mmask16 some = _mm512_cmp_ps_mask(sum, _mm512_setzero_ps(), _CMP_GT_OQ);
    inv[v] = _mm512_maskz_div_ps(some, _mm512_set1_ps(1.0f), sum);
  }
  uint32_t* pp = reinterpret_cast<uint32_t*>(sc);
  for (int64_t p = 0; p < pairs; ++p)
    for (int v = 0; v < NV; ++v) {
      const __m512 e0 = _mm512_loadu_ps(sc + 2 * p * lanes + v * 16);
      const __m512 e1 = _mm512_loadu_ps(sc + (2 * p + 1) * lanes + v * 16);
      const __m512i b0 = BF16::bits16(_mm512_mul_ps(e0, inv[v]));
      const __m512i b1 = BF16::bits16(_mm512_mul_ps(e1, inv[v]));
      _mm512_storeu_si512(pp + p * lanes + v * 16, _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16)));
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
#endif

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

// Sum of squares of n floats.
inline float sum_squares(const float* x, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if PC_AVX512
  __m512 a = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    a = _mm512_fmadd_ps(v, v, a);
  }
  s = _mm512_reduce_add_ps(a);
#endif
  for (; i < n; ++i) s += x[i] * x[i];
  return s;
}

// The two RMSNorms of the model families, on one row xf (float32) of n, into out:
//   OFFSET (Gemma): out = T(x * r * w) with w = 1 + weight in float32;
//   PLAIN (Llama): out = T(T(x * r) * w) with w in the storage type (PyTorch: weight *
//   F.rms_norm(x), the norm rounded once, then the product rounded).
// r = 1 / sqrt(mean(x^2) + eps). Returns nothing; w is the row of weights to use.
enum NormMode { OFFSET = 0, PLAIN = 1 };

template <class S>
void norm_row(const float* xf, int64_t n, const void* w, float eps, int mode,
              typename S::T* out) {
  const float r = 1.0f / std::sqrt(sum_squares(xf, n) / static_cast<float>(n) + eps);
  int64_t i = 0;
  if (mode == OFFSET) {
    const float* wf = static_cast<const float*>(w);
#if PC_AVX512
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xf + i), _mm512_set1_ps(r));
      S::store16(out + i, _mm512_mul_ps(v, _mm512_loadu_ps(wf + i)));
    }
#endif
    for (; i < n; ++i) out[i] = S::store(xf[i] * r * wf[i]);
  } else {
    const typename S::T* wt = static_cast<const typename S::T*>(w);
#if PC_AVX512
    for (; i + 16 <= n; i += 16) {
      const __m512 v = S::round16(_mm512_mul_ps(_mm512_loadu_ps(xf + i), _mm512_set1_ps(r)));
      S::store16(out + i, _mm512_mul_ps(v, S::load16(wt + i)));
    }
#endif
    for (; i < n; ++i) out[i] = S::store(S::round(xf[i] * r) * S::load(wt[i]));
  }
}

// out [rows, n] = norm(x) for x [rows, n] (row stride x_stride).
template <class S>
void rms_norm(const typename S::T* x, int64_t x_stride, int64_t rows, int64_t n, const void* w,
              float eps, int mode, typename S::T* out) {
#pragma omp parallel if (rows > 1 && rows * n >= PARALLEL_MIN_NORM)
  {
    std::vector<float> xf(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const typename S::T* xr = x + r * x_stride;
      load_row<S>(xr, n, xf.data());
      norm_row<S>(xf.data(), n, w, eps, mode, out + r * n);
    }
  }
}

// The residual stream's step between two parts of a layer, per row:
//   x_out = T(x + (w1 ? norm1(a) : a)),  h_out = norm2(x_out)
// (Gemma: x + post_norm(a), then the next pre_norm; Llama: x + a, then the next norm).
// x, a, x_out, h_out: [rows, n] contiguous.
template <class S>
void residual_norm(const typename S::T* x, const typename S::T* a, int64_t rows, int64_t n,
                   const void* w1, float eps1, const void* w2, float eps2, int mode,
                   typename S::T* x_out, typename S::T* h_out) {
  using T = typename S::T;
#pragma omp parallel if (rows > 1 && rows * n >= PARALLEL_MIN_NORM)
  {
    std::vector<float> af(n), xf(n);
    std::vector<T> an(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * n;
      const T* ar = a + r * n;
      T* xo = x_out + r * n;
      if (w1) {
        load_row<S>(ar, n, af.data());
        norm_row<S>(af.data(), n, w1, eps1, mode, an.data());
        ar = an.data();
      }
      int64_t i = 0;
#if PC_AVX512
      for (; i + 16 <= n; i += 16) {
        const __m512 v = S::round16(_mm512_add_ps(S::load16(xr + i), S::load16(ar + i)));
        _mm512_storeu_ps(xf.data() + i, v);
        S::store16(xo + i, v);
      }
#endif
      for (; i < n; ++i) {
        const float v = S::round(S::load(xr[i]) + S::load(ar[i]));
        xf[i] = v;
        xo[i] = S::store(v);
      }
      norm_row<S>(xf.data(), n, w2, eps2, mode, h_out + r * n);
    }
  }
}

// q and k of one step, normalised per head (table: [heads, D] of norm weights; mode < 0: no
// norm) and rotated (cos, sin: [rows, D] in the storage type, sin's first half negated; null:
// no rotation), as layers.HeadNorm and layers.apply_rope round:
//   out = T(T(n * cos) + T(roll(n, D/2) * sin)).
// qk: [rows, heads, D] with row stride qk_stride; out: [rows, heads, D] contiguous.
template <class S>
void qk_norm_rope(const typename S::T* qk, int64_t qk_stride, int64_t rows, int64_t heads,
                  int64_t D, const void* table, float eps, int mode, const typename S::T* cos,
                  const typename S::T* sin, typename S::T* out) {
  using T = typename S::T;
  const int64_t half = D / 2;
  const size_t row_bytes = static_cast<size_t>(D) * sizeof(T);
#pragma omp parallel if (rows > 1 && rows * heads * D >= PARALLEL_MIN_WORK)
  {
    std::vector<float> xf(D);
    std::vector<T> normed(D);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        const T* x = qk + r * qk_stride + h * D;
        T* o = out + (r * heads + h) * D;
        const T* n = x;
        if (mode >= 0) {
          load_row<S>(x, D, xf.data());
          const size_t w_size = mode == OFFSET ? sizeof(float) : sizeof(T);
          const void* w = static_cast<const char*>(table) + static_cast<size_t>(h * D) * w_size;
          norm_row<S>(xf.data(), D, w, eps, mode, normed.data());
          n = normed.data();
        }
        if (!cos) {
          std::memcpy(o, n, row_bytes);
          continue;
        }
        const T* c = cos + r * D;
        const T* s = sin + r * D;
        // roll(n, D/2): the first half reads the second and the second the first.
        for (int64_t part = 0; part < 2; ++part) {
          const int64_t lo = part * half, shift = part ? -half : half;
          int64_t i = lo;
#if PC_AVX512
          for (; i + 16 <= lo + half; i += 16) {
            const __m512 kept = S::round16(_mm512_mul_ps(S::load16(n + i), S::load16(c + i)));
            const __m512 turned =
                S::round16(_mm512_mul_ps(S::load16(n + i + shift), S::load16(s + i)));
            S::store16(o + i, _mm512_add_ps(kept, turned));
          }
#endif
          for (; i < lo + half; ++i) {
            const float turned = S::round(S::load(n[i + shift]) * S::load(s[i]));
            o[i] = S::store(S::round(S::load(n[i]) * S::load(c[i])) + turned);
          }
        }
      }
    }
  }
}

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
#if PC_AVX512
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

#if PC_PAIRED
// bfloat16 of every magnitude 0..127, split in bytes (low, high): the paired weights convert
// to bfloat16 by two 128-byte table lookups (vpermi2b reads an index's low 7 bits alone).
struct PairTables {
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
  PairTables() {
    for (int m = 0; m < 128; ++m) {
      const uint16_t h = float_to_bf16(static_cast<float>(m));
      lo[m] = static_cast<uint8_t>(h & 0xff);
      hi[m] = static_cast<uint8_t>(h >> 8);
    }
  }
};
const PairTables kPairTables;

// q [N, K] int8 (-127..127) laid out for paired_block (native_decode.pair_weight): byte
// 16 l + 8 s + i of the 64 for steps (2 j, 2 j + 1) of a block of 16 rows is value 8 l + i
// (row / 2, input % 2) of step 2 j + s, as sign and magnitude. N a multiple of 16, K of 4.
void pair_int8(const int8_t* q, int64_t N, int64_t K, uint8_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t nb = 0; nb < N / 16; ++nb) {
    const int8_t* rows = q + nb * 16 * K;
    uint8_t* o = out + nb * 16 * K;
    for (int64_t j = 0; j < K / 4; ++j, o += 64)
      for (int l = 0; l < 4; ++l)
        for (int s = 0; s < 2; ++s)
          for (int i = 0; i < 8; ++i) {
            const int e = 8 * l + i;
            const int v = rows[(e / 2) * K + 4 * j + 2 * s + e % 2];
            o[16 * l + 8 * s + i] = static_cast<uint8_t>(v < 0 ? 0x80 | -v : v);
          }
  }
}

// 16 output rows n0 .. n0 + 15 of gemv_int8_paired for BN (compile-time) activation rows.
// Each 64 bytes of p hold two steps kp, kp + 1 of 16 rows x 2 inputs as sign-and-magnitude
// bytes (pair_weight), ordered so that interleaving the low and high bytes of their bfloat16
// (unpacklo/hi work within 128-bit lanes) gives step kp's 32 values, then step kp + 1's: 5
// instructions convert 64 weights, where widening to float and packing took 12 (the 8-row
// step is compute-bound, one row memory-bound).
template <int BN>
inline void paired_block(const uint16_t* x, int64_t K, const uint8_t* p, const uint16_t* scales,
                         const uint16_t* bias, int64_t n0, int64_t N, uint16_t* y) {
  __m512 a[BN];
  const uint32_t* xp[BN];
  for (int b = 0; b < BN; ++b) {
    a[b] = _mm512_setzero_ps();
    xp[b] = reinterpret_cast<const uint32_t*>(x + b * K);
  }
  const __m512i lo0 = _mm512_load_si512(kPairTables.lo), lo1 = _mm512_load_si512(kPairTables.lo + 64);
  const __m512i hi0 = _mm512_load_si512(kPairTables.hi), hi1 = _mm512_load_si512(kPairTables.hi + 64);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t kp = 0; kp < K / 2; kp += 2) {
    // The weights are read once, in order; the hardware prefetcher alone keeps too few lines
    // in flight once there are a few rows' products to compute per line (8 rows: 7.9 -> 5.3
    // ms for Gemma 3 270M's layers on 2 cores, one row 5.0 -> 3.4 ms).
    _mm_prefetch(reinterpret_cast<const char*>(p + kp * 32 + PREFETCH_AHEAD), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(p + kp * 32);
    const __m512i lo = _mm512_permutex2var_epi8(lo0, v, lo1);
    // hi | (v & 0x80): the sign bit back on the magnitude's high byte.
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, v, hi1), v, sign, 0xf8);
    const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
    const __m512bh w1 = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
    for (int b = 0; b < BN; ++b)
      a[b] = _mm512_dpbf16_ps(a[b], (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[b][kp])), w0);
    for (int b = 0; b < BN; ++b)
      a[b] = _mm512_dpbf16_ps(a[b], (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[b][kp + 1])), w1);
  }
  const __m512 s = BF16::load16(scales + n0);
  for (int b = 0; b < BN; ++b) {
    __m512 v = BF16::round16(_mm512_mul_ps(a[b], s));
    if (bias) v = BF16::round16(_mm512_add_ps(v, BF16::load16(bias + n0)));
    BF16::store16(y + b * N + n0, v);
  }
}

// gemv_int8 over weights paired for vdpbf16ps: p [N / 16, K / 2, 16, 2] (16 output rows side
// by side, two input columns each; bytes reordered by pairs of steps, see paired_block), so
// that a pair of an activation row broadcast to every lane multiplies 16 rows' pairs at once
// and each lane accumulates its own output: no horizontal sums, the activation read as 4-byte
// broadcasts. Each output accumulates its K products pairwise in float32 in k order, whatever
// B. N a multiple of 16, K of 4.
void gemv_int8_paired(const uint16_t* x, int64_t B, int64_t K, const uint8_t* p,
                      const uint16_t* scales, const uint16_t* bias, int64_t N, uint16_t* y) {
  for (int64_t b0 = 0; b0 < B; b0 += 8) {
    const uint16_t* xb = x + b0 * K;
    uint16_t* yb = y + b0 * N;
    const int64_t bn = B - b0 < 8 ? B - b0 : 8;
#pragma omp parallel for schedule(static) if (N * K >= PARALLEL_MIN_WORK)
    for (int64_t nb = 0; nb < N / 16; ++nb) {
      const uint8_t* pb = p + nb * 16 * K;
      switch (bn) {
#define PC_ROWS(r)                                              \
  case r:                                                       \
    paired_block<r>(xb, K, pb, scales, bias, nb * 16, N, yb);   \
    break;
        PC_ROWS(1) PC_ROWS(2) PC_ROWS(3) PC_ROWS(4) PC_ROWS(5) PC_ROWS(6) PC_ROWS(7) PC_ROWS(8)
#undef PC_ROWS
      }
    }
  }
}
#endif  // PC_PAIRED
#endif

template <class S>
void to_float(const typename S::T* x, int64_t n, float* out) {
  load_row<S>(x, n, out);
}

// y = x W^T (+ bias) through whichever gemv_int8 suits x's type; xf: scratch of [B, K] floats.
template <class S>
void project(const typename S::T* x, float* xf, int64_t B, int64_t K, const int8_t* w,
             const int8_t* paired, const void* scales, const void* bias, int64_t N,
             typename S::T* y) {
  using T = typename S::T;
#if PC_DPBF16
  if constexpr (std::is_same_v<S, BF16>) {
#if PC_PAIRED
    if (paired && N % 16 == 0 && K % 4 == 0) {
      gemv_int8_paired(x, B, K, reinterpret_cast<const uint8_t*>(paired), static_cast<const uint16_t*>(scales),
                       static_cast<const uint16_t*>(bias), N, y);
      return;
    }
#endif
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

enum Act { GELU_TANH = 0, SILU = 1 };

// The gated MLP's middle, per row: out = T(T(act(gate)) * up) for gu = [gate | up] ([B, 2I]),
// as PyTorch's F.gelu(approximate="tanh") / F.silu in float32, rounded, times up, rounded.
template <class S>
void gated_act(const typename S::T* gu, int64_t B, int64_t I, int act, typename S::T* out,
               int64_t out_stride) {
#pragma omp parallel for schedule(static) if (B > 1 && B * I >= PARALLEL_MIN_WORK)
  for (int64_t b = 0; b < B; ++b) {
    const typename S::T* g = gu + b * 2 * I;
    const typename S::T* u = g + I;
    typename S::T* o = out + b * out_stride;
    int64_t i = 0;
#if PC_AVX512
    for (; i + 16 <= I; i += 16) {
      const __m512 x = S::load16(g + i);
      __m512 y;
      if (act == GELU_TANH) {
        // tanh(z) = 1 - 2 / (exp(2z) + 1)
        const __m512 z = _mm512_mul_ps(
            _mm512_set1_ps(0.7978845608028654f),
            _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
        const __m512 e = exp16(_mm512_add_ps(z, z));
        const __m512 t = _mm512_sub_ps(
            _mm512_set1_ps(1.0f),
            _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
        y = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                          _mm512_add_ps(_mm512_set1_ps(1.0f), t));
      } else {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
      }
      S::store16(o + i, _mm512_mul_ps(S::round16(y), S::load16(u + i)));
    }
#endif
    for (; i < I; ++i) {
      const float x = S::load(g[i]);
      float y;
      if (act == GELU_TANH) {
        y = 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
      } else {
        y = x / (1.0f + std::exp(-x));
      }
      o[i] = S::store(S::round(y) * S::load(u[i]));
    }
  }
}

// Attention probabilities of a prompt chunk, per row of scores [R, W] (the storage type, as
// the product q k^T rounded): p = T(softmax(float(s) * scale + mask[r % mask_rows])), mask an
// additive float32 [mask_rows, W] shared by every head (null: none). As attention.grouped
// computes them in PyTorch: scores to float32, scaled, masked, softmax, rounded.
template <class S>
void scale_mask_softmax(const typename S::T* scores, int64_t R, int64_t W, const float* mask,
                        int64_t mask_rows, float scale, typename S::T* probs) {
#pragma omp parallel if (R > 1 && R * W >= PARALLEL_MIN_WORK)
  {
    std::vector<float> row(W);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const typename S::T* sr = scores + r * W;
      const float* mr = mask ? mask + (r % mask_rows) * W : nullptr;
#if PC_AVX512
      // softmax_rows' arithmetic in three passes over the row, not five: the maximum found
      // as the scores are scaled and masked, the probabilities rounded straight into probs.
      const __m512 vs = _mm512_set1_ps(scale);
      const __m512 none = _mm512_set1_ps(-INFINITY);
      __m512 vmx = none;
      float* rw = row.data();
      for (int64_t j = 0; j < W; j += 16) {
        const __mmask16 k = lanes(j, W);
        const __m512 m = mr ? _mm512_maskz_loadu_ps(k, mr + j) : _mm512_setzero_ps();
        const __m512 v = _mm512_fmadd_ps(S::load16(k, sr + j), vs, m);
        _mm512_mask_storeu_ps(rw + j, k, v);
        vmx = _mm512_mask_max_ps(vmx, k, vmx, v);
      }
      const __m512 inv = exps_in_place(rw, W, _mm512_reduce_max_ps(vmx));
      typename S::T* pr = probs + r * W;
      for (int64_t j = 0; j < W; j += 16) {
        const __mmask16 k = lanes(j, W);
        S::store16(pr + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, rw + j), inv));
      }
#else
      for (int64_t j = 0; j < W; ++j) row[j] = S::load(sr[j]) * scale + (mr ? mr[j] : 0.0f);
      softmax_rows<S>(row.data(), 1, W);
      store_row<S>(row.data(), W, probs + r * W);
#endif
    }
  }
}

// The largest of a row's W floats (-inf for none), and whether any is a NaN (into nan).
inline float row_max(const float* row, int64_t W, bool& nan) {
#if PC_AVX512
  const __m512 none = _mm512_set1_ps(-INFINITY);
  __m512 vmax = none;
  __mmask16 unordered = 0;
  for (int64_t j = 0; j < W; j += 16) {
    const __m512 v = _mm512_mask_loadu_ps(none, lanes(j, W), row + j);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, v);
  }
  nan = unordered != 0;
  return _mm512_reduce_max_ps(vmax);
#else
  float best = -INFINITY;
  nan = false;
  for (int64_t j = 0; j < W; ++j) {
    nan |= row[j] != row[j];
    best = row[j] > best ? row[j] : best;
  }
  return best;
#endif
}

// The index of each row's largest value of x [R, W] (float32), the first on ties, as
// torch.argmax; -1 for a row with a NaN (the caller asks PyTorch, which ranks NaN highest).
void argmax_rows(const float* x, int64_t R, int64_t W, int64_t* out) {
#pragma omp parallel for schedule(static) if (R > 1 && R * W >= PARALLEL_MIN_WORK)
  for (int64_t r = 0; r < R; ++r) {
    const float* row = x + r * W;
    bool nan = false;
    const float best = row_max(row, W, nan);
    int64_t at = -1;
    if (!nan) {
      for (int64_t j = 0; j < W; ++j) {
        if (row[j] == best) {
          at = j;
          break;
        }
      }
    }
    out[r] = at;
  }
}

// argmax_rows of x [R, W] where each row's maxima over blocks of `block` columns are known,
// bmax [R, W / block], except in the blocks holding one of the row's k columns `touched`
// [R, k] (written since: RescoredHead's exact candidates), which are searched here: a row
// reads its ~W / block maxima and k blocks, not W values. -1 for a row with a NaN in what
// it reads, or whose every value is -inf (the caller searches those rows whole).
void argmax_blocks(const float* x, int64_t R, int64_t W, const float* bmax, int64_t block,
                   const int64_t* touched, int64_t k, int64_t* out) {
  const int64_t nb = W / block;
  std::vector<uint8_t> dirty(nb);
  for (int64_t r = 0; r < R; ++r) {
    const float* row = x + r * W;
    const float* rmax = bmax + r * nb;
    std::fill(dirty.begin(), dirty.end(), 0);
    for (int64_t i = 0; i < k; ++i) dirty[touched[r * k + i] / block] = 1;
    float best = -INFINITY;
    int64_t at = -1;
    bool nan = false;
    for (int64_t b = 0; b < nb && !nan; ++b) {
      float v = rmax[b];
      if (dirty[b]) {
        v = -INFINITY;
        for (int64_t j = b * block; j < (b + 1) * block; ++j) {
          nan |= row[j] != row[j];
          v = row[j] > v ? row[j] : v;
        }
      }
      nan |= v != v;
      if (v > best) {  // a later block only wins when strictly higher: the first on ties
        best = v;
        at = b;
      }
    }
    if (nan || at < 0) {
      out[r] = -1;
      continue;
    }
    int64_t j = at * block;
    while (row[j] != best) ++j;
    out[r] = j;
  }
}

// The decode rows' keys for one window (attention.PagedAttention._decode_keys): row b sees
// positions lo_b .. starts[b] (lo_b = starts[b] + 1 - window, at least 0; window 0: all),
// packed from the left into slots [B, W] through its block table (tables [B, N], block_tokens
// bt); the rest of the row reads slot 0 (the null block), masked: valid [B, W] (1 / 0) and
// additive [B, W] (0 / -inf).
void decode_plan(const int64_t* tables, int64_t B, int64_t N, const int64_t* starts, int64_t bt,
                 int64_t window, int64_t W, int64_t* slots, uint8_t* valid, float* additive) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = starts[b] + 1;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, end - window) : 0;
    const int64_t* table = tables + b * N;
    for (int64_t i = 0; i < W; ++i) {
      const int64_t pos = lo + i;
      const bool seen = pos < end;
      const int64_t blk = std::min(pos / bt, N - 1);
      slots[b * W + i] = seen ? table[blk] * bt + pos % bt : 0;
      valid[b * W + i] = seen;
      additive[b * W + i] = seen ? 0.0f : -INFINITY;
    }
  }
}

// A prefill chunk's keys for one window (attention.PagedAttention._prefill_keys): the slots of
// positions lo .. end - 1 through the chunk's block table (blocks, block_tokens bt) into slots
// [end - lo]; with mask (not null), which of them each query start .. end - 1 sees, [end -
// start, end - lo] (1 / 0): a key at or before the query's position and, with a window (0:
// none), within its last `window` positions.
void prefill_plan(const int64_t* blocks, int64_t bt, int64_t lo, int64_t start, int64_t end,
                  int64_t window, int64_t* slots, uint8_t* mask) {
  const int64_t L = end - lo;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t pos = lo + i;
    slots[i] = blocks[pos / bt] * bt + pos % bt;
  }
  if (!mask) return;
  for (int64_t q = start; q < end; ++q) {
    uint8_t* row = mask + (q - start) * L;
    for (int64_t i = 0; i < L; ++i) {
      const int64_t k = lo + i;
      row[i] = k <= q && (window <= 0 || k > q - window);
    }
  }
}

#if PC_DPBF16
// The rest of RescoredHead.scores_and_greedy after int4_logits took its block maxima, per row
// of x [B, K] (bfloat16, K a multiple of 32), in one call where PyTorch's topk, gather, bmm,
// scatter and argmax took ~0.5 ms a row (1.1 ms for 8):
// - the k columns of the highest approximate scores (top_indices' two passes: the k blocks of
//   the highest maxima, the lower block first on ties and NaN highest, as topk ranks them;
//   then the k highest of their columns, likewise);
// - their exact logits: the row against the dense weight's rows [V, K] (bfloat16 products
//   summed in float32, rounded to bfloat16 as the dense matmul rounds), written over the
//   approximate ones in scores [B, V];
// - the row's argmax through argmax_blocks (-1 where a NaN leaves it to PyTorch).
// Each row depends on its own scores alone.
void int4_rescore(float* scores, int64_t B, int64_t V, const float* bmax, int64_t block,
                  const uint16_t* x, int64_t K, const uint16_t* weight, int64_t k,
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
    const uint16_t* xr = x + r * K;
    for (int64_t i = 0; i < kc; ++i) {
      const int64_t c = cols[i];
      const uint16_t* w = weight + c * K;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < K; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(xr + d),
                               (__m512bh)_mm512_loadu_si512(w + d));
      row[c] = round_bf16(_mm512_reduce_add_ps(acc));
      top[i] = c;
    }
    argmax_blocks(row, 1, V, rmax, block, top.data(), kc, greedy + r);
  }
}
#endif

// One token drawn per row of logits x [R, W] (float32) from softmax(x * inv_temp[r]), at the
// uniform draw u[r] in [0, 1): the first index whose cumulative probability passes u (as
// sampling.draw, whose arithmetic this is: exps in float32, their sums in float64), in two
// passes over the row (the maximum; the exps and their sums per 16, kept) and a search of
// the sums, where PyTorch's softmax, cumsum and searchsorted take ~1 ms over 262k logits.
// An index of probability 0 is never drawn, nor one below e^-88 of the most likely (exp16's
// 0; PyTorch's softmax gives it a float32 denormal). -1 for a row with a NaN or nothing finite
// (the caller asks PyTorch).
void sample_rows(const float* x, int64_t R, int64_t W, const float* inv_temp, const double* u,
                 int64_t* out) {
#pragma omp parallel if (R > 1 && R * W >= PARALLEL_MIN_WORK)
  {
    std::vector<float> e(W);
    std::vector<double> part((W + 15) / 16);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float* row = x + r * W;
      bool nan = false;
      const float mx = row_max(row, W, nan);
      if (nan || !(mx > -INFINITY) || mx == INFINITY) {
        out[r] = -1;
        continue;
      }
      const float t = inv_temp[r];
      double total = 0.0;
      for (int64_t b = 0; b * 16 < W; ++b) {
        double sum = 0.0;
#if PC_AVX512
        const __mmask16 k = lanes(b * 16, W);
        const __m512 v = _mm512_maskz_loadu_ps(k, row + b * 16);
        // Masked lanes are exp(-inf) = 0 (exp16 is exactly 0 below -88).
        const __m512 z = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), k,
                                            _mm512_sub_ps(v, _mm512_set1_ps(mx)),
                                            _mm512_set1_ps(t));
        const __m512 ev = exp16(z);
        _mm512_mask_storeu_ps(e.data() + b * 16, k, ev);
        alignas(64) float lane[16];
        _mm512_store_ps(lane, ev);
        for (int i = 0; i < 16; ++i) sum += lane[i];
#else
        for (int64_t j = b * 16; j < std::min(W, b * 16 + 16); ++j) {
          e[j] = exp1((row[j] - mx) * t);
          sum += e[j];
        }
#endif
        part[b] = sum;
        total += sum;
      }
      const double target = u[r] * total;
      // The cumulative sum goes block by block, then element by element inside the block
      // where it passes the target, summed from 0 in the block's order: at the block's end it
      // is the block's sum exactly, so the target is passed inside it.
      int64_t at = -1;
      double cum = 0.0;
      for (int64_t b = 0; b * 16 < W && at < 0; ++b) {
        if (cum + part[b] <= target) {
          cum += part[b];
          continue;
        }
        double within = 0.0;
        for (int64_t j = b * 16; j < std::min(W, b * 16 + 16); ++j) {
          within += e[j];
          if (e[j] > 0.0f && cum + within > target) {
            at = j;
            break;
          }
        }
      }
      // A draw rounded up to the total passes nothing: the last index with any probability.
      for (int64_t j = W - 1; at < 0 && j >= 0; --j)
        if (e[j] > 0.0f) at = j;
      out[r] = at;
    }
  }
}


#if PC_AVX512 && defined(__AVX512VNNI__)
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
//   sl [N / 16, K / 64, 2, 16] bfloat16: the 16 rows' scales, then their lows.
// Each row's scores depend on that row alone (the products are exact integers, the float sums
// go in group order), so a row scores alike in any batch. K a multiple of 64, N of 16.
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
    __m512i d[BN];
    for (int b = 0; b < BN; ++b) d[b] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(pg + j * 64 + PREFETCH_AHEAD), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(pg + j * 64);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      for (int b = 0; b < BN; ++b) {
        const int32_t* ab = reinterpret_cast<const int32_t*>(a + b * K + g * 64 + j * 8);
        d[b] = _mm512_dpbusd_epi32(d[b], lo, _mm512_set1_epi32(ab[0]));
        d[b] = _mm512_dpbusd_epi32(d[b], hi, _mm512_set1_epi32(ab[1]));
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

// The 8 x 16 output rows of one block of INT4_TOP_BLOCK scores for BN activation rows, and
// each row's largest score of the block into block_max [B, N / INT4_TOP_BLOCK] (when not null).
constexpr int64_t INT4_TOP_BLOCK = 128;

template <int BN>
inline void int4_top_block(const int8_t* a, const float* alpha, const float* alpha_sum,
                           int64_t K, const uint8_t* packed, const uint16_t* sl, float* y,
                           int64_t blk, int64_t N, float* block_max) {
  __m512 top[BN];
  for (int b = 0; b < BN; ++b) top[b] = _mm512_set1_ps(-INFINITY);
  for (int64_t nb = blk * 8; nb < blk * 8 + 8; ++nb)
    int4_block<BN>(a, alpha, alpha_sum, K, packed + nb * 8 * K, sl + nb * 2 * K / 4, y, nb * 16,
                   N, top);
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
    load_row<S>(x + b * K, K, row.data());
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = row.data() + g * 64;
      float big = 0.0f;
      for (int i = 0; i < 64; ++i) big = std::max(big, std::fabs(xg[i]));
      const float step = big / 127.0f;
      const float inv = big > 0.0f ? 127.0f / big : 0.0f;
      int32_t sum = 0;
      for (int i = 0; i < 64; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(xg[i] * inv));
        a[b * K + g * 64 + i] = static_cast<int8_t>(std::clamp(q, -127, 127));
        sum += a[b * K + g * 64 + i];
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
#pragma omp parallel for schedule(static)
      for (int64_t blk = 0; blk < N / INT4_TOP_BLOCK; ++blk) {
        switch (bn) {
#define PC_ROWS(r)                                                       \
  case r:                                                                \
    int4_top_block<r>(ab, al, as, K, packed, sl, yb, blk, N, mb);        \
    break;
          PC_ROWS(1) PC_ROWS(2) PC_ROWS(3) PC_ROWS(4) PC_ROWS(5) PC_ROWS(6) PC_ROWS(7) PC_ROWS(8)
#undef PC_ROWS
        }
      }
      continue;
    }
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < N / 16; ++nb) {
      const uint8_t* pb = packed + nb * 8 * K;
      const uint16_t* sb = sl + nb * 2 * K / 4;
      __m512 top[8] = {};  // block maxima not wanted here
      switch (bn) {
#define PC_ROWS(r)                                              \
  case r:                                                       \
    int4_block<r>(ab, al, as, K, pb, sb, yb, nb * 16, N, top);  \
    break;
        PC_ROWS(1) PC_ROWS(2) PC_ROWS(3) PC_ROWS(4) PC_ROWS(5) PC_ROWS(6) PC_ROWS(7) PC_ROWS(8)
#undef PC_ROWS
      }
    }
  }
}
#else
#define PC_INT4_HEAD 0
#endif

}  // namespace

// One layer of a whole step, as the Python side lays it out (native_decode.py's LayerStruct).
struct PcLayer {
  const int8_t* w[4];       // int8 weights: qkv, o, gate_up, down
  const int8_t* paired[4];  // the same paired for vdpbf16ps (gemv_int8_paired), or null
  const void* scales[4];    // their per-row scales (storage type)
  const void* bias[4];      // their biases or null
  const void* norm_w[4];    // Gemma: input, post-attention, pre-MLP, post-MLP norms;
                            // Llama: input, (null), post-attention, (null)
  float norm_eps[4];
  const void* head_norm;    // q/k norm table [heads + kv_heads, D] or null
  float head_eps;
  int rope;                 // index of the step's cos/sin, or -1
  int window;               // index of the step's key slots and mask
  float scale;              // softmax scale
  void* keys;               // the pool's keys and values of this layer: [slots, KVH, D]
  void* values;
  const uint16_t* dense[4]; // prefill_step: the dense bfloat16 weights laid out for gemm_bf16
  int64_t dense_block[4];   // and their blocks (pairs) of the inputs, oneDNN's (calibrated)
};

struct PcModel {
  int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate;
  int norm_mode;            // NormMode
  int act;                  // Act
  const void* final_norm;
  float final_eps;
  const PcLayer* layers;
};

// The step's per-row inputs (native_decode.py's StepStruct).
struct PcStep {
  int64_t rows;
  const void* x;            // embeddings [rows, hidden] (scaled, for Gemma)
  const void* cos[4];       // per rope table: [rows, D]
  const void* sin[4];
  const int64_t* slot_mapping;   // [rows]: where each row's key and value go
  const int64_t* slots[4];  // per window: [rows, width]
  const float* masks[4];    // per window: [rows, width] additive, or null
  int64_t widths[4];
  void* out;                // final hidden states [rows, hidden] (after the final norm)
  // prefill_step (one chunk): per window, slots[w] holds the chunk's keys [widths[w]] from
  // position key_pos[w], masks[w] the last row's additive mask over them (or null); queries
  // from query_pos; keep: whether the last row is sampled (out: its hidden state, [1, hidden]).
  int64_t key_pos[4];
  int64_t window_len[4];    // the window's length, 0 for none
  int64_t query_pos;
  int64_t keep;
};

namespace {

template <class S>
void decode_step(const PcModel& m, const PcStep& st) {
  using T = typename S::T;
  const int64_t B = st.rows, E = m.hidden, H = m.heads, KVH = m.kv_heads, D = m.head_dim;
  const int64_t I = m.intermediate, QKV = (H + 2 * KVH) * D, QK = H + KVH;
  std::vector<T> x(B * E), h(B * E), x2(B * E), qkv(B * QKV), qk(B * QK * D), att(B * H * D),
      proj(B * std::max(2 * I, E)), mid(B * I);
  std::vector<float> xf(B * std::max({E, H * D, I}));
  std::memcpy(x.data(), st.x, sizeof(T) * B * E);
  const PcLayer& first = m.layers[0];
  rms_norm<S>(x.data(), E, B, E, first.norm_w[0], first.norm_eps[0], m.norm_mode, h.data());
  const bool gemma = m.norm_mode == OFFSET;
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const PcLayer& L = m.layers[l];
    project<S>(h.data(), xf.data(), B, E, L.w[0], L.paired[0], L.scales[0], L.bias[0], QKV, qkv.data());
    const T* cos = L.rope >= 0 ? static_cast<const T*>(st.cos[L.rope]) : nullptr;
    const T* sin = L.rope >= 0 ? static_cast<const T*>(st.sin[L.rope]) : nullptr;
    qk_norm_rope<S>(qkv.data(), QKV, B, QK, D, L.head_norm, L.head_eps,
                    L.head_norm ? m.norm_mode : -1, cos, sin, qk.data());
    T* keys = static_cast<T*>(L.keys);
    T* values = static_cast<T*>(L.values);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t slot = st.slot_mapping[b];
      std::memcpy(keys + slot * KVH * D, qk.data() + (b * QK + H) * D, sizeof(T) * KVH * D);
      std::memcpy(values + slot * KVH * D, qkv.data() + b * QKV + QK * D, sizeof(T) * KVH * D);
    }
    decode_attention<S>(qk.data(), QK * D, keys, values, st.slots[L.window],
                        st.masks[L.window], att.data(), B, H, KVH, D, st.widths[L.window],
                        L.scale);
    project<S>(att.data(), xf.data(), B, H * D, L.w[1], L.paired[1], L.scales[1], L.bias[1], E, proj.data());
    residual_norm<S>(x.data(), proj.data(), B, E, gemma ? L.norm_w[1] : nullptr, L.norm_eps[1],
                     L.norm_w[2], L.norm_eps[2], m.norm_mode, x2.data(), h.data());
    project<S>(h.data(), xf.data(), B, E, L.w[2], L.paired[2], L.scales[2], L.bias[2], 2 * I, proj.data());
    gated_act<S>(proj.data(), B, I, m.act, mid.data(), I);
    project<S>(mid.data(), xf.data(), B, I, L.w[3], L.paired[3], L.scales[3], L.bias[3], E, proj.data());
    const bool last = l + 1 == m.num_layers;
    const void* next_w = last ? m.final_norm : m.layers[l + 1].norm_w[0];
    const float next_eps = last ? m.final_eps : m.layers[l + 1].norm_eps[0];
    residual_norm<S>(x2.data(), proj.data(), B, E, gemma ? L.norm_w[3] : nullptr, L.norm_eps[3],
                     next_w, next_eps, m.norm_mode, x.data(),
                     last ? static_cast<T*>(st.out) : h.data());
  }
}

#if PC_DPBF16
// One prefill chunk of a bfloat16 model, every layer in one call: what the model's PyTorch
// forward computes for it with the engine's kernels (the same functions for the norms, rope,
// attention and activation; gemm_bf16 for oneDNN's products, the same sums), without the
// ~400 Python-level operations between them. The last layer writes every row's keys and
// values and finishes the last row alone when it is sampled (st.keep), as the PyTorch
// forward's `keep` does.
void prefill_step(const PcModel& m, const PcStep& st) {
  using S = BF16;
  using T = uint16_t;
  const int64_t n = st.rows, E = m.hidden, H = m.heads, KVH = m.kv_heads, D = m.head_dim;
  const int64_t I = m.intermediate, QKV = (H + 2 * KVH) * D, QK = H + KVH;
  // The products' inputs whose rows would lie a multiple of 2 KiB apart get a cache line
  // more a row: rows 4 KiB apart (Gemma 3 270M's MLP middle) all fall in one set of the L1
  // cache, and a tile of 12 of them evicts itself every line (the down product ran ~12% slower).
  const auto spread = [](int64_t k) { return (k * 2) % 2048 == 0 ? k + 32 : k; };
  const int64_t AS = spread(H * D), MS = spread(I);
  thread_local Scratch<T> x_s, h_s, x2_s, qkv_s, qk_s, att_s, proj_s, mid_s;
  x_s.reserve(n * E);
  h_s.reserve(n * E);
  x2_s.reserve(n * E);
  qkv_s.reserve(n * QKV);
  qk_s.reserve(n * QK * D);
  att_s.reserve(n * AS);
  proj_s.reserve(n * std::max(2 * I, E));
  mid_s.reserve(n * MS);
  T *x = x_s.data(), *h = h_s.data(), *x2 = x2_s.data(), *qkv = qkv_s.data(), *qk = qk_s.data();
  T *att = att_s.data(), *proj = proj_s.data(), *mid = mid_s.data();
  std::memcpy(x, st.x, sizeof(T) * n * E);
  const PcLayer& first = m.layers[0];
  rms_norm<S>(x, E, n, E, first.norm_w[0], first.norm_eps[0], m.norm_mode, h);
  const bool gemma = m.norm_mode == OFFSET;
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const PcLayer& L = m.layers[l];
    const bool last = l + 1 == m.num_layers;
    gemm_bf16(h, E, n, E, L.dense[0], QKV, L.dense_block[0], qkv, QKV);
    const T* cos = L.rope >= 0 ? static_cast<const T*>(st.cos[L.rope]) : nullptr;
    const T* sin = L.rope >= 0 ? static_cast<const T*>(st.sin[L.rope]) : nullptr;
    qk_norm_rope<S>(qkv, QKV, n, QK, D, L.head_norm, L.head_eps, L.head_norm ? m.norm_mode : -1,
                    cos, sin, qk);
    T* keys = static_cast<T*>(L.keys);
    T* values = static_cast<T*>(L.values);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t slot = st.slot_mapping[r];
      std::memcpy(keys + slot * KVH * D, qk + (r * QK + H) * D, sizeof(T) * KVH * D);
      std::memcpy(values + slot * KVH * D, qkv + r * QKV + QK * D, sizeof(T) * KVH * D);
    }
    const int w = L.window;
    int64_t rows = n;
    if (!last) {
      prefill_attention(qk, QK * D, n, H, KVH, D, keys, values, st.slots[w], st.widths[w],
                        st.key_pos[w], st.query_pos, st.window_len[w], L.scale, att, AS);
    } else {
      if (!st.keep) return;  // no row sampled: its keys and values were all it needed
      decode_attention<S>(qk + (n - 1) * QK * D, QK * D, keys, values, st.slots[w], st.masks[w],
                          att, 1, H, KVH, D, st.widths[w], L.scale);
      std::memmove(x, x + (n - 1) * E, sizeof(T) * E);
      rows = 1;
    }
    gemm_bf16(att, AS, rows, H * D, L.dense[1], E, L.dense_block[1], proj, E);
    residual_norm<S>(x, proj, rows, E, gemma ? L.norm_w[1] : nullptr, L.norm_eps[1],
                     L.norm_w[2], L.norm_eps[2], m.norm_mode, x2, h);
    gemm_bf16(h, E, rows, E, L.dense[2], 2 * I, L.dense_block[2], proj, 2 * I);
    gated_act<S>(proj, rows, I, m.act, mid, MS);
    gemm_bf16(mid, MS, rows, I, L.dense[3], E, L.dense_block[3], proj, E);
    const void* next_w = last ? m.final_norm : m.layers[l + 1].norm_w[0];
    const float next_eps = last ? m.final_eps : m.layers[l + 1].norm_eps[0];
    residual_norm<S>(x2, proj, rows, E, gemma ? L.norm_w[3] : nullptr, L.norm_eps[3], next_w,
                     next_eps, m.norm_mode, x, last ? static_cast<T*>(st.out) : h);
  }
}
#endif

}  // namespace

extern "C" {

// 1 when the vector paths are compiled in (the Python side uses these kernels only then: the
// portable loops are correct but not faster than PyTorch).
int pc_vectorized() { return PC_AVX512; }

void pc_decode_attention_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* keys,
                              const uint16_t* values, const int64_t* slots, const float* mask,
                              uint16_t* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                              int64_t W, float scale) {
  decode_attention<BF16>(q, q_stride, keys, values, slots, mask, out, B, H, KVH, D, W, scale);
}

void pc_decode_attention_f32(const float* q, int64_t q_stride, const float* keys,
                             const float* values, const int64_t* slots, const float* mask,
                             float* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t W,
                             float scale) {
  decode_attention<F32>(q, q_stride, keys, values, slots, mask, out, B, H, KVH, D, W, scale);
}

// 1 when prefill_attention is compiled in (AVX512-BF16).
int pc_prefill_attention_available() { return PC_DPBF16; }

#if PC_DPBF16
void pc_prefill_attention_bf16(const uint16_t* q, int64_t q_stride, int64_t n, int64_t H,
                               int64_t KVH, int64_t D, const uint16_t* keys,
                               const uint16_t* values, const int64_t* slots, int64_t L, int64_t k0,
                               int64_t q0, int64_t window, float scale, uint16_t* out,
                               int64_t out_stride) {
  prefill_attention(q, q_stride, n, H, KVH, D, keys, values, slots, L, k0, q0, window, scale, out,
                    out_stride);
}
#endif

#define PC_NORMS(name, T, S)                                                                  \
  void pc_rms_norm_##name(const T* x, int64_t x_stride, int64_t rows, int64_t n, const void* w, \
                          float eps, int mode, T* out) {                                      \
    rms_norm<S>(x, x_stride, rows, n, w, eps, mode, out);                                     \
  }                                                                                           \
  void pc_residual_norm_##name(const T* x, const T* a, int64_t rows, int64_t n, const void* w1, \
                               float eps1, const void* w2, float eps2, int mode, T* x_out,    \
                               T* h_out) {                                                    \
    residual_norm<S>(x, a, rows, n, w1, eps1, w2, eps2, mode, x_out, h_out);                  \
  }                                                                                           \
  void pc_qk_norm_rope_##name(const T* qk, int64_t qk_stride, int64_t rows, int64_t heads,    \
                              int64_t D, const void* table, float eps, int mode, const T* cos, \
                              const T* sin, T* out) {                                         \
    qk_norm_rope<S>(qk, qk_stride, rows, heads, D, table, eps, mode, cos, sin, out);          \
  }

PC_NORMS(bf16, uint16_t, BF16)
PC_NORMS(f32, float, F32)

void pc_gated_act_bf16(const uint16_t* gu, int64_t rows, int64_t I, int act, uint16_t* out) {
  gated_act<BF16>(gu, rows, I, act, out, I);
}
void pc_gated_act_f32(const float* gu, int64_t rows, int64_t I, int act, float* out) {
  gated_act<F32>(gu, rows, I, act, out, I);
}
void pc_scale_mask_softmax_bf16(const uint16_t* scores, int64_t R, int64_t W, const float* mask,
                                int64_t mask_rows, float scale, uint16_t* probs) {
  scale_mask_softmax<BF16>(scores, R, W, mask, mask_rows, scale, probs);
}
void pc_scale_mask_softmax_f32(const float* scores, int64_t R, int64_t W, const float* mask,
                               int64_t mask_rows, float scale, float* probs) {
  scale_mask_softmax<F32>(scores, R, W, mask, mask_rows, scale, probs);
}

void pc_argmax_rows(const float* x, int64_t R, int64_t W, int64_t* out) {
  argmax_rows(x, R, W, out);
}

void pc_sample_rows(const float* x, int64_t R, int64_t W, const float* inv_temp, const double* u,
                    int64_t* out) {
  sample_rows(x, R, W, inv_temp, u, out);
}

void pc_argmax_blocks(const float* x, int64_t R, int64_t W, const float* bmax, int64_t block,
                      const int64_t* touched, int64_t k, int64_t* out) {
  argmax_blocks(x, R, W, bmax, block, touched, k, out);
}

void pc_decode_plan(const int64_t* tables, int64_t B, int64_t N, const int64_t* starts,
                    int64_t bt, int64_t window, int64_t W, int64_t* slots, uint8_t* valid,
                    float* additive) {
  decode_plan(tables, B, N, starts, bt, window, W, slots, valid, additive);
}

void pc_prefill_plan(const int64_t* blocks, int64_t bt, int64_t lo, int64_t start, int64_t end,
                     int64_t window, int64_t* slots, uint8_t* mask) {
  prefill_plan(blocks, bt, lo, start, end, window, slots, mask);
}

// 1 when int4_rescore is compiled in (AVX512-BF16).
int pc_int4_rescore_available() { return PC_DPBF16; }
#if PC_DPBF16
void pc_int4_rescore(float* scores, int64_t B, int64_t V, const float* bmax, int64_t block,
                     const uint16_t* x, int64_t K, const uint16_t* weight, int64_t k,
                     int64_t* greedy) {
  int4_rescore(scores, B, V, bmax, block, x, K, weight, k, greedy);
}
#endif

// 1 when bfloat16 steps multiply weights paired for vdpbf16ps (gemv_int8_paired).
int pc_paired() { return PC_PAIRED; }

// 1 when int4_logits is compiled in (AVX512-VNNI).
int pc_int4_head() { return PC_INT4_HEAD; }

#if PC_INT4_HEAD
void pc_int4_logits_bf16(const uint16_t* x, int64_t B, int64_t K, const uint8_t* packed,
                         const uint16_t* sl, int64_t N, float* out, float* block_max) {
  int4_logits<BF16>(x, B, K, packed, sl, N, out, block_max);
}
void pc_int4_logits_f32(const float* x, int64_t B, int64_t K, const uint8_t* packed,
                        const uint16_t* sl, int64_t N, float* out, float* block_max) {
  int4_logits<F32>(x, B, K, packed, sl, N, out, block_max);
}
int64_t pc_int4_top_block() { return INT4_TOP_BLOCK; }
#endif

// Sizes of the structs, for the Python side to check its layout against.
int64_t pc_sizeof_layer() { return sizeof(PcLayer); }
int64_t pc_sizeof_model() { return sizeof(PcModel); }
int64_t pc_sizeof_step() { return sizeof(PcStep); }

void pc_decode_step_bf16(const PcModel* m, const PcStep* st) { decode_step<BF16>(*m, *st); }

#if PC_PAIRED
// y [B, N] = x [B, K] (q * scales)^T (+ bias) over q laid out by native_decode.pair_weight.
void pc_gemv_int8_paired(const uint16_t* x, int64_t B, int64_t K, const uint8_t* p,
                         const uint16_t* scales, const uint16_t* bias, int64_t N, uint16_t* y) {
  gemv_int8_paired(x, B, K, p, scales, bias, N, y);
}
void pc_pair_int8(const int8_t* q, int64_t N, int64_t K, uint8_t* out) { pair_int8(q, N, K, out); }
#endif

#if PC_DPBF16
void pc_gemm_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w,
                  int64_t N, int64_t block, uint16_t* y, int64_t ldy) {
  gemm_bf16(x, ldx, M, K, w, N, block, y, ldy);
}
void pc_prefill_step_bf16(const PcModel* m, const PcStep* st) { prefill_step(*m, *st); }
void pc_pair_dense(const uint32_t* w, int64_t N, int64_t K2, uint32_t* out) {
  pair_dense(w, N, K2, out);
}
#endif
void pc_decode_step_f32(const PcModel* m, const PcStep* st) { decode_step<F32>(*m, *st); }

}  // extern "C"
