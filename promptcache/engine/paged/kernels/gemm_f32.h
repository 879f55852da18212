// Float32 products of a step's rows with dense weights (gemm_f32): every product of a float32
// model's layers outside the narrow decode steps (prompt chunks, mixed and wide steps), in the
// PyTorch forward (models/panels.py) and in the whole prompt step alike.

#pragma once

#include "common.h"

namespace {

#if PC_VEC16
// Outputs a panel holds side by side: one vector of 16 float lanes (two halves on AVX2).
constexpr int64_t PANEL = 16;
// Rows of a register tile: R rows x 16 outputs of running sums, a weight vector and a
// broadcast input (AVX2: 12 + 2 + 1 of its 16 registers; AVX-512: 12 + 1 + 1 of 32).
constexpr int F32_TILE = PC_AVX512 ? 12 : 6;

// The R x 16 outputs of R rows x (their K inputs interleaved: x[k * R + r]) with one panel w
// ([K][16]). Each output is one chain of FMAs over its inputs in order, from 0: what a row
// gets never depends on the other rows of its tile or step, nor on the vector width.
template <int R>
inline void f32_tile(const float* x, int64_t K, const float* w, float* y, int64_t ldy,
                     const char* ahead, int64_t ahead_lines) {
  __m512 acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if (k < ahead_lines) _mm_prefetch(ahead + k * 64, _MM_HINT_T0);
    const __m512 wk = _mm512_load_ps(w + k * PANEL);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[k * R + r]), wk, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}

// W [N, K] laid out as gemm_f32 reads it: [N / 16][K][16], 16 outputs side by side.
void panel_f32(const float* w, int64_t N, int64_t K, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < N / PANEL; ++b) {
    // 16 inputs of each of the panel's rows at a time (a cache line each) through a small
    // buffer: rows a power of two apart would otherwise evict each other at every word.
    const float* rows = w + b * PANEL * K;
    float* o = out + b * K * PANEL;
    float tile[PANEL][16];
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t m = std::min<int64_t>(16, K - k0);
      for (int64_t j = 0; j < PANEL; ++j) std::memcpy(tile[j], rows + j * K + k0, sizeof(float) * m);
      for (int64_t k = 0; k < m; ++k)
        for (int64_t j = 0; j < PANEL; ++j) o[(k0 + k) * PANEL + j] = tile[j][k];
    }
  }
}

// y [M, N] = x [M, K] W^T (+ bias) in float32, W laid out by panel_f32, N a multiple of 16:
// each output one chain of FMAs over its inputs in order, then the bias added (one rounding
// more), so a row is the same bits in any step, alone or beside others, on AVX2 or AVX-512.
// The rows are first copied tile by tile with their inputs interleaved (x[k * R + r]), so a
// tile reads one stream, not R rows far apart; the threads take panels of 16 outputs, and a
// panel's tiles are as even as fits (64 rows on AVX2: 9 tiles of 6 and 2 of 5, not 10 of 6
// and one of 4, which reads the panel as often for less work).
void gemm_f32(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w, int64_t N,
              const float* bias, float* y, int64_t ldy) {
  if (M <= 0) return;
  const int64_t tiles = (M + F32_TILE - 1) / F32_TILE;
  const auto rows_of = [&](int64_t t) { return M / tiles + (t < M % tiles ? 1 : 0); };
  const auto first_row = [&](int64_t t) { return t * (M / tiles) + std::min(t, M % tiles); };
  thread_local Scratch<float> packed_s;
  packed_s.reserve(M * K);
  float* packed = packed_s.data();
  const bool parallel = M * N * K >= PARALLEL_MIN_WORK;
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m = first_row(t), rows = rows_of(t);
      float* o = packed + m * K;
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + (m + r) * ldx;
        for (int64_t k = 0; k < K; ++k) o[k * rows + r] = xr[k];
      }
    }
    // The threads take two panels at a time in turn: one that a neighbour or memory slows
    // does not leave the other waiting at the end (Gemma 3 270M's 18 layers, medians in
    // turns on a 2-core Zen 3: 64 rows -2-9%, 512 rows -8-9%, against static shares).
#pragma omp for schedule(dynamic, 2)
    for (int64_t b = 0; b < N / PANEL; ++b) {
      const float* wb = w + b * PANEL * K;
      // The next panel's weights (K lines) on their way, a share during each tile: the first
      // tile of a panel otherwise waits on memory for its weights. (After a pair's second
      // panel the next may be the other thread's: then it meets them in the shared L3.)
      const char* next =
          b + 1 < N / PANEL ? reinterpret_cast<const char*>(wb + PANEL * K) : nullptr;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = first_row(t), rows = rows_of(t);
        const float* xt = packed + m * K;
        float* yt = y + m * ldy + b * PANEL;
        const int64_t lo = t * K / tiles, hi = (t + 1) * K / tiles;
        const char* ahead = next ? next + lo * 64 : nullptr;
        const int64_t lines = next ? hi - lo : 0;
        switch (rows) {
#define PC_CASE(n)                                                 \
  case n:                                                          \
    f32_tile<n>(xt, K, wb, yt, ldy, ahead, lines);                 \
    break;
          PC_CASE(1) PC_CASE(2) PC_CASE(3) PC_CASE(4) PC_CASE(5) PC_CASE(6)
#if PC_AVX512
          PC_CASE(7) PC_CASE(8) PC_CASE(9) PC_CASE(10) PC_CASE(11) PC_CASE(12)
#endif
#undef PC_CASE
          default:
            break;
        }
        if (bias) {
          for (int64_t r = 0; r < rows; ++r) {
            float* yr = yt + r * ldy;
            _mm512_storeu_ps(yr, _mm512_add_ps(_mm512_loadu_ps(yr), _mm512_loadu_ps(bias + b * PANEL)));
          }
        }
      }
    }
  }
}
#endif  // PC_VEC16

}  // namespace
