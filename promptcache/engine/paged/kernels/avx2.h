// 16-lane vectors on CPUs with AVX2 and FMA but no AVX-512 (AMD before Zen 4, Intel's client
// cores since Alder Lake): the AVX-512 intrinsics that the kernels' float32 paths use, each as
// two 8-lane halves, under their AVX-512 names (macros), so those paths compile unchanged here.
//
// Every lane computes what it computes on AVX-512 hardware, in the same order: each float
// operation is the same IEEE operation per lane, and the reductions add as GCC's AVX-512
// reductions do (halves, then quarters, then pairs), so a kernel gives the same bits on both.
// Masks stay 16-bit integers; a masked load or store reads or writes only its lanes (vmaskmov),
// as AVX-512's do. Only what the kernels need outside their bfloat16 products (vdpbf16ps, no
// AVX2 equivalent: PC_DPBF16 stays 0) is here; byte products (vpdpbusd) are written for AVX2
// where they are used, exact for the operands they get (products.h' and head.h' AVX2 blocks).

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace pc_avx2 {

struct f16x {
  __m256 lo, hi;
};
struct i16x {
  __m256i lo, hi;
};
using mask16 = uint16_t;

// The lanes of an 8-bit mask as a vector of all-ones / all-zeros 32-bit lanes.
inline __m256i lanes8(unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits), bits);
}
inline __m256 flanes8(unsigned m) { return _mm256_castsi256_ps(lanes8(m)); }

// ---- float32 arithmetic
inline f16x set1_ps(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline f16x setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
#define PC_BINARY(name, op)                                                     \
  inline f16x name(f16x a, f16x b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
PC_BINARY(add_ps, _mm256_add_ps)
PC_BINARY(sub_ps, _mm256_sub_ps)
PC_BINARY(mul_ps, _mm256_mul_ps)
PC_BINARY(div_ps, _mm256_div_ps)
PC_BINARY(max_ps, _mm256_max_ps)
PC_BINARY(min_ps, _mm256_min_ps)
#undef PC_BINARY
inline f16x fmadd_ps(f16x a, f16x b, f16x c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f16x fnmadd_ps(f16x a, f16x b, f16x c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline f16x abs_ps(f16x a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline f16x cvtepi32_ps(i16x a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline i16x cvtps_epi32(f16x a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
template <int imm>
inline f16x roundscale_ps(f16x a) {
  static_assert((imm >> 4) == 0, "roundscale with a scale is not emulated");
  return {_mm256_round_ps(a.lo, imm), _mm256_round_ps(a.hi, imm)};
}
// a * 2^n for integral n in [-254, 254] (exp16's use): two exact powers of two, so the one
// rounding, if any (a subnormal result), is the product's, as vscalefps rounds it.
inline f16x scalef_ps(f16x a, f16x n) {
  const auto half = [](__m256 x, __m256 e) {
    const __m256i ni = _mm256_cvtps_epi32(e);
    const __m256i h = _mm256_srai_epi32(ni, 1);
    const __m256i r = _mm256_sub_epi32(ni, h);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(r, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(x, p1), p2);
  };
  return {half(a.lo, n.lo), half(a.hi, n.hi)};
}
// ---- float32 reductions, in the order of GCC's _mm512_reduce_add_ps / _max_ps
inline float reduce_add_ps(f16x a) {
  const __m256 t3 = _mm256_add_ps(a.hi, a.lo);
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}
inline float reduce_max_ps(f16x a) {
  const __m256 t3 = _mm256_max_ps(a.hi, a.lo);
  const __m128 t6 = _mm_max_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_max_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
  const float x = _mm_cvtss_f32(t8), y = _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
  return x > y ? x : y;
}

// ---- float32 memory
inline f16x loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline f16x load_ps(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
inline void storeu_ps(float* p, f16x a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void store_ps(float* p, f16x a) {
  _mm256_store_ps(p, a.lo);
  _mm256_store_ps(p + 8, a.hi);
}
inline f16x maskz_loadu_ps(mask16 k, const float* p) {
  if (k == 0xffff) return loadu_ps(p);
  return {_mm256_maskload_ps(p, lanes8(k & 0xff)), _mm256_maskload_ps(p + 8, lanes8(k >> 8))};
}
inline f16x mask_loadu_ps(f16x src, mask16 k, const float* p) {
  if (k == 0xffff) return loadu_ps(p);
  const f16x v = maskz_loadu_ps(k, p);
  return {_mm256_blendv_ps(src.lo, v.lo, flanes8(k & 0xff)),
          _mm256_blendv_ps(src.hi, v.hi, flanes8(k >> 8))};
}
inline void mask_storeu_ps(float* p, mask16 k, f16x a) {
  if (k == 0xffff) return storeu_ps(p, a);
  _mm256_maskstore_ps(p, lanes8(k & 0xff), a.lo);
  _mm256_maskstore_ps(p + 8, lanes8(k >> 8), a.hi);
}

// ---- half precision (F16C): a float16 KV pool under float32 compute (common.h' F16)
#if defined(__F16C__)
inline f16x cvtph_ps(__m256i a) {
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(a)), _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1))};
}
// Rounded to nearest even (the only rounding the kernels ask for), as vcvtps2ph does on
// AVX-512 with the same immediate.
inline __m256i cvtps_ph(f16x a) {
  return _mm256_set_m128i(_mm256_cvtps_ph(a.hi, _MM_FROUND_TO_NEAREST_INT),
                          _mm256_cvtps_ph(a.lo, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// ---- masks
template <int imm>
inline mask16 cmp_ps_mask(f16x a, f16x b) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, imm));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, imm));
  return static_cast<mask16>(lo | (hi << 8));
}
inline f16x mask_mov_ps(f16x src, mask16 k, f16x a) {
  return {_mm256_blendv_ps(src.lo, a.lo, flanes8(k & 0xff)),
          _mm256_blendv_ps(src.hi, a.hi, flanes8(k >> 8))};
}
inline f16x maskz_mov_ps(mask16 k, f16x a) { return mask_mov_ps(setzero_ps(), k, a); }
inline f16x mask_mul_ps(f16x src, mask16 k, f16x a, f16x b) {
  return mask_mov_ps(src, k, mul_ps(a, b));
}
inline f16x mask_max_ps(f16x src, mask16 k, f16x a, f16x b) {
  return mask_mov_ps(src, k, max_ps(a, b));
}

// ---- integers
inline i16x setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline i16x set1_epi32(int x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
#define PC_IBINARY(name, op)                                                    \
  inline i16x name(i16x a, i16x b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
PC_IBINARY(and_si512, _mm256_and_si256)
PC_IBINARY(or_si512, _mm256_or_si256)
PC_IBINARY(add_epi32, _mm256_add_epi32)
#undef PC_IBINARY
inline i16x slli_epi32(i16x a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
inline i16x srli_epi32(i16x a, int n) { return {_mm256_srli_epi32(a.lo, n), _mm256_srli_epi32(a.hi, n)}; }
inline f16x castsi512_ps(i16x a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
inline i16x castps_si512(f16x a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
inline i16x mask_mov_epi32(i16x src, mask16 k, i16x a) {
  return castps_si512(mask_mov_ps(castsi512_ps(src), k, castsi512_ps(a)));
}
inline i16x cvtepi8_epi32(__m128i a) {
  return {_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(a, a))};
}
inline i16x cvtepu16_epi32(__m256i a) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)),
          _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
// The low 16 bits of each lane, in lane order (truncation, as vpmovdw).
inline __m256i cvtepi32_epi16(i16x a) {
  const __m256i low = _mm256_set1_epi32(0xffff);
  const __m256i packed =
      _mm256_packus_epi32(_mm256_and_si256(a.lo, low), _mm256_and_si256(a.hi, low));
  return _mm256_permute4x64_epi64(packed, _MM_SHUFFLE(3, 1, 2, 0));
}
// 16 masked 16-bit lanes (bfloat16 rows' tails): the lanes outside k read as 0 / left alone.
inline __m256i maskz_loadu_epi16(mask16 k, const void* p) {
  if (k == 0xffff) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  uint16_t buf[16] = {};
  const uint16_t* q = static_cast<const uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) buf[i] = q[i];
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(buf));
}
inline void mask_storeu_epi16(void* p, mask16 k, __m256i a) {
  if (k == 0xffff) return _mm256_storeu_si256(static_cast<__m256i*>(p), a);
  uint16_t buf[16];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf), a);
  uint16_t* q = static_cast<uint16_t*>(p);
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) q[i] = buf[i];
}

// Signed saturation of each lane to a byte, in lane order (vpmovsdb).
inline __m128i cvtsepi32_epi8(i16x a) {
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), _MM_SHUFFLE(3, 1, 2, 0));
  return _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}
// In the order of GCC's _mm512_reduce_add_epi32 (integers: any order gives the same sum).
inline int reduce_add_epi32(i16x a) {
  const __m256i t3 = _mm256_add_epi32(a.hi, a.lo);
  const __m128i t6 = _mm_add_epi32(_mm256_extracti128_si256(t3, 1), _mm256_castsi256_si128(t3));
  const __m128i t8 = _mm_add_epi32(t6, _mm_shuffle_epi32(t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(t8) + _mm_extract_epi32(t8, 1);
}

}  // namespace pc_avx2

// The AVX-512 names the kernels use, for the definitions above (the compiler's own
// declarations of them, for AVX-512 targets, stay unused; some are macros there, hence #undef).
#undef __m512
#define __m512 pc_avx2::f16x
#undef __m512i
#define __m512i pc_avx2::i16x
#undef __mmask16
#define __mmask16 pc_avx2::mask16
#undef _mm512_set1_ps
#define _mm512_set1_ps pc_avx2::set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps pc_avx2::setzero_ps
#undef _mm512_add_ps
#define _mm512_add_ps pc_avx2::add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps pc_avx2::sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps pc_avx2::mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps pc_avx2::div_ps
#undef _mm512_max_ps
#define _mm512_max_ps pc_avx2::max_ps
#undef _mm512_min_ps
#define _mm512_min_ps pc_avx2::min_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps pc_avx2::fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps pc_avx2::fnmadd_ps
#undef _mm512_abs_ps
#define _mm512_abs_ps pc_avx2::abs_ps
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps pc_avx2::cvtepi32_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 pc_avx2::cvtps_epi32
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, imm) pc_avx2::roundscale_ps<(imm)>(a)
#undef _mm512_scalef_ps
#define _mm512_scalef_ps pc_avx2::scalef_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps pc_avx2::reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps pc_avx2::reduce_max_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps pc_avx2::loadu_ps
#undef _mm512_load_ps
#define _mm512_load_ps pc_avx2::load_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps pc_avx2::storeu_ps
#undef _mm512_store_ps
#define _mm512_store_ps pc_avx2::store_ps
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps pc_avx2::maskz_loadu_ps
#undef _mm512_mask_loadu_ps
#define _mm512_mask_loadu_ps pc_avx2::mask_loadu_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps pc_avx2::mask_storeu_ps
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask(a, b, imm) pc_avx2::cmp_ps_mask<(imm)>(a, b)
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps pc_avx2::maskz_mov_ps
#undef _mm512_mask_mul_ps
#define _mm512_mask_mul_ps pc_avx2::mask_mul_ps
#undef _mm512_mask_max_ps
#define _mm512_mask_max_ps pc_avx2::mask_max_ps
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 pc_avx2::setzero_si512
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 pc_avx2::set1_epi32
#undef _mm512_and_si512
#define _mm512_and_si512 pc_avx2::and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 pc_avx2::or_si512
#undef _mm512_add_epi32
#define _mm512_add_epi32 pc_avx2::add_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 pc_avx2::slli_epi32
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 pc_avx2::srli_epi32
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps pc_avx2::castsi512_ps
#undef _mm512_castps_si512
#define _mm512_castps_si512 pc_avx2::castps_si512
#undef _mm512_mask_mov_epi32
#define _mm512_mask_mov_epi32 pc_avx2::mask_mov_epi32
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 pc_avx2::cvtepi8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 pc_avx2::cvtepu16_epi32
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 pc_avx2::cvtepi32_epi16
#undef _mm512_cvtsepi32_epi8
#define _mm512_cvtsepi32_epi8 pc_avx2::cvtsepi32_epi8
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 pc_avx2::reduce_add_epi32
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 pc_avx2::maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 pc_avx2::mask_storeu_epi16
#if defined(__F16C__)
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps pc_avx2::cvtph_ps
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph(a, imm) pc_avx2::cvtps_ph(a)
#endif
