// The next token of each row of logits: argmax (argmax_rows, argmax_blocks) and a draw
// from softmax at a temperature (sample_rows).

#pragma once

#include "common.h"

namespace {

// The largest of a row's W floats (-inf for none), and whether any is a NaN (into nan).
inline float row_max(const float* row, int64_t W, bool& nan) {
#if PC_VEC16
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
#if PC_VEC16
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

}  // namespace
