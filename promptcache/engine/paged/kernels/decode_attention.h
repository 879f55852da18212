// Attention of decode rows over the KV pool (decode_attention): one query a row and
// key head, its keys and values read in place through the slots.

#pragma once

#include "common.h"

namespace {

// Softmax of each of the G rows of scores [G, W] in place, each probability rounded to the
// storage type (PyTorch: softmax in float32, then .to(dtype)).
template <class S>
void softmax_rows(float* scores, int64_t G, int64_t W) {
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * W;
#if PC_VEC16
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

#if PC_VEC16
// Key (or value) rows ahead of the one in hand that attend_scores and attend_values ask the L2
// cache for: a row lies wherever its block of the pool does, and the weights streamed since
// the last step have evicted it, so without them a long context's keys came from memory one
// row at a time. Counted in rows, not bytes: SmolLM2's 128-byte float16 rows ran fastest 16
// ahead (2 KB; 8 KB ahead was ~25% slower), Gemma 3's 512-byte ones as fast at 16 (8 KB).
constexpr int64_t F32_AHEAD_ROWS = 16;

// Asks the L2 cache for the bytes of one key or value row.
inline void prefetch_bytes(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

// One key head's part of decode_attention, for GQ (a compile-time count) query heads per key
// head, D a multiple of 32: the accumulators stay in registers. In three parts, which
// decode_attention_split shares out among the threads: the scores of keys [j0, j1) (each
// key's its own), the softmax, then the outputs' columns [d0, d0 + 32) (each column a sum over
// the keys in order). So a row gets the same bits whichever thread computes which part.
template <class S, class K, int GQ>
void attend_scores(const float* qf, const typename K::T* keys, const int64_t* srow,
                   const float* mrow, float* sc, int64_t KVH, int64_t kh, int64_t D, int64_t W,
                   int64_t j0, int64_t j1, float scale) {
  using T = typename K::T;
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T)), ahead = F32_AHEAD_ROWS;
  for (int64_t j = j0; j < std::min(j0 + ahead, j1); ++j)
    prefetch_bytes(keys + (srow[j] * KVH + kh) * D, row_bytes);
  for (int64_t j = j0; j < j1; ++j) {
    if (j + ahead < j1) prefetch_bytes(keys + (srow[j + ahead] * KVH + kh) * D, row_bytes);
    const float m = mrow ? mrow[j] : 0.0f;
    if (m == -INFINITY) {
      for (int g = 0; g < GQ; ++g) sc[g * W + j] = -INFINITY;
      continue;
    }
    const T* kp = keys + (srow[j] * KVH + kh) * D;
    __m512 a[GQ];
    for (int g = 0; g < GQ; ++g) a[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 k = K::load16(kp + d);
      for (int g = 0; g < GQ; ++g) a[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + d), k, a[g]);
    }
    for (int g = 0; g < GQ; ++g) sc[g * W + j] = S::round(_mm512_reduce_add_ps(a[g])) * scale + m;
  }
}

template <class K, int GQ>
void attend_values(const typename K::T* values, const int64_t* srow, const float* mrow,
                   const float* sc, float* acc, int64_t KVH, int64_t kh, int64_t D, int64_t W,
                   int64_t d0) {
  using T = typename K::T;
  const int64_t ahead = F32_AHEAD_ROWS;
  __m512 a0[GQ], a1[GQ];
  for (int g = 0; g < GQ; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
  for (int64_t j = 0; j < W; ++j) {
    if (j + ahead < W)
      prefetch_bytes(values + (srow[j + ahead] * KVH + kh) * D + d0, 32 * sizeof(T));
    if (mrow && mrow[j] == -INFINITY) continue;
    const T* vp = values + (srow[j] * KVH + kh) * D + d0;
    const __m512 v0 = K::load16(vp), v1 = K::load16(vp + 16);
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

template <class S, class K, int GQ>
void attend_head(const float* qf, const typename K::T* keys, const typename K::T* values,
                 const int64_t* srow, const float* mrow, float* sc, float* acc, int64_t KVH,
                 int64_t kh, int64_t D, int64_t W, float scale) {
  attend_scores<S, K, GQ>(qf, keys, srow, mrow, sc, KVH, kh, D, W, 0, W, scale);
  softmax_rows<S>(sc, GQ, W);
  // 32 values of D at a time: each pass reads its own 64 bytes of each value row.
  for (int64_t d0 = 0; d0 < D; d0 += 32)
    attend_values<K, GQ>(values, srow, mrow, sc, acc, KVH, kh, D, W, d0);
}

// Keys a share of decode_attention_split's scores.
constexpr int64_t SPLIT_KEYS = 64;

// decode_attention where the units (a row's key head) do not share out evenly among the
// threads, as one decode row of Gemma 3 (one key head) does not: each unit's keys' scores, then
// its columns' outputs, shared by the threads, where a unit alone took one core (one stream
// after 4,160 tokens: ~25 MB of float32 keys and values a step read by one core; Gemma 3 270M
// on a 2-core Zen 3, in turns: decode 53 -> 60 tok/s after 4,160 tokens, 65 -> 72 after 600)
// and 3 streams' units went 2 to one thread, 1 to the other (+0-7% after 600 tokens, noisy).
// The same parts as attend_head, so the same bits. D a multiple of 32, H / KVH at most 8.
template <class S, class K>
void decode_attention_split(const typename S::T* q, int64_t q_stride, const typename K::T* keys,
                            const typename K::T* values, const int64_t* slots,
                            const float* mask, typename S::T* out, int64_t B, int64_t H,
                            int64_t KVH, int64_t D, int64_t W, float scale) {
  using T = typename S::T;
  const int64_t G = H / KVH, units = B * KVH;
  const int64_t shares = (W + SPLIT_KEYS - 1) / SPLIT_KEYS, columns = D / 32;
  thread_local Scratch<float> qf_s, sc_s, acc_s;
  qf_s.reserve(units * G * D);
  sc_s.reserve(units * G * W);
  acc_s.reserve(units * G * D);
  float *const qf = qf_s.data(), *const sc = sc_s.data(), *const acc = acc_s.data();
  for (int64_t u = 0; u < units; ++u)
    for (int64_t g = 0; g < G; ++g)
      load_row<S>(q + (u / KVH) * q_stride + ((u % KVH) * G + g) * D, D, qf + (u * G + g) * D);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < units * shares; ++item) {
      const int64_t u = item / shares, j0 = (item % shares) * SPLIT_KEYS;
      const int64_t b = u / KVH, kh = u % KVH;
      with_rows(G, [&](auto gq) {
        attend_scores<S, K, decltype(gq)::value>(qf + u * G * D, keys, slots + b * W,
                                              mask ? mask + b * W : nullptr, sc + u * G * W,
                                              KVH, kh, D, W, j0, std::min(W, j0 + SPLIT_KEYS),
                                              scale);
      });
    }
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) softmax_rows<S>(sc + u * G * W, G, W);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < units * columns; ++item) {
      const int64_t u = item / columns, d0 = (item % columns) * 32;
      const int64_t b = u / KVH, kh = u % KVH;
      with_rows(G, [&](auto gq) {
        attend_values<K, decltype(gq)::value>(values, slots + b * W,
                                              mask ? mask + b * W : nullptr, sc + u * G * W,
                                              acc + u * G * D, KVH, kh, D, W, d0);
      });
    }
  }
  for (int64_t u = 0; u < units; ++u)
    for (int64_t g = 0; g < G; ++g) {
      T* op = out + ((u / KVH) * H + (u % KVH) * G + g) * D;
      store_row<S>(acc + (u * G + g) * D, D, op);
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


constexpr int64_t KEY_CHUNK = 256;
// Live keys per work item of decode_attention_dp (even, a multiple of 16).
constexpr int64_t KV_AHEAD_BYTES = 8192;
// Bytes of key rows ahead of the block in hand that dp_scores asks the cache for (decode
// attention of 8 rows x 1,024 keys on 2 cores: 6.1 -> 5.1 ms a step with NEXT_UNIT_KEYS).
constexpr int64_t NEXT_UNIT_KEYS = 64;
// Keys of a thread's next unit that decode_attention_dp asks the cache for ahead.

// One block of scores: KB = 16 / GQ keys x GQ query heads, one accumulator each (lane
// j * GQ + g of sum16), each key row and query row read once per block.
template <int GQ>
inline __m512 score_block(const uint16_t* qb, const uint16_t* const* kp, int64_t D) {
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
  return sum16(a);
}

// How many keys a mask row [W] leaves, where it is +0 on them and -inf on the rest after
// them (padding); -1 for any other row.
inline int64_t padded_length(const float* m, int64_t W) {
  int64_t n = 0;
  while (n < W && m[n] == 0.0f && !std::signbit(m[n])) ++n;
  for (int64_t j = n; j < W; ++j)
    if (m[j] != -INFINITY) return -1;
  return n;
}

// One unit (a row's key head) of decode_attention_dp, as its chunk-wise pieces read it.
struct DpUnit {
  const uint16_t* qb;     // its GQ query heads, bfloat16 [GQ, D]
  const int64_t* live;    // its unmasked keys (indices into its row of slots / mask)
  int64_t n;              // how many
  const int64_t* slots;   // its row of slots [W]
  const float* mask;      // its row of the mask [W], or null
  bool zero_mask;         // the mask is null or +0 at every live key (adding it changes nothing)
  float* sc;              // [GQ, W] by live index: scores, then exponentials
  int64_t W, kh, KVH, D;
};

// Scores of live keys [i0, i1) (16 (key, head) pairs a block, summed across lanes together),
// rounded to bfloat16, * scale + mask; returns their maximum per head in mx.
template <int GQ>
void dp_scores(const DpUnit& u, const uint16_t* keys, const uint16_t* values, int64_t i0,
               int64_t i1, float scale, float* mx) {
  constexpr int KB = 16 / GQ;
  // Whole blocks of keys, KV_AHEAD_BYTES of them or more.
  const int64_t skip = (KV_AHEAD_BYTES / (2 * u.D) + KB - 1) / KB * KB;
  __m512i head[GQ];  // lane j of head g's scores: lane j * GQ + g of a block's (past KB: 0)
  __m512 vmx[GQ];
  for (int g = 0; g < GQ; ++g) {
    alignas(64) int32_t order[16];
    for (int j = 0; j < 16; ++j) order[j] = j < KB ? j * GQ + g : 0;
    head[g] = _mm512_load_si512(order);
    vmx[g] = _mm512_set1_ps(-INFINITY);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i = i0; i < i1; i += KB) {
    const int kb = i1 - i < KB ? static_cast<int>(i1 - i) : KB;
    // The keys KV_AHEAD_BYTES on, and this block's values for dp_values, into L2: a row lies
    // wherever its block of the pool does, so the hardware prefetcher cannot see the next one
    // coming, and the weights streamed since the last step have evicted them. Into L1 the
    // keys' requests outnumbered its miss buffers: 8 rows x 1,024 keys 781 -> 519 us a layer
    // into L2, 8 x 4,160 3.5 -> 2.6 ms (one row and short rows alike).
    const int64_t ahead = std::min(i + skip + KB, i1);
    for (int64_t j = i == i0 ? i : i + skip; j < ahead; ++j)
      prefetch_bytes(keys + (u.slots[u.live[j]] * u.KVH + u.kh) * u.D, 2 * u.D);
    for (int j = 0; j < kb; ++j)
      prefetch_bytes(values + (u.slots[u.live[i + j]] * u.KVH + u.kh) * u.D, 2 * u.D);
    const uint16_t* kp[KB];
    for (int j = 0; j < KB; ++j)  // past the last key: the first again, its sums unused
      kp[j] = keys + (u.slots[u.live[i + (j < kb ? j : 0)]] * u.KVH + u.kh) * u.D;
    // Lane j * GQ + g: key j, head g, rounded and scaled; then head g's keys in lanes j.
    const __m512 r = _mm512_mul_ps(BF16::round16_score(score_block<GQ>(u.qb, kp, u.D)), vscale);
    __m512 m = _mm512_setzero_ps();  // added as the scalar + 0.0f is: -0 becomes +0
    if (!u.zero_mask) {
      alignas(64) float mj[16] = {};
      for (int j = 0; j < kb; ++j) mj[j] = u.mask[u.live[i + j]];
      m = _mm512_load_ps(mj);
    }
    const __mmask16 in = static_cast<__mmask16>((1u << kb) - 1);
    for (int g = 0; g < GQ; ++g) {
      const __m512 v = _mm512_add_ps(_mm512_permutexvar_ps(head[g], r), m);
      _mm512_mask_storeu_ps(u.sc + g * u.W + i, in, v);
      // max(v, vmx): a NaN score leaves the maximum as it was, as std::max(mx, v) does.
      vmx[g] = _mm512_mask_max_ps(vmx[g], in, v, vmx[g]);
    }
  }
  for (int g = 0; g < GQ; ++g) mx[g] = _mm512_reduce_max_ps(vmx[g]);
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
  // Pair p: the probabilities of keys i0 + 2p and i0 + 2p + 1 (0 past i1) as bfloat16, low
  // and high: 16 pairs are 32 probabilities in a row, rounded and packed in order.
  alignas(64) uint32_t pairs[GQ][KEY_CHUNK / 2];
  for (int g = 0; g < GQ; ++g) {
    const float* s = u.sc + g * u.W;
    const __m512 vinv = _mm512_set1_ps(inv[g]);
    for (int64_t p = 0; p < np; p += 16) {
      const int64_t i = i0 + 2 * p;
      const __mmask16 k0 = lanes(i, i1), k1 = i + 16 < i1 ? lanes(i + 16, i1) : 0;
      const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(k0, s + i), vinv);
      const __m512 b = _mm512_mul_ps(_mm512_maskz_loadu_ps(k1, s + i + 16), vinv);
      _mm512_store_si512(pairs[g] + p, BF16::pack32(b, a));
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
// and in any batch. Where the units do not share out evenly over the threads (one stream of
// Gemma 3's one key head, SmolLM2's 3 on 2 threads), the chunks of each phase are shared by
// the threads (a long context no longer waits on one core); otherwise each thread takes whole
// units. Both do the same arithmetic in the same order: the same results.
template <int GQ>
void decode_attention_dp(const uint16_t* q, int64_t q_stride, const uint16_t* keys,
                         const uint16_t* values, const int64_t* slots, const float* mask,
                         uint16_t* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t W,
                         float scale) {
  const int64_t units = B * KVH;
  // Scratch kept by the calling thread between calls (allocating and clearing ~1 MB a call
  // cost more than the attention of a few short rows); the workers reach it through the
  // pointers below (a thread_local name in their code would be their own).
  thread_local Scratch<int64_t> live_s, first_s, owner_s, order_s;
  thread_local Scratch<float> sc_s, cmax_s, csum_s, part_s;
  thread_local Scratch<uint16_t> qb_s;
  // The live keys of a row with no mask, or a mask that only pads it (a decode row's keys,
  // rounded up to KEY_BUCKET), are the first n: one list 0 .. W - 1 for every such unit, kept
  // between calls (building each unit's own, serially before the threads' work, took ~10% of
  // one row's attention over 2,000 keys of SmolLM2's 3 key heads).
  thread_local Scratch<int64_t> all_s;
  thread_local int64_t all_n = 0;
  if (all_n < W) {
    all_s.reserve(W);
    for (int64_t j = 0; j < W; ++j) all_s[j] = j;
    all_n = W;
  }
  live_s.reserve(mask ? units * W : 0);
  sc_s.reserve(units * GQ * W);
  qb_s.reserve(units * GQ * D);
  int64_t* const live = live_s.data();
  const int64_t* const all = all_s.data();
  float* const sc = sc_s.data();
  uint16_t* const qb = qb_s.data();
  // A unit's live keys and query heads, gathered by whichever thread takes it.
  auto prepare = [&](int64_t u) {
    const int64_t b = u / KVH;
    const float* mrow = mask ? mask + b * W : nullptr;
    const int64_t* lv = all;
    int64_t n = mrow ? padded_length(mrow, W) : W;
    bool zero = true;
    if (n < 0) {
      int64_t* own = live + u * W;
      n = 0;
      for (int64_t j = 0; j < W; ++j)
        if (mrow[j] != -INFINITY) {
          own[n++] = j;
          zero = zero && mrow[j] == 0.0f && !std::signbit(mrow[j]);
        }
      lv = own;
    }
    uint16_t* qu = qb + u * GQ * D;
    for (int g = 0; g < GQ; ++g)
      std::memcpy(qu + g * D, q + b * q_stride + ((u % KVH) * GQ + g) * D, sizeof(uint16_t) * D);
    return DpUnit{qu, lv, n, slots + b * W, mrow, zero, sc + u * GQ * W, W, u % KVH, KVH, D};
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
  // Whole units a thread where they share out evenly; else (one row of a model with fewer
  // key heads than threads, or not a multiple) the chunks of each phase.
  const int64_t nt = omp_get_max_threads();
  if ((units >= nt && (units % nt == 0 || units >= 4 * nt)) || W <= KEY_CHUNK || !parallel) {
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
            prefetch_bytes(keys + (next.slots[next.live[j]] * KVH + next.kh) * D, 2 * D);
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
  // Units that do not share out evenly: each phase's chunks shared by the threads.
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
  // The threads take the items in this order, a chunk of every unit before the next chunk:
  // a row's key heads lie side by side in the pool, so a thread reads each slot's rows of
  // all heads together rather than one head's every few hundred bytes.
  order_s.reserve(items);
  int64_t* const order = order_s.data();
  int64_t next = 0;
  for (int64_t c = 0; next < items; ++c)
    for (int64_t u = 0; u < units; ++u)
      if (first[u] + c < first[u + 1]) order[next++] = first[u] + c;
  auto span = [&](int64_t c, int64_t* i0, int64_t* i1) {
    *i0 = (c - first[owner[c]]) * KEY_CHUNK;
    *i1 = std::min(*i0 + KEY_CHUNK, unit[owner[c]].n);
  };
#pragma omp parallel
  {
    int64_t i0, i1;
#pragma omp for schedule(static)
    for (int64_t o = 0; o < items; ++o) {
      const int64_t c = order[o];
      span(c, &i0, &i1);
      dp_scores<GQ>(unit[owner[c]], keys, values, i0, i1, scale, cmax + c * GQ);
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < items; ++o) {
      const int64_t c = order[o], u = owner[c];
      float mx[GQ];
      for (int g = 0; g < GQ; ++g) {
        mx[g] = -INFINITY;
        for (int64_t k = first[u]; k < first[u + 1]; ++k) mx[g] = std::max(mx[g], cmax[k * GQ + g]);
      }
      span(c, &i0, &i1);
      dp_exps<GQ>(unit[u], i0, i1, mx, csum + c * GQ * 16);
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < items; ++o) {
      const int64_t c = order[o], u = owner[c];
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
template <class S, class K>
void attend_head_any(const float* qf, const typename K::T* keys, const typename K::T* values,
                     const int64_t* srow, const float* mrow, float* sc, float* acc, int64_t G,
                     int64_t KVH, int64_t kh, int64_t D, int64_t W, float scale) {
  using T = typename K::T;
  for (int64_t j = 0; j < W; ++j) {
    const float m = mrow ? mrow[j] : 0.0f;
    if (m == -INFINITY) {
      for (int64_t g = 0; g < G; ++g) sc[g * W + j] = -INFINITY;
      continue;
    }
    const T* kp = keys + (srow[j] * KVH + kh) * D;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * K::load(kp[d]);
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
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += p * K::load(vp[d]);
    }
  }
}

// Attention of the decode queries q [B, H, D] (row stride q_stride, heads contiguous) over
// the pool's keys and values [slots, KVH, D] at slots [B, W], with the additive float32 mask
// [B, W] (nullptr: none); out [B, H, D] contiguous. Query head h reads key head h / (H / KVH).
// As PyTorch's decode_attend: scores q.k rounded to the storage type, then * scale + mask and
// softmax in float32, probabilities rounded, their product with the values accumulated in
// float32 and rounded once. A masked key (-inf) is not read at all. K: the pool's storage
// type (S's, or F16 under a float32 model), converted to float32 as it is read.
template <class S, class K = S>
void decode_attention(const typename S::T* q, int64_t q_stride, const typename K::T* keys,
                      const typename K::T* values, const int64_t* slots, const float* mask,
                      typename S::T* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                      int64_t W, float scale) {
  using T = typename S::T;
  const int64_t G = H / KVH;
  const int64_t units = B * KVH;
#if PC_DPBF16
  if constexpr (std::is_same_v<S, BF16> && std::is_same_v<K, BF16>) {
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
#if PC_VEC16
  if (units % omp_get_max_threads() != 0 && D % 32 == 0 && G <= 8 &&
      units * W * D >= PARALLEL_MIN_WORK) {
    decode_attention_split<S, K>(q, q_stride, keys, values, slots, mask, out, B, H, KVH, D, W,
                                 scale);
    return;
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
#if PC_VEC16
      if (D % 32 == 0) {
        done = true;
        switch (G) {
#define PC_CASE(n) \
  case n:          \
    attend_head<S, K, n>(f, keys, values, srow, mrow, s, a, KVH, kh, D, W, scale); \
    break;
          PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6) PC_CASE(7)
          PC_CASE(8)
#undef PC_CASE
          default:
            done = false;
        }
      }
#endif
      if (!done) attend_head_any<S, K>(f, keys, values, srow, mrow, s, a, G, KVH, kh, D, W, scale);
      for (int64_t g = 0; g < G; ++g) {
        T* op = out + (b * H + kh * G + g) * D;
        store_row<S>(acc.data() + g * D, D, op);
      }
    }
  }
}

}  // namespace
