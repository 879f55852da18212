// Which slots of the pool a step's rows attend over, and their masks (decode_plan,
// prefill_plan).

#pragma once

#include "common.h"

namespace {

// The decode rows' keys for one window (attention.PagedAttention._decode_keys): row b sees
// positions lo_b .. starts[b] (lo_b = starts[b] + 1 - window, at least 0; window 0: all),
// packed from the left into slots [B, W] through its block table (tables [B, N], block_tokens
// bt); the rest of the row reads slot 0 (the null block), masked: valid [B, W] (1 / 0) and
// additive [B, W] (0 / -inf).
void decode_plan(const int64_t* tables, int64_t B, int64_t N, const int64_t* starts, int64_t bt,
                 int64_t window, int64_t W, int64_t* slots, uint8_t* valid, float* additive) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t end = starts[b] + 1;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, end - window) : 0;
    const int64_t* table = tables + b * N;
    for (int64_t i = 0; i < W; ++i) {
      const int64_t pos = lo + i;
      const bool seen = pos < end;
      const int64_t blk = std::min(pos / bt, N - 1);
      slots[b * W + i] = seen ? table[blk] * bt + pos % bt : 0;
      valid[b * W + i] = seen;
      additive[b * W + i] = seen ? 0.0f : -INFINITY;
    }
  }
}

// A prefill chunk's keys for one window (attention.PagedAttention._prefill_keys): the slots of
// positions lo .. end - 1 through the chunk's block table (blocks, block_tokens bt) into slots
// [end - lo]; with mask (not null), which of them each query start .. end - 1 sees, [end -
// start, end - lo] (1 / 0): a key at or before the query's position and, with a window (0:
// none), within its last `window` positions.
void prefill_plan(const int64_t* blocks, int64_t bt, int64_t lo, int64_t start, int64_t end,
                  int64_t window, int64_t* slots, uint8_t* mask) {
  const int64_t L = end - lo;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t pos = lo + i;
    slots[i] = blocks[pos / bt] * bt + pos % bt;
  }
  if (!mask) return;
  for (int64_t q = start; q < end; ++q) {
    uint8_t* row = mask + (q - start) * L;
    for (int64_t i = 0; i < L; ++i) {
      const int64_t k = lo + i;
      row[i] = k <= q && (window <= 0 || k > q - window);
    }
  }
}

}  // namespace
