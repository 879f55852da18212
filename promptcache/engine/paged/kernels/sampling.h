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

// Blocks [b0, b1)'s sums of e in float64, each in lane order, into part: 8 blocks at a time,
// whose 8 chains of additions are independent (one block's 16 dependent additions at a time
// took most of sample_rows' time).
inline void block_sums(const float* e, int64_t W, int64_t b0, int64_t b1, double* part) {
  const int64_t whole = std::min(b1, W / 16);  // blocks with 16 lanes
  int64_t b = b0;
  for (; b + 8 <= whole; b += 8) {
    double acc[8] = {};
    for (int i = 0; i < 16; ++i)
      for (int k = 0; k < 8; ++k) acc[k] += static_cast<double>(e[(b + k) * 16 + i]);
    for (int k = 0; k < 8; ++k) part[b + k] = acc[k];
  }
  for (; b < b1; ++b) {
    double sum = 0.0;
    for (int64_t j = b * 16; j < std::min(W, b * 16 + 16); ++j) sum += e[j];
    part[b] = sum;
  }
}

// The exponentials of blocks [b0, b1) of a row of W logits (16 lanes a block from b * 16;
// none past W) at inverse temperature t less the row's maximum mx, 0 below the floor, into e,
// then their block_sums into part. A whole block without a floor goes without masks (AVX2 has
// no masked store but vmaskmovps, slow on AMD's cores): the same operations on the same values,
// so the same bits.
inline void sample_blocks(const float* row, int64_t W, int64_t b0, int64_t b1, float mx,
                          float t, float floor, float* e, double* part) {
#if PC_VEC16
  const bool floored = floor > -INFINITY;
  for (int64_t b = b0; b < b1; ++b) {
    if (b * 16 + 16 <= W && !floored) {
      const __m512 z = _mm512_mul_ps(
          _mm512_sub_ps(_mm512_loadu_ps(row + b * 16), _mm512_set1_ps(mx)), _mm512_set1_ps(t));
      _mm512_storeu_ps(e + b * 16, exp16(z));
    } else {
      const __mmask16 in = lanes(b * 16, W);
      const __m512 v = _mm512_maskz_loadu_ps(in, row + b * 16);
      // Lanes below the floor or past W are exp(-inf) = 0 (exp16 is exactly 0 below -88);
      // those past W are not stored.
      const __mmask16 k = in & _mm512_cmp_ps_mask(v, _mm512_set1_ps(floor), _CMP_GE_OQ);
      const __m512 z = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), k,
                                          _mm512_sub_ps(v, _mm512_set1_ps(mx)),
                                          _mm512_set1_ps(t));
      _mm512_mask_storeu_ps(e + b * 16, in, exp16(z));
    }
  }
#else
  for (int64_t j = b0 * 16; j < std::min(W, b1 * 16); ++j)
    e[j] = row[j] >= floor ? exp1((row[j] - mx) * t) : 0.0f;
#endif
  block_sums(e, W, b0, b1, part);
}

// The sum of a row's block sums part, in block order.
inline double row_total(const double* part, int64_t W) {
  double total = 0.0;
  for (int64_t b = 0; b * 16 < W; ++b) total += part[b];
  return total;
}

// Nucleus (top-p) sampling's cut of a row's exponentials e [W] (0 where excluded), as
// sampling.apply_top_p makes it: in descending order, the tokens until the one whose
// cumulative mass reaches top_p of the total are kept (the most likely at least), the rest
// set to 0, and the blocks' sums redone. Without a sort of the whole row: the masses are first
// summed in 2,048 buckets by the float's exponent and top three mantissa bits (a bucket's
// values all below the next one's), the boundary bucket's values alone are sorted. Ties at
// the cut are kept. Sums in float64 (apply_top_p's cumsum is float32: the cut can differ where
// the mass reaches top_p within its rounding).
inline void nucleus(float* e, double* part, int64_t W, float top_p) {
  constexpr int NB = 2048;
  const double total = row_total(part, W);
  std::vector<double> mass(NB, 0.0);
  const auto key = [](float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    return static_cast<int>(bits >> 20) & (NB - 1);  // e in (0, 1]: sign 0, exponent <= 127
  };
  for (int64_t j = 0; j < W; ++j)
    if (e[j] > 0.0f) mass[key(e[j])] += e[j];
  const double target = static_cast<double>(top_p) * total;
  double above = 0.0;
  int cut = -1;
  for (int k = NB - 1; k >= 0; --k) {
    if (mass[k] > 0.0 && above + mass[k] >= target) {
      cut = k;
      break;
    }
    above += mass[k];
  }
  if (cut < 0) return;  // rounding left the target unreached: every token stays
  std::vector<float> edge;
  for (int64_t j = 0; j < W; ++j)
    if (e[j] > 0.0f && key(e[j]) == cut) edge.push_back(e[j]);
  std::sort(edge.begin(), edge.end(), [](float a, float b) { return a > b; });
  float tau = edge.back();
  double c = above;
  for (float v : edge) {
    c += v;
    if (c >= target) {
      tau = v;
      break;
    }
  }
  for (int64_t j = 0; j < W; ++j)
    if (e[j] < tau) e[j] = 0.0f;
  block_sums(e, W, 0, (W + 15) / 16, part);
}

// Whether a row whose maximum is mx (nan: it holds a NaN) can be drawn from here.
inline bool drawable(float mx, bool nan) { return !nan && mx > -INFINITY && mx != INFINITY; }

// The drawn index of a row from its exponentials e [W] and their block sums part, at the
// draw u: the first whose cumulative sum passes u times the total (the blocks' sums added in
// order). The cumulative sum goes block by block, then element by element inside the block
// where it passes the target, summed from 0 in the block's order: at the block's end it is
// the block's sum exactly, so the target is passed inside it.
inline int64_t sample_pick(const float* e, const double* part, int64_t W, double u) {
  const double target = u * row_total(part, W);
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
  return at;
}

// One token drawn per row of logits x [R, W] (float32) from softmax(x * inv_temp[r]), at the
// uniform draw u[r] in [0, 1): the first index whose cumulative probability passes u (as
// sampling.draw, whose arithmetic this is: exps in float32, their sums in float64), in two
// passes over the row (the maximum; the exps and their sums per 16, kept) and a search of
// the sums, where PyTorch's softmax, cumsum and searchsorted take ~1 ms over 262k logits.
// Rows go to the threads in turn; fewer rows than threads (one stream's) share each row's
// blocks out instead, whose maximum and block sums are the same whichever thread takes them.
// An index of probability 0 is never drawn, nor one below e^-88 of the most likely (exp16's
// 0; PyTorch's softmax gives it a float32 denormal). -1 for a row with a NaN or nothing finite
// (the caller asks PyTorch).
void sample_rows(const float* x, int64_t R, int64_t W, const float* inv_temp,
                 const float* top_p, const float* floor, const double* u, int64_t* out) {
  const int64_t nb = (W + 15) / 16;
  const int threads = omp_get_max_threads();
  const auto floor_of = [&](int64_t r) { return floor ? floor[r] : -INFINITY; };
  bool nucleus_rows = false;
  for (int64_t r = 0; top_p && r < R; ++r) nucleus_rows |= top_p[r] < 1.0f;
  // The exponentials and block sums go to scratch memory (zeroing 1 MB a row took ~10%).
  thread_local Scratch<float> e_s;
  thread_local Scratch<double> part_s;
  if (R < threads && W >= PARALLEL_MIN_WORK && !nucleus_rows) {
    e_s.reserve(W);
    part_s.reserve(nb);
    float* const e = e_s.data();
    double* const part = part_s.data();
    std::vector<float> maxima(threads);
    std::vector<char> nans(threads);
    for (int64_t r = 0; r < R; ++r) {
      const float* row = x + r * W;
      bool usable = false;
#pragma omp parallel
      {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t b0 = nb * id / nt, b1 = nb * (id + 1) / nt;  // this thread's blocks
        bool nan = false;
        maxima[id] = b1 > b0 ? row_max(row + b0 * 16, std::min(W, b1 * 16) - b0 * 16, nan)
                             : -INFINITY;
        nans[id] = nan;
#pragma omp barrier
        float mx = -INFINITY;
        for (int i = 0; i < nt; ++i) {
          nan |= nans[i] != 0;
          mx = maxima[i] > mx ? maxima[i] : mx;
        }
        const bool ok = drawable(mx, nan);
        if (ok) sample_blocks(row, W, b0, b1, mx, inv_temp[r], floor_of(r), e, part);
        if (id == 0) usable = ok;
      }
      out[r] = usable ? sample_pick(e, part, W, u[r]) : -1;
    }
    return;
  }
#pragma omp parallel if (R > 1 && R * W >= PARALLEL_MIN_WORK)
  {
    e_s.reserve(W);  // each thread's own
    part_s.reserve(nb);
    float* const e = e_s.data();
    double* const part = part_s.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const float* row = x + r * W;
      bool nan = false;
      const float mx = row_max(row, W, nan);
      if (!drawable(mx, nan)) {
        out[r] = -1;
        continue;
      }
      sample_blocks(row, W, 0, nb, mx, inv_temp[r], floor_of(r), e, part);
      if (top_p && top_p[r] < 1.0f) nucleus(e, part, W, top_p[r]);
      out[r] = sample_pick(e, part, W, u[r]);
    }
  }
}

}  // namespace
