// Normalise + merge-window store of the fused CPU kernel, computed instead of looked up (AVX-512 VBMI).
//
// Each 14-value run of a patch row is one channel of 14 consecutive pixels: one masked 42-byte load holds all
// three channels, one byte permute per channel spreads that channel's 14 bytes into zero-extended int32 lanes,
// then float32 convert / subtract / divide (the processors' own operations, in their order) and one masked
// store of 14 values straight into the patch row. ~19 instructions per 42 values instead of ~4 per value, and
// no channel-planar staging copy. Used only when NormFormula reproduces the lookup table (checked per call).
//
// Exactness: the processors' float32 operations in their order (NormFormula); choose_store runs all 768 levels
// through this code and compares them with the lookup table bit for bit before the kernel uses it.
#include "crop_resize_patchify_store.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_*(): a known false "may be used
// uninitialized" under -Wall.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#define VCF_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))

namespace vcf {

#if defined(__GNUC__) && defined(__x86_64__)

struct NormVec {
  __m512 mean[3], std[3];
  __m512d scale;
  int kind;
};

VCF_VBMI static inline NormVec norm_vec(const NormFormula& f) {
  NormVec n;
  for (int c = 0; c < 3; ++c) {
    n.mean[c] = _mm512_set1_ps(f.mean[c]);
    n.std[c] = _mm512_set1_ps(f.std[c]);
  }
  n.scale = _mm512_set1_pd(f.scale);
  n.kind = f.kind;
  return n;
}

// 16 uint8 levels (zero-extended int32 lanes) of channel c -> normalised float32, the formula's exact ops.
VCF_VBMI static inline __m512 normalize16(__m512i v, int c, const NormVec& n) {
  __m512 x;
  if (n.kind == 1) {
    x = _mm512_cvtepi32_ps(v);  // exact: levels are small integers
  } else {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(v)), n.scale));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(v, 1)), n.scale));
    x = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
  }
  return _mm512_div_ps(_mm512_sub_ps(x, n.mean[c]), n.std[c]);
}

// float32 -> bf16 rounded to nearest even (torch's .to(bfloat16) for finite values) / fp16 (F16C rounding).
template <int K>
VCF_VBMI static inline void store14(void* dst, __m512 y) {
  if constexpr (K == kStoreF32) {
    _mm512_mask_storeu_ps(dst, 0x3FFF, y);
  } else if constexpr (K == kStoreBf16) {
    const __m512i b = _mm512_castps_si512(y);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_mask_storeu_epi16(dst, 0x3FFF, _mm512_cvtepi32_epi16(r));
  } else {
    _mm256_mask_storeu_epi16(dst, 0x3FFF, _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// Byte permutes that put channel c of 14 RGB pixels into byte 0 of int32 lanes 0..13 (other bytes zeroed by
// the mask).
VCF_VBMI static inline __m512i channel_index(int c) {
  alignas(64) uint8_t idx[64] = {};
  for (int k = 0; k < 16; ++k) idx[4 * k] = (uint8_t)(c + 3 * std::min(k, kPatch - 1));
  return _mm512_load_si512(idx);
}
constexpr __mmask64 kLane0Bytes = 0x1111111111111111ULL;

template <int K>
VCF_VBMI static void write_window_row_vbmi(const uint8_t* band0, const uint8_t* band1, int out_w, int wy,
                                           const NormVec& n, void* out_v) {
  using T = std::conditional_t<K == kStoreF32, uint32_t, uint16_t>;
  T* out = static_cast<T*>(out_v);
  const int gw = out_w / kPatch;
  const size_t width = (size_t)3 * out_w;
  const __mmask64 pixels14 = (1ULL << (3 * kPatch)) - 1;  // 42 bytes: never reads past the row
  const __m512i perm[3] = {channel_index(0), channel_index(1), channel_index(2)};
  const bool image = band1 == band0;  // one frame fills both temporal slots: compute once, store twice
  // A merge window's 4 patch rows are contiguous in the output (4 x 1176 values, a whole number of cache lines):
  // build them in L1, then stream them out with non-temporal stores, which skip the read-for-ownership of
  // output lines that ordinary stores pay (the output is far larger than the caches and not re-read here).
  constexpr int kWinVals = kMerge * kMerge * kPatchDim;
  alignas(64) T stage[kWinVals];
  constexpr int kLines = (int)(kWinVals * sizeof(T) / 64);
  static_assert(kWinVals * sizeof(T) % 64 == 0, "window rows are whole cache lines");
  for (int wx = 0; wx < gw / kMerge; ++wx) {
    T* win = out + patch_row(wy, wx, 0, 0, gw) * kPatchDim;
    for (int my = 0; my < kMerge; ++my)
      for (int mx = 0; mx < kMerge; ++mx) {
        T* row = stage + (my * kMerge + mx) * kPatchDim;
        const size_t x0 = (size_t)3 * (wx * kWindow + mx * kPatch) + (size_t)my * kPatch * width;
        for (int t = 0; t < (image ? 1 : kTemporal); ++t) {
          const uint8_t* b = (t ? band1 : band0) + x0;
          for (int y = 0; y < kPatch; ++y) {
            const __m512i v = _mm512_maskz_loadu_epi8(pixels14, b + y * width);
            for (int c = 0; c < 3; ++c) {
              const __m512 r = normalize16(_mm512_maskz_permutexvar_epi8(kLane0Bytes, perm[c], v), c, n);
              store14<K>(row + patch_col(c, t, y, 0), r);
              if (image) store14<K>(row + patch_col(c, 1, y, 0), r);
            }
          }
        }
      }
    if (((uintptr_t)win & 63) == 0) {
      for (int l = 0; l < kLines; ++l)
        _mm512_stream_si512((__m512i*)win + l, _mm512_load_si512((const __m512i*)stage + l));
    } else {
      std::memcpy(win, stage, sizeof(stage));
    }
  }
  _mm_sfence();  // streamed stores are weakly ordered: make them visible before the task ends
}

// Which store the formula supports for this table: all 768 levels through the SIMD code, compared bit for bit.
template <int K>
VCF_VBMI static bool formula_matches(const NormFormula& f, const void* lut) {
  using T = std::conditional_t<K == kStoreF32, uint32_t, uint16_t>;
  const NormVec n = norm_vec(f);
  alignas(64) T got[16];
  for (int c = 0; c < 3; ++c)
    for (int v0 = 0; v0 < 256; v0 += 16) {
      const __m512i v = _mm512_add_epi32(_mm512_set1_epi32(v0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                   11, 12, 13, 14, 15));
      store14<K>(got, normalize16(v, c, n));
      store14<K>(got + 2, normalize16(_mm512_add_epi32(v, _mm512_set1_epi32(2)), c, n));  // lanes 14, 15
      if (std::memcmp(got, static_cast<const T*>(lut) + c * 256 + v0, sizeof(got)) != 0) return false;
    }
  return true;
}
#endif

int choose_store(const void* lut, int elem_size, const NormFormula* f, bool vbmi) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (f == nullptr || (f->kind != 1 && f->kind != 2) || !vbmi) return kStoreTable;
  if (elem_size == 4) return formula_matches<kStoreF32>(*f, lut) ? kStoreF32 : kStoreTable;
  if (formula_matches<kStoreBf16>(*f, lut)) return kStoreBf16;
  if (formula_matches<kStoreF16>(*f, lut)) return kStoreF16;
#else
  (void)lut, (void)elem_size, (void)f, (void)vbmi;
#endif
  return kStoreTable;
}

void write_window_row_simd(int store, const uint8_t* band0, const uint8_t* band1, int out_w, int wy,
                           const NormFormula& formula, void* out) {
#if defined(__GNUC__) && defined(__x86_64__)
  const NormVec n = norm_vec(formula);
  if (store == kStoreF32) write_window_row_vbmi<kStoreF32>(band0, band1, out_w, wy, n, out);
  else if (store == kStoreBf16) write_window_row_vbmi<kStoreBf16>(band0, band1, out_w, wy, n, out);
  else write_window_row_vbmi<kStoreF16>(band0, band1, out_w, wy, n, out);
#else
  (void)store, (void)band0, (void)band1, (void)out_w, (void)wy, (void)formula, (void)out;  // choose_store: table
#endif
}

}  // namespace vcf
