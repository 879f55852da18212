// What every kernel shares: the instruction-set switches (PC_AVX512, PC_AVX2, PC_VEC16,
// PC_DPBF16, PC_VNNI), the storage types' loads, stores and roundings (BF16, F32), exp16 and
// scratch buffers.

#pragma once

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
// The kernels' vector paths are written for 16 float lanes (AVX-512's): on AVX-512 natively,
// on AVX2 with FMA as two 8-lane halves (avx2.h, the same lanes and bits). PC_AVX2 says which.
#if !PC_AVX512 && defined(__AVX2__) && defined(__FMA__)
#include "avx2.h"
#define PC_AVX2 1
#else
#define PC_AVX2 0
#endif
#define PC_VEC16 (PC_AVX512 || PC_AVX2)
// bfloat16 pairs multiplied and summed in float32 (vdpbf16ps): a product of two bfloat16 is
// exact in float32, so only the order of the additions differs from float32 FMAs.
#if PC_AVX512 && defined(__AVX512BF16__)
#define PC_DPBF16 1
#else
#define PC_DPBF16 0
#endif
// Integer products of bytes summed in 32 bits (vpdpbusd): the decode products of bfloat16
// rows (gemv_int8_vnni) and the int4 head (head.h).
#if PC_AVX512 && defined(__AVX512VNNI__)
#define PC_VNNI 1
#else
#define PC_VNNI 0
#endif
// Decode rows multiplied in integers (gemv_int8_vnni): by vpdpbusd, else by AVX2's vpmaddubsw
// (on AVX-512 without VNNI too: Skylake's servers).
#define PC_INT8_ROWS PC_VEC16
// A float16 KV pool under float32 compute (F16): vcvtph2ps / vcvtps2ph, AVX-512's or F16C's.
#if PC_AVX512 || (PC_AVX2 && defined(__F16C__))
#define PC_F16 1
#else
#define PC_F16 0
#endif
// Decode rows' products over a GGUF file's own codes (gemv_codes): by vpdpbusd, else by
// vpmaddubsw; their scales are float16.
#define PC_CODES (PC_INT8_ROWS && PC_F16)

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
#if PC_VEC16
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
#if PC_DPBF16
  // b's 16 values rounded (low words), then a's: vcvtne2ps2bf16, which reads a subnormal as 0
  // where float_to_bf16 keeps it. For what only vdpbf16ps reads (attention's probabilities):
  // it reads subnormal inputs as 0 too, so the sums are the same bits.
  static __m512i pack32(__m512 a, __m512 b) { return (__m512i)_mm512_cvtne2ps_pbh(a, b); }
  // round16 by vcvtneps2bf16, a subnormal becoming 0. For attention's scores, used as exp(s -
  // max) alone: a subnormal and 0 give the same exponentials and the same largest one.
  static __m512 round16_score(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }
#endif
  static void store16(T* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack16(v));
  }
  // Rounded in place, subnormals as PyTorch rounds them: the integer arithmetic alone.
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
#if PC_VEC16
  static __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
  static void store16(T* p, __m512 v) { _mm512_storeu_ps(p, v); }
  static __m512 round16(__m512 v) { return v; }
  static __m512 load16(__mmask16 k, const T* p) { return _mm512_maskz_loadu_ps(k, p); }
  static void store16(T* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
#endif
};

#if PC_F16
// float16 storage: a KV pool's keys and values under a float32 model (--kv-dtype float16),
// converted to and from float32 where they are written and read, rounded to nearest even as
// PyTorch's .to(torch.float16) rounds (vcvtps2ph), so either path stores the same bits.
struct F16 {
  using T = uint16_t;
  static float load(T x) { return _cvtsh_ss(x); }
  static T store(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
  static float round(float f) { return load(store(f)); }
  static __m512 load16(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m256i pack16(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
  static void store16(T* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), pack16(v));
  }
  static __m512 round16(__m512 v) { return _mm512_cvtph_ps(pack16(v)); }
  static __m512 load16(__mmask16 k, const T* p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
  static void store16(T* p, __mmask16 k, __m512 v) { _mm256_mask_storeu_epi16(p, k, pack16(v)); }
};
#endif

#if PC_VEC16
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
#if PC_VEC16
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
#if PC_VEC16
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(i, n);
    S::store16(out + i, k, _mm512_maskz_loadu_ps(k, x + i));
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = S::store(x[i]);
#endif
}

#if PC_VEC16
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

#if PC_VEC16
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

// f(std::integral_constant<int, rows>{}) for rows 1..8: the kernels that keep a register of
// accumulators per activation row (or per query head of a key head) take their count at
// compile time.
template <class F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
  }
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

}  // namespace
