// Row-wise operations of a layer: norms, the heads' norm and rope, the gated activation,
// a chunk's masked softmax.

#pragma once

#include "common.h"

namespace {

// Sum of squares of n floats.
inline float sum_squares(const float* x, int64_t n) {
  int64_t i = 0;
  float s = 0.0f;
#if PC_VEC16
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
#if PC_VEC16
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(xf + i), _mm512_set1_ps(r));
      S::store16(out + i, _mm512_mul_ps(v, _mm512_loadu_ps(wf + i)));
    }
#endif
    for (; i < n; ++i) out[i] = S::store(xf[i] * r * wf[i]);
  } else {
    const typename S::T* wt = static_cast<const typename S::T*>(w);
#if PC_VEC16
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
#if PC_VEC16
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
#if PC_VEC16
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
#if PC_VEC16
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
#if PC_VEC16
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

}  // namespace
