// The hand-written AVX2 loops of the CPU preprocessing kernel (csrc/cpu/crop_resize_patchify_avx2.cpp, split
// from crop_resize_patchify.cpp at the passes' seam) and the vpmaddwd weight-pair helpers they share with the
// AVX-512 loops there.
#pragma once

#include <cstdint>

#include "crop_resize_patchify.h"

namespace vcf {

// Rows per block of the horizontal pass (transposed so that 16 rows' values of one column sit side by side).
constexpr int kRows = 16;

// Two 16-bit weights as one int32 lane of a vpmaddwd operand (w0 in the low word).
inline int32_t pair16(int32_t w0, int32_t w1) {
  return (int32_t)((uint32_t)(uint16_t)w0 | ((uint32_t)(uint16_t)w1 << 16));
}

// Two taps' weights as vpmaddwd pairs: whole when they fit int16 (kSplit false; hi = 0), else PIL's 22-bit
// weights split into their low 11 bits and the rest, the loops recombining the sums as lo + (hi << 11).
template <bool kSplit>
inline void weight_pair(int32_t w0, int32_t w1, int32_t& lo, int32_t& hi) {
  lo = kSplit ? pair16(w0 & 0x7FF, w1 & 0x7FF) : pair16(w0, w1);
  hi = kSplit ? pair16(w0 >> 11, w1 >> 11) : 0;
}

// The vertical loops' taps as vpmaddwd weight pairs (w_2q, w_2q+1; 0 past n), split lo / hi when kSplit.
constexpr int kMaxPairs = 128;
template <bool kSplit>
inline int weight_pairs(const int32_t* w, int n, int32_t* lo_pair, int32_t* hi_pair) {
  const int pairs = (n + 1) / 2;
  for (int q = 0; q < pairs; ++q) {
    const int32_t w0 = w[2 * q], w1 = 2 * q + 1 < n ? w[2 * q + 1] : 0;
    weight_pair<kSplit>(w0, w1, lo_pair[q], hi_pair[q]);
  }
  return pairs;
}

#if defined(__GNUC__) && defined(__x86_64__)
// tin: input columns x 16 rows (plus 3 padding columns) -> tout: output columns x 16 rows; split: PIL's 22-bit
// weights (else every weight fits int16, plan.madd).
void hpass_mac_avx2(const uint8_t* tin, const AxisPlan& p, uint8_t* tout, bool split);
// One output row of the vertical pass: rows of `stride` bytes, n taps w (at most 2 * kMaxPairs), width bytes.
void vpass_row_avx2(const uint8_t* rows, int64_t stride, const int32_t* w, int n, int width, int precision,
                    uint8_t* dst, bool split);
#endif

}  // namespace vcf
