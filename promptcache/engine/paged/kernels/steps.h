// Whole steps of a model in one call: a decode step (decode_step) and a prefill chunk
// (prefill_step), every layer through the kernels above.

#pragma once

#include "codes.h"
#include "common.h"
#include "decode_attention.h"
#include "elementwise.h"
#include "gemm_f32.h"
#include "prefill_attention.h"
#include "products.h"

// One layer of a whole step, as the Python side lays it out (native_decode.py's LayerStruct).
struct PcLayer {
  const int8_t* w[4];       // int8 weights: qkv, o, gate_up, down
  const uint8_t* vnni[4];   // the same laid out for vpdpbusd (gemv_int8_vnni), or null
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
  const void* dense[4];     // prefill_step: the dense weights, bfloat16 laid out for gemm_bf16
                            // or float32 for gemm_f32 (panel_f32)
  int64_t dense_block[4];   // bfloat16: their blocks (pairs) of the inputs, oneDNN's (calibrated)
  const uint8_t* codes[4];  // decode_step: the GGUF file's own codes for gemv_codes, or null
  int64_t code_bits[4];     // their width: 4 or 5
  int64_t code_offset[4];   // w = d (q - offset); 0: w = d q + m
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

// One row of the step's keys or values (src, the model's type S) into the pool's slot `slot`
// in its storage type K: a copy, or converted (F16 under a float32 model).
template <class S, class K>
inline void write_slot(const typename S::T* src, int64_t width, int64_t slot, void* pool) {
  typename K::T* dst = static_cast<typename K::T*>(pool) + slot * width;
  if constexpr (std::is_same_v<S, K>) {
    std::memcpy(dst, src, sizeof(typename K::T) * width);
  } else {
    static_assert(std::is_same_v<S, F32>, "a converted pool is under a float32 model");
    store_row<K>(src, width, dst);
  }
}

// Projection j of a decode step's layer: from the file's codes where the layer has them
// (bfloat16 rows), else from its int8 weights. xf: scratch of [B, K] floats.
template <class S>
inline void decode_product(const PcLayer& L, int j, const typename S::T* x, float* xf, int64_t B,
                           int64_t K, int64_t N, typename S::T* y) {
#if PC_CODES
  if (L.codes[j]) {
    gemv_codes<S>(x, B, K, L.codes[j], static_cast<int>(L.code_bits[j]),
                  static_cast<int>(L.code_offset[j]),
                  static_cast<const typename S::T*>(L.bias[j]), N, y, xf);
    return;
  }
#endif
  project<S>(x, xf, B, K, L.w[j], L.vnni[j], L.scales[j], L.bias[j], N, y);
}

// K: the pool's storage type (S's, or F16 under a float32 model: pc_*_step_f32_kv16).
template <class S, class K = S>
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
    decode_product<S>(L, 0, h.data(), xf.data(), B, E, QKV, qkv.data());
    const T* cos = L.rope >= 0 ? static_cast<const T*>(st.cos[L.rope]) : nullptr;
    const T* sin = L.rope >= 0 ? static_cast<const T*>(st.sin[L.rope]) : nullptr;
    qk_norm_rope<S>(qkv.data(), QKV, B, QK, D, L.head_norm, L.head_eps,
                    L.head_norm ? m.norm_mode : -1, cos, sin, qk.data());
    using KT = typename K::T;
    const KT* keys = static_cast<const KT*>(L.keys);
    const KT* values = static_cast<const KT*>(L.values);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t slot = st.slot_mapping[b];
      write_slot<S, K>(qk.data() + (b * QK + H) * D, KVH * D, slot, L.keys);
      write_slot<S, K>(qkv.data() + b * QKV + QK * D, KVH * D, slot, L.values);
    }
    decode_attention<S, K>(qk.data(), QK * D, keys, values, st.slots[L.window],
                           st.masks[L.window], att.data(), B, H, KVH, D, st.widths[L.window],
                           L.scale);
    decode_product<S>(L, 1, att.data(), xf.data(), B, H * D, E, proj.data());
    residual_norm<S>(x.data(), proj.data(), B, E, gemma ? L.norm_w[1] : nullptr, L.norm_eps[1],
                     L.norm_w[2], L.norm_eps[2], m.norm_mode, x2.data(), h.data());
    decode_product<S>(L, 2, h.data(), xf.data(), B, E, 2 * I, proj.data());
    gated_act<S>(proj.data(), B, I, m.act, mid.data(), I);
    decode_product<S>(L, 3, mid.data(), xf.data(), B, I, E, proj.data());
    const bool last = l + 1 == m.num_layers;
    const void* next_w = last ? m.final_norm : m.layers[l + 1].norm_w[0];
    const float next_eps = last ? m.final_eps : m.layers[l + 1].norm_eps[0];
    residual_norm<S>(x2.data(), proj.data(), B, E, gemma ? L.norm_w[3] : nullptr, L.norm_eps[3],
                     next_w, next_eps, m.norm_mode, x.data(),
                     last ? static_cast<T*>(st.out) : h.data());
  }
}

#if PC_VEC16
// A prompt step's product: x [M, K] times the rows row0 .. row0 + N of the layer's weight j,
// into y: by the kernel the PyTorch forward's projection calls (gemm_bf16 with oneDNN's blocks;
// gemm_f32 for models.panels' layers), or where the layer has no dense copy, in the decode
// step's integers (gemm_int8_vnni over its vnni copy: a prompt's row then projected as a decode
// row is: ~1.7x the bfloat16 products' rate, ~3.7x float32's on AVX-512, ~1.3x on AVX2).
// scratch: gemm_int8_vnni's.
template <class S>
inline void prefill_product(const typename S::T* x, int64_t ldx, int64_t M, int64_t K,
                            const PcLayer& L, int j, int64_t row0, int64_t N, typename S::T* y,
                            int64_t ldy, void* scratch) {
#if PC_INT8_ROWS
  if (!L.dense[j]) {
    gemm_int8_vnni<S>(x, ldx, M, K, L.vnni[j] + row0 * K,
                      static_cast<const typename S::T*>(L.scales[j]) + row0, N, y, ldy, scratch);
    return;
  }
#endif
  if constexpr (std::is_same_v<S, F32>) {
    gemm_f32(x, ldx, M, K, static_cast<const float*>(L.dense[j]) + row0 * K, N, nullptr, y, ldy);
  } else {
#if PC_DPBF16
    gemm_bf16(x, ldx, M, K, static_cast<const uint16_t*>(L.dense[j]) + row0 * K, N,
              L.dense_block[j], y, ldy);
#endif
  }
}

template <class S, class K>
inline void prefill_attend(const typename S::T* q, int64_t q_stride, int64_t n, int64_t H,
                           int64_t KVH, int64_t D, const typename K::T* keys,
                           const typename K::T* values, const int64_t* slots, int64_t L,
                           int64_t k0, int64_t q0, int64_t window, float scale,
                           typename S::T* out, int64_t out_stride) {
  if constexpr (std::is_same_v<S, F32>) {
    prefill_attention_f32<K>(q, q_stride, n, H, KVH, D, keys, values, slots, L, k0, q0, window,
                             scale, out, out_stride);
  } else {
#if PC_DPBF16
    prefill_attention(q, q_stride, n, H, KVH, D, keys, values, slots, L, k0, q0, window, scale,
                      out, out_stride);
#endif
  }
}

// One prefill chunk of a bfloat16 (AVX512-BF16) or float32 model, every layer in one call:
// what the model's PyTorch forward computes for it with the engine's kernels (the same
// functions for the norms, rope, attention, activation and products), without the ~400
// Python-level operations between them. The last layer writes every row's keys and
// values and finishes the last row alone when it is sampled (st.keep), as the PyTorch
// forward's `keep` does; it projects that row's queries alone (the same sums, row by row).
template <class S, class K = S>
void prefill_step(const PcModel& m, const PcStep& st) {
  using T = typename S::T;
  const int64_t n = st.rows, E = m.hidden, H = m.heads, KVH = m.kv_heads, D = m.head_dim;
  const int64_t I = m.intermediate, QKV = (H + 2 * KVH) * D, QK = H + KVH;
  // The products' inputs whose rows would lie a multiple of 2 KiB apart get a cache line
  // more a row: rows 4 KiB apart (Gemma 3 270M's MLP middle) all fall in one set of the L1
  // cache, and a tile of 12 of them evicts itself every line (the down product ran ~12% slower).
  const auto spread = [](int64_t k) {
    return (k * sizeof(T)) % 2048 == 0 ? k + 64 / static_cast<int64_t>(sizeof(T)) : k;
  };
  const int64_t AS = spread(H * D), MS = spread(I);
  thread_local Scratch<T> x_s, h_s, x2_s, qkv_s, qk_s, att_s, proj_s, mid_s;
  // gemm_int8_vnni's: the rows' int8 groups, alphas and sums for the widest input.
  thread_local Scratch<int64_t> ints_s;
  const int64_t widest = std::max({E, H * D, I});
  ints_s.reserve((n * widest + 64) / 8 + n * (widest / 64) + 8);
  void* ints = ints_s.data();
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
    const T* cos = L.rope >= 0 ? static_cast<const T*>(st.cos[L.rope]) : nullptr;
    const T* sin = L.rope >= 0 ? static_cast<const T*>(st.sin[L.rope]) : nullptr;
    const int mode = L.head_norm ? m.norm_mode : -1;
    const T* normed_keys = qk + H * D;  // row r's key heads at r * key_stride
    int64_t key_stride = QK * D;
    if (!last || (H * D) % 32 != 0) {
      prefill_product<S>(h, E, n, E, L, 0, 0, QKV, qkv, QKV, ints);
      qk_norm_rope<S>(qkv, QKV, n, QK, D, L.head_norm, L.head_eps, mode, cos, sin, qk);
    } else {
      // The last layer: every row's keys and values, the sampled row's queries alone (none
      // where no row is sampled); the same sums row by row. The keys go through att, free
      // until the attention.
      prefill_product<S>(h, E, n, E, L, 0, H * D, 2 * KVH * D, qkv + H * D, QKV, ints);
      const size_t w_size = m.norm_mode == OFFSET ? sizeof(float) : sizeof(T);
      const void* key_table =
          L.head_norm ? static_cast<const char*>(L.head_norm) + H * D * w_size : nullptr;
      qk_norm_rope<S>(qkv + H * D, QKV, n, KVH, D, key_table, L.head_eps, mode, cos, sin, att);
      normed_keys = att;
      key_stride = KVH * D;
      if (st.keep) {
        const int64_t r = n - 1;
        prefill_product<S>(h + r * E, E, 1, E, L, 0, 0, H * D, qkv + r * QKV, QKV, ints);
        qk_norm_rope<S>(qkv + r * QKV, QKV, 1, H, D, L.head_norm, L.head_eps, mode,
                        cos ? cos + r * D : nullptr, sin ? sin + r * D : nullptr, qk + r * QK * D);
      }
    }
    using KT = typename K::T;
    const KT* keys = static_cast<const KT*>(L.keys);
    const KT* values = static_cast<const KT*>(L.values);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t slot = st.slot_mapping[r];
      write_slot<S, K>(normed_keys + r * key_stride, KVH * D, slot, L.keys);
      write_slot<S, K>(qkv + r * QKV + QK * D, KVH * D, slot, L.values);
    }
    const int w = L.window;
    int64_t rows = n;
    if (!last) {
      prefill_attend<S, K>(qk, QK * D, n, H, KVH, D, keys, values, st.slots[w], st.widths[w],
                           st.key_pos[w], st.query_pos, st.window_len[w], L.scale, att, AS);
    } else {
      if (!st.keep) return;  // no row sampled: its keys and values were all it needed
      decode_attention<S, K>(qk + (n - 1) * QK * D, QK * D, keys, values, st.slots[w],
                             st.masks[w], att, 1, H, KVH, D, st.widths[w], L.scale);
      std::memmove(x, x + (n - 1) * E, sizeof(T) * E);
      rows = 1;
    }
    prefill_product<S>(att, AS, rows, H * D, L, 1, 0, E, proj, E, ints);
    residual_norm<S>(x, proj, rows, E, gemma ? L.norm_w[1] : nullptr, L.norm_eps[1],
                     L.norm_w[2], L.norm_eps[2], m.norm_mode, x2, h);
    prefill_product<S>(h, E, rows, E, L, 2, 0, 2 * I, proj, 2 * I, ints);
    gated_act<S>(proj, rows, I, m.act, mid, MS);
    prefill_product<S>(mid, MS, rows, I, L, 3, 0, E, proj, E, ints);
    const void* next_w = last ? m.final_norm : m.layers[l + 1].norm_w[0];
    const float next_eps = last ? m.final_eps : m.layers[l + 1].norm_eps[0];
    residual_norm<S>(x2, proj, rows, E, gemma ? L.norm_w[3] : nullptr, L.norm_eps[3], next_w,
                     next_eps, m.norm_mode, x, last ? static_cast<T*>(st.out) : h);
  }
}
#endif

}  // namespace
