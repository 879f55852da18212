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
//
// The kernels live in kernels/*.h, by what they compute; this file is their C interface.

#include "kernels/codes.h"
#include "kernels/common.h"
#include "kernels/decode_attention.h"
#include "kernels/elementwise.h"
#include "kernels/gemm_f32.h"
#include "kernels/head.h"
#include "kernels/plans.h"
#include "kernels/prefill_attention.h"
#include "kernels/products.h"
#include "kernels/sampling.h"
#include "kernels/steps.h"

extern "C" {

// 1 when the vector paths are compiled in (the Python side uses these kernels only then: the
// portable loops are correct but not faster than PyTorch): AVX-512, or AVX2 with FMA.
int pc_vectorized() { return PC_VEC16; }
// 1 on AVX-512, 2 on AVX2 (avx2.h), 0 without either.
int pc_vector_isa() { return PC_AVX512 ? 1 : PC_AVX2 ? 2 : 0; }

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
#if PC_VEC16
void pc_prefill_attention_f32(const float* q, int64_t q_stride, int64_t n, int64_t H, int64_t KVH,
                              int64_t D, const float* keys, const float* values,
                              const int64_t* slots, int64_t L, int64_t k0, int64_t q0,
                              int64_t window, float scale, float* out, int64_t out_stride) {
  prefill_attention_f32(q, q_stride, n, H, KVH, D, keys, values, slots, L, k0, q0, window, scale,
                        out, out_stride);
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

void pc_sample_rows(const float* x, int64_t R, int64_t W, const float* inv_temp,
                    const float* top_p, const float* floor, const double* u, int64_t* out) {
  sample_rows(x, R, W, inv_temp, top_p, floor, u, out);
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

// 1 when int4_rescore is compiled in for bfloat16 (AVX512-BF16); float32's wherever the
// vector paths are.
int pc_int4_rescore_available() { return PC_DPBF16; }
#if PC_DPBF16
void pc_int4_rescore(float* scores, int64_t B, int64_t V, const float* bmax, int64_t block,
                     const uint16_t* x, int64_t K, const uint16_t* weight, int64_t k,
                     int64_t* greedy) {
  int4_rescore<BF16>(scores, B, V, bmax, block, x, K, weight, k, greedy);
}
#endif
#if PC_VEC16
void pc_int4_rescore_f32(float* scores, int64_t B, int64_t V, const float* bmax, int64_t block,
                         const float* x, int64_t K, const float* weight, int64_t k,
                         int64_t* greedy) {
  int4_rescore<F32>(scores, B, V, bmax, block, x, K, weight, k, greedy);
}
#endif

// 1 when decode steps can multiply int8 weights in integers (gemv_int8_vnni: AVX512-VNNI or
// AVX2); native_decode.py says for which dtypes.
int pc_vnni_products() { return PC_INT8_ROWS; }

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

#if PC_INT8_ROWS
// y [B, N] = x [B, K] (q * scales)^T (+ bias) over q laid out by native_decode.vnni_weight;
// scratch: what gemv_int8_vnni asks.
void pc_gemv_int8_vnni_bf16(const uint16_t* x, int64_t B, int64_t K, const uint8_t* p,
                            const uint16_t* scales, const uint16_t* bias, int64_t N, uint16_t* y,
                            void* scratch) {
  gemv_int8_vnni<BF16>(x, B, K, p, scales, bias, N, y, scratch);
}
void pc_gemm_int8_vnni_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K,
                            const uint8_t* p, const uint16_t* scales, int64_t N, uint16_t* y,
                            int64_t ldy, void* scratch) {
  gemm_int8_vnni<BF16>(x, ldx, M, K, p, scales, N, y, ldy, scratch);
}
void pc_gemv_int8_vnni_f32(const float* x, int64_t B, int64_t K, const uint8_t* p,
                           const float* scales, const float* bias, int64_t N, float* y,
                           void* scratch) {
  gemv_int8_vnni<F32>(x, B, K, p, scales, bias, N, y, scratch);
}
void pc_gemm_int8_vnni_f32(const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* p,
                           const float* scales, int64_t N, float* y, int64_t ldy, void* scratch) {
  gemm_int8_vnni<F32>(x, ldx, M, K, p, scales, N, y, ldy, scratch);
}
int64_t pc_vnni_group() { return VNNI_GROUP; }
#endif

// 1 when decode steps (bfloat16 or float32 rows) can read a GGUF file's own codes (gemv_codes).
int pc_codes_products() { return PC_CODES; }
#if PC_CODES
// y [B, N] = x [B, K] W^T (+ bias) over codes laid out by codes.py; scratch: what gemv_codes
// asks.
void pc_gemv_codes_bf16(const uint16_t* x, int64_t B, int64_t K, const uint8_t* p, int64_t bits,
                        int64_t offset, const uint16_t* bias, int64_t N, uint16_t* y,
                        void* scratch) {
  gemv_codes<BF16>(x, B, K, p, static_cast<int>(bits), static_cast<int>(offset), bias, N, y,
                   scratch);
}
void pc_gemv_codes_f32(const float* x, int64_t B, int64_t K, const uint8_t* p, int64_t bits,
                       int64_t offset, const float* bias, int64_t N, float* y, void* scratch) {
  gemv_codes<F32>(x, B, K, p, static_cast<int>(bits), static_cast<int>(offset), bias, N, y,
                  scratch);
}
#endif

#if PC_DPBF16
void pc_gemm_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* w,
                  int64_t N, int64_t block, uint16_t* y, int64_t ldy) {
  gemm_bf16(x, ldx, M, K, w, N, block, y, ldy);
}
void pc_prefill_step_bf16(const PcModel* m, const PcStep* st) { prefill_step<BF16>(*m, *st); }
void pc_pair_dense(const uint32_t* w, int64_t N, int64_t K2, uint32_t* out) {
  pair_dense(w, N, K2, out);
}
#endif
void pc_decode_step_f32(const PcModel* m, const PcStep* st) { decode_step<F32>(*m, *st); }

#if PC_VEC16
// y [M, N] = x [M, K] W^T (+ bias) over W laid out by pc_panel_f32 (models/panels.py).
void pc_gemm_f32(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t N,
                 const float* bias, float* y, int64_t ldy) {
  gemm_f32(x, ldx, M, K, w, N, bias, y, ldy);
}
void pc_panel_f32(const float* w, int64_t N, int64_t K, float* out) { panel_f32(w, N, K, out); }
void pc_prefill_step_f32(const PcModel* m, const PcStep* st) { prefill_step<F32>(*m, *st); }
int64_t pc_f32_panel() { return PANEL; }
#endif

// A float16 KV pool under a float32 model (--kv-dtype float16): 1 when compiled in.
int pc_kv16_available() { return PC_F16; }
#if PC_F16
void pc_decode_attention_f32_kv16(const float* q, int64_t q_stride, const uint16_t* keys,
                                  const uint16_t* values, const int64_t* slots, const float* mask,
                                  float* out, int64_t B, int64_t H, int64_t KVH, int64_t D,
                                  int64_t W, float scale) {
  decode_attention<F32, F16>(q, q_stride, keys, values, slots, mask, out, B, H, KVH, D, W, scale);
}
void pc_prefill_attention_f32_kv16(const float* q, int64_t q_stride, int64_t n, int64_t H,
                                   int64_t KVH, int64_t D, const uint16_t* keys,
                                   const uint16_t* values, const int64_t* slots, int64_t L,
                                   int64_t k0, int64_t q0, int64_t window, float scale,
                                   float* out, int64_t out_stride) {
  prefill_attention_f32<F16>(q, q_stride, n, H, KVH, D, keys, values, slots, L, k0, q0, window,
                             scale, out, out_stride);
}
void pc_decode_step_f32_kv16(const PcModel* m, const PcStep* st) {
  decode_step<F32, F16>(*m, *st);
}
void pc_prefill_step_f32_kv16(const PcModel* m, const PcStep* st) {
  prefill_step<F32, F16>(*m, *st);
}
#endif

}  // extern "C"
