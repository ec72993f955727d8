// The preprocessing kernel's AVX2 loops (CPUs with AVX2 but not AVX-512: AMD Zen 1-3, older Intel), chosen by
// crop_resize_patchify.cpp's dispatch (have_avx2, capped by VIDEOCOM_CPU_ISA). Same integer sums as the portable
// and AVX-512 loops there: bit-identical (tests/test_crop_resize_patchify.py's SIMD tests).
#include "crop_resize_patchify_simd.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

namespace vcf {

// The same sums on AVX2, taps in pairs: the 16-row byte columns of taps j and j+1 interleave into
// (v_j, v_j+1) 16-bit pairs and one vpmaddwd per 8 rows adds both products (the vertical AVX-512 loop's
// arithmetic), where the portable loop's AVX2 clone spends a 32-bit multiply (vpmulld, 2 uops) per tap.
// PIL's 22-bit weights are split w = hi * 2^11 + lo as there. `tin` holds 3 padding columns past the row (tap
// n of an odd count reads them, with weight 0). Integer sums, same values: bit-identical.
template <bool kSplit>
__attribute__((target("avx2"))) static void hpass_mac_avx2_t(const uint8_t* tin, const AxisPlan& p,
                                                           uint8_t* tout) {
  const __m256i half = _mm256_set1_epi32(fixed_half(p.precision)), zero = _mm256_setzero_si256();
  const __m128i shift = _mm_cvtsi32_si128(p.precision);
  for (int ox = 0; ox < p.out; ++ox) {
    const int32_t* k = p.w.data() + (size_t)ox * p.taps;
    const int n = p.size[ox];
    const uint8_t* v = tin + (size_t)3 * p.first[ox] * kRows;
    __m256i a[6], h[6];  // channel c: rows 0-7 in a[2c], rows 8-15 in a[2c + 1] (h: the hi halves' sums)
    for (int i = 0; i < 6; ++i) a[i] = half, h[i] = zero;
    for (int j = 0; j < n; j += 2, v += 6 * kRows) {
      const int32_t w0 = k[j], w1 = j + 1 < n ? k[j + 1] : 0;
      int32_t pair_lo, pair_hi;
      weight_pair<kSplit>(w0, w1, pair_lo, pair_hi);
      const __m256i wl = _mm256_set1_epi32(pair_lo), wh = _mm256_set1_epi32(pair_hi);
      for (int c = 0; c < 3; ++c) {
        const __m128i x = _mm_loadu_si128((const __m128i*)(v + c * kRows));
        const __m128i y = _mm_loadu_si128((const __m128i*)(v + (3 + c) * kRows));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x, y));
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(x, y));
        a[2 * c] = _mm256_add_epi32(a[2 * c], _mm256_madd_epi16(lo, wl));
        a[2 * c + 1] = _mm256_add_epi32(a[2 * c + 1], _mm256_madd_epi16(hi, wl));
        if (kSplit) {
          h[2 * c] = _mm256_add_epi32(h[2 * c], _mm256_madd_epi16(lo, wh));
          h[2 * c + 1] = _mm256_add_epi32(h[2 * c + 1], _mm256_madd_epi16(hi, wh));
        }
      }
    }
    uint8_t* d = tout + (size_t)3 * ox * kRows;
    for (int c = 0; c < 3; ++c) {
      __m256i r0 = a[2 * c], r1 = a[2 * c + 1];
      if (kSplit) {
        r0 = _mm256_add_epi32(r0, _mm256_slli_epi32(h[2 * c], 11));
        r1 = _mm256_add_epi32(r1, _mm256_slli_epi32(h[2 * c + 1], 11));
      }
      // floor shift, then saturating packs clamp to 0..255 like clip8 (packs works per 128-bit lane: the
      // permute puts rows 0-15 back in order)
      const __m256i w16 = _mm256_permute4x64_epi64(
          _mm256_packs_epi32(_mm256_sra_epi32(r0, shift), _mm256_sra_epi32(r1, shift)), 0xD8);
      _mm_storeu_si128((__m128i*)(d + c * kRows),
                       _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)));
    }
  }
}

// vpass_row_avx512 on AVX2: 32 output bytes per block (the unpacks and packs work per 128-bit lane, so lane
// order is restored as there); the last width % 32 bytes take the scalar sums.
template <bool kSplit>
__attribute__((target("avx2"))) static void vpass_row_avx2_t(const uint8_t* rows, int64_t stride,
                                                           const int32_t* w, int n, int width, int precision,
                                                           uint8_t* dst) {
  int32_t lo_pair[kMaxPairs], hi_pair[kMaxPairs];
  const int pairs = weight_pairs<kSplit>(w, n, lo_pair, hi_pair);
  const __m256i half = _mm256_set1_epi32(fixed_half(precision)), zero = _mm256_setzero_si256();
  const __m128i shift = _mm_cvtsi32_si128(precision);
  int i = 0;
  for (; i + 32 <= width; i += 32) {
    __m256i a0 = half, a1 = half, a2 = half, a3 = half, h0 = zero, h1 = zero, h2 = zero, h3 = zero;
    const uint8_t* r = rows + i;
    for (int q = 0; q < pairs; ++q, r += 2 * stride) {
      const __m256i x = _mm256_loadu_si256((const __m256i*)r);
      const __m256i y = 2 * q + 1 < n ? _mm256_loadu_si256((const __m256i*)(r + stride)) : zero;
      const __m256i xy_lo = _mm256_unpacklo_epi8(x, y), xy_hi = _mm256_unpackhi_epi8(x, y);
      const __m256i p0 = _mm256_unpacklo_epi8(xy_lo, zero), p1 = _mm256_unpackhi_epi8(xy_lo, zero);
      const __m256i p2 = _mm256_unpacklo_epi8(xy_hi, zero), p3 = _mm256_unpackhi_epi8(xy_hi, zero);
      const __m256i wl = _mm256_set1_epi32(lo_pair[q]);
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(p0, wl));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(p1, wl));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(p2, wl));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(p3, wl));
      if (kSplit) {
        const __m256i wh = _mm256_set1_epi32(hi_pair[q]);
        h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(p0, wh));
        h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(p1, wh));
        h2 = _mm256_add_epi32(h2, _mm256_madd_epi16(p2, wh));
        h3 = _mm256_add_epi32(h3, _mm256_madd_epi16(p3, wh));
      }
    }
    if (kSplit) {
      a0 = _mm256_add_epi32(a0, _mm256_slli_epi32(h0, 11));
      a1 = _mm256_add_epi32(a1, _mm256_slli_epi32(h1, 11));
      a2 = _mm256_add_epi32(a2, _mm256_slli_epi32(h2, 11));
      a3 = _mm256_add_epi32(a3, _mm256_slli_epi32(h3, 11));
    }
    a0 = _mm256_sra_epi32(a0, shift), a1 = _mm256_sra_epi32(a1, shift);
    a2 = _mm256_sra_epi32(a2, shift), a3 = _mm256_sra_epi32(a3, shift);
    _mm256_storeu_si256((__m256i*)(dst + i),
                        _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3)));
  }
  for (; i < width; ++i) {
    int32_t acc = fixed_half(precision);
    for (int j = 0; j < n; ++j) acc += w[j] * rows[j * stride + i];
    dst[i] = clip8(acc, precision);
  }
}

__attribute__((target("avx2"))) void hpass_mac_avx2(const uint8_t* tin, const AxisPlan& p, uint8_t* tout,
                                                    bool split) {
  if (split) hpass_mac_avx2_t<true>(tin, p, tout);
  else hpass_mac_avx2_t<false>(tin, p, tout);
}

__attribute__((target("avx2"))) void vpass_row_avx2(const uint8_t* rows, int64_t stride, const int32_t* w, int n,
                                                    int width, int precision, uint8_t* dst, bool split) {
  if (split) vpass_row_avx2_t<true>(rows, stride, w, n, width, precision, dst);
  else vpass_row_avx2_t<false>(rows, stride, w, n, width, precision, dst);
}

}  // namespace vcf
#endif
