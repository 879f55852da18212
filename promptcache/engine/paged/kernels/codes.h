// Decode rows' products over a GGUF file's own 4- and 5-bit codes (gemv_codes).

#pragma once

#include "common.h"
#include "products.h"

namespace {

#if PC_CODES
// The file's blocks of 32 inputs (Q4_0, Q4_1, Q5_0: w = d (q - offset), or d q + m for Q4_1;
// q of 4 or 5 bits, d and m float16 per row and block) as codes.py lays them out: per 16
// output rows, per block, CODES_LOW bytes of low nibbles (vector j of four, byte (r, i): row
// r's input 4 j + i in its low half, 4 (j + 4) + i in its high half), for 5 bits CODES_HIGH
// bytes of fifth bits (byte (r, i), bit j: input 4 j + i's), then d of the 16 rows and, with
// no offset, their m. Read where int8 copies of the same weights would be (5-6 bits a weight
// with the scales, against ~8): a decode step is bound by the weight bytes it streams.
constexpr int64_t CODES_BLOCK = 32;
constexpr int64_t CODES_LOW = 256;
constexpr int64_t CODES_HIGH = 64;
// Four int8 inputs read as one word (the bytes' own type may alias it).
typedef int32_t __attribute__((may_alias)) aliased_i32;
constexpr int64_t codes_stride(int bits, int offset) {
  return CODES_LOW + (bits == 5 ? CODES_HIGH : 0) + 32 + (offset == 0 ? 32 : 0);
}

#if PC_VNNI
// Bit j of every byte of h moved to bit 4 (16-bit shifts: what crosses a byte lands outside
// bit 4, which is all that is kept).
template <int J>
inline __m512i fifth_bit(__m512i h) {
  if constexpr (J <= 4)
    return _mm512_slli_epi16(h, 4 - J);
  else
    return _mm512_srli_epi16(h, J - 4);
}

// Vector j of the codes of one block of 16 rows (lane r: the codes, 0 .. 31, of row r's
// inputs 4 j .. 4 j + 3) from its low nibbles v (vector j % 4) and, for 5 bits, fifth bits h.
template <int BITS, int J>
inline __m512i code_vector(__m512i v, __m512i h) {
  const __m512i low = _mm512_set1_epi8(0x0f);
  const __m512i c = _mm512_and_si512(J < 4 ? v : _mm512_srli_epi16(v, 4), low);
  if constexpr (BITS == 5)  // c | (h' & 0x10): vpternlog's table for a | (b & c)
    return _mm512_ternarylogic_epi32(c, fifth_bit<J>(h), _mm512_set1_epi8(0x10), 0xf8);
  else
    return c;
}

// 16 output rows n0 .. of gemv_codes for BN activation rows (quantize_rows' a and alpha;
// sums [T][BN]: per block, each row's sum of its int8 inputs times -OFFSET, or with no offset
// times its alpha). Per block, in block order: sum((q - OFFSET) a) exactly in integers (vpdpbusd:
// codes unsigned, a signed; the offset's part subtracted first), times d alpha into f; with
// no offset, then m alpha sum(a): the block's dot product with the file's weights.
template <class S, int BN, int BITS, int OFFSET>
inline void codes_block(const int8_t* a, const float* alpha, const void* sums, int64_t K,
                        const uint8_t* p, const typename S::T* bias, int64_t n0, int64_t N,
                        typename S::T* y) {
  constexpr int64_t stride = codes_stride(BITS, OFFSET);
  const int64_t T = K / CODES_BLOCK, G = K / VNNI_GROUP;
  const int32_t* isum = static_cast<const int32_t*>(sums);
  const float* msum = static_cast<const float*>(sums);
  __m512 f[BN];
  for (int b = 0; b < BN; ++b) f[b] = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* blk = p + t * stride;
    for (int64_t o = 0; o < stride; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + o + VNNI_PREFETCH_AHEAD), _MM_HINT_T1);
    const uint8_t* dm = blk + CODES_LOW + (BITS == 5 ? CODES_HIGH : 0);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm)));
    const int64_t g = t * CODES_BLOCK / VNNI_GROUP;
    __m512i s[BN];
    for (int b = 0; b < BN; ++b)
      s[b] = OFFSET ? _mm512_set1_epi32(isum[t * BN + b]) : _mm512_setzero_si512();
    const __m512i h = BITS == 5 ? _mm512_loadu_si512(blk + CODES_LOW) : _mm512_setzero_si512();
    // Each vector of codes made once and multiplied by every row's four inputs in turn.
    const aliased_i32* words32 = reinterpret_cast<const aliased_i32*>(a) + t * CODES_BLOCK / 4 * BN;
    const auto step = [&](auto j) {
      constexpr int J = decltype(j)::value;
      const __m512i v = _mm512_loadu_si512(blk + 64 * (J % 4));
      const __m512i c = code_vector<BITS, J>(v, h);
      for (int b = 0; b < BN; ++b)  // four inputs to every lane
        s[b] = _mm512_dpbusd_epi32(s[b], c, _mm512_set1_epi32(words32[J * BN + b]));
    };
    step(std::integral_constant<int, 0>{});
    step(std::integral_constant<int, 1>{});
    step(std::integral_constant<int, 2>{});
    step(std::integral_constant<int, 3>{});
    step(std::integral_constant<int, 4>{});
    step(std::integral_constant<int, 5>{});
    step(std::integral_constant<int, 6>{});
    step(std::integral_constant<int, 7>{});
    for (int b = 0; b < BN; ++b) {
      // |sum((q - offset) a)| <= 32 * 31 * 127 < 2^24: exact as a float.
      const __m512 da = _mm512_mul_ps(d, _mm512_set1_ps(alpha[b * G + g]));
      f[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[b]), da, f[b]);
    }
    if constexpr (OFFSET == 0) {
      const __m512 m =
          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dm + 32)));
      for (int b = 0; b < BN; ++b)
        f[b] = _mm512_fmadd_ps(m, _mm512_set1_ps(msum[t * BN + b]), f[b]);
    }
  }
  for (int b = 0; b < BN; ++b) {
    __m512 v = f[b];
    if (bias) v = S::round16(_mm512_add_ps(S::round16(v), S::load16(bias + n0)));
    S::store16(y + b * N + n0, v);
  }
}
#else
// codes_block without vpdpbusd (AVX2; AVX-512 without VNNI): the same integer sums and the
// same float operations per lane. vpmaddubsw multiplies the codes (unsigned, at most 31) by a
// (signed) and adds pairs in 16 bits (at most 2 * 31 * 127), and 4 of those add in 16 bits too
// (|sum| <= 31,496 < 32,768) before vpmaddwd takes them to 32: no sign to move, unlike the int8
// weights' products. Each 8-output half of a block in turn, as the int4 head's AVX2 form.
template <class S, int BN, int BITS, int OFFSET>
inline void codes_block(const int8_t* a, const float* alpha, const void* sums, int64_t K,
                        const uint8_t* p, const typename S::T* bias, int64_t n0, int64_t N,
                        typename S::T* y) {
  constexpr int64_t stride = codes_stride(BITS, OFFSET);
  const int64_t T = K / CODES_BLOCK, G = K / VNNI_GROUP;
  const int32_t* isum = static_cast<const int32_t*>(sums);
  const float* msum = static_cast<const float*>(sums);
  const __m256i low = _mm256_set1_epi8(0x0f), bit4 = _mm256_set1_epi8(0x10);
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(64) float acc[BN][16] = {};
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* blk = p + t * stride;
    for (int64_t o = 0; o < stride; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk + o + VNNI_PREFETCH_AHEAD), _MM_HINT_T1);
    const uint8_t* dm = blk + CODES_LOW + (BITS == 5 ? CODES_HIGH : 0);
    const int64_t g = t * CODES_BLOCK / VNNI_GROUP;
    const int8_t* words = a + t * CODES_BLOCK * BN;  // the block's four-input words, row by row
    for (int h = 0; h < 2; ++h) {
      asm("" : "+r"(words));  // each word read as words plus a constant (as vnni_block's)
      __m256i s[BN], e[BN];
      for (int b = 0; b < BN; ++b) {
        s[b] = OFFSET ? _mm256_set1_epi32(isum[t * BN + b]) : _mm256_setzero_si256();
        e[b] = _mm256_setzero_si256();
      }
      const __m256i hv =
          BITS == 5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + CODES_LOW + 32 * h))
                    : _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * (j % 4) + 32 * h));
        __m256i c = _mm256_and_si256(j < 4 ? v : _mm256_srli_epi16(v, 4), low);
        if constexpr (BITS == 5) {  // bit j of hv's bytes to bit 4 (code_vector's fifth bit)
          const __m256i f = j <= 4 ? _mm256_sll_epi16(hv, _mm_cvtsi32_si128(4 - j))
                                   : _mm256_srl_epi16(hv, _mm_cvtsi32_si128(j - 4));
          c = _mm256_or_si256(c, _mm256_and_si256(f, bit4));
        }
        for (int b = 0; b < BN; ++b) {
          const __m256i four = _mm256_castps_si256(
              _mm256_broadcast_ss(reinterpret_cast<const float*>(words + (j * BN + b) * 4)));
          e[b] = _mm256_add_epi16(e[b], _mm256_maddubs_epi16(c, four));
        }
        if (j % 4 == 3)
          for (int b = 0; b < BN; ++b) {
            s[b] = _mm256_add_epi32(s[b], _mm256_madd_epi16(e[b], ones));
            e[b] = _mm256_setzero_si256();
          }
      }
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 16 * h)));
      for (int b = 0; b < BN; ++b) {
        float* fb = acc[b] + 8 * h;
        const __m256 da = _mm256_mul_ps(d, _mm256_set1_ps(alpha[b * G + g]));
        _mm256_store_ps(fb, _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[b]), da, _mm256_load_ps(fb)));
      }
      if constexpr (OFFSET == 0) {
        const __m256 m =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm + 32 + 16 * h)));
        for (int b = 0; b < BN; ++b) {
          float* fb = acc[b] + 8 * h;
          _mm256_store_ps(fb, _mm256_fmadd_ps(m, _mm256_set1_ps(msum[t * BN + b]),
                                              _mm256_load_ps(fb)));
        }
      }
    }
  }
  for (int b = 0; b < BN; ++b) {
    __m512 v = _mm512_load_ps(acc[b]);
    if (bias) v = S::round16(_mm512_add_ps(S::round16(v), S::load16(bias + n0)));
    S::store16(y + b * N + n0, v);
  }
}
#endif

// y [B, N] = x [B, K] W^T (+ bias), W the file's codes laid out by codes.py (bits 4 and
// offset 8 or none, or bits 5 and offset 16): each row of x quantized as gemv_int8_vnni
// quantizes it (quantize_rows), every block's integer sums exact. scratch: what
// gemv_int8_vnni asks, and 4 B K / 32 bytes more. N a multiple of 16, K of VNNI_GROUP.
template <class S>
void gemv_codes(const typename S::T* x, int64_t B, int64_t K, const uint8_t* p, int bits,
                int offset, const typename S::T* bias, int64_t N, typename S::T* y,
                void* scratch) {
  const int64_t G = K / VNNI_GROUP, T = K / CODES_BLOCK;
  int8_t* a = static_cast<int8_t*>(scratch);
  float* alpha = reinterpret_cast<float*>(a + ((B * K + 63) & ~int64_t{63}));
  int32_t* bias128 = reinterpret_cast<int32_t*>(alpha + B * G);
  int32_t* isum = bias128 + B * G;
  float* msum = reinterpret_cast<float*>(isum);
  // Each row's inputs summed per block (per block of VNNI_ROWS rows, [T][rows]), then times
  // -offset, or with none times the row's alpha.
  quantize_rows<S>(x, B, K, a, alpha, bias128, isum);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t b0 = b / VNNI_ROWS * VNNI_ROWS, rows = std::min(VNNI_ROWS, B - b0);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t at = b0 * T + t * rows + b - b0;
      if (offset)
        isum[at] *= -offset;
      else
        msum[at] = alpha[b * G + t * CODES_BLOCK / VNNI_GROUP] * static_cast<float>(isum[at]);
    }
  }
  const int64_t stride = codes_stride(bits, offset);
  for (int64_t b0 = 0; b0 < B; b0 += VNNI_ROWS) {
    const int64_t bn = std::min(VNNI_ROWS, B - b0);
    const int8_t* ab = a + b0 * K;
    const float* al = alpha + b0 * G;
    const int32_t* sb = isum + b0 * T;
    typename S::T* yb = y + b0 * N;
    const auto block = [&](int64_t nb) {
      const uint8_t* pb = p + nb * T * stride;
      with_rows(bn, [&](auto r) {
        constexpr int R = decltype(r)::value;
        if (bits == 5)
          codes_block<S, R, 5, 16>(ab, al, sb, K, pb, bias, nb * 16, N, yb);
        else if (offset)
          codes_block<S, R, 4, 8>(ab, al, sb, K, pb, bias, nb * 16, N, yb);
        else
          codes_block<S, R, 4, 0>(ab, al, sb, K, pb, bias, nb * 16, N, yb);
      });
    };
    share_row_blocks(bn, N, K, block);
  }
}
#endif  // PC_CODES

}  // namespace
