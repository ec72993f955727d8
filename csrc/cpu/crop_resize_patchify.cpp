// CPU fused crop -> resize -> normalize -> patchify for Qwen2.5-VL pixel_values.
//
// What is fused: the crop is a pointer offset (no copy); a task walks one temporal patch window row by window
// row (28 output rows): the horizontal pass filters each input row once, just before the vertical pass needs
// it (HRows), both frames' 28 resized rows go to thread-local bands that stay in L1/L2, and are normalised and
// written straight into merge-window order, both temporal slots of a patch at once (an image's frame is
// computed once, written twice).
// Bytes moved per output pixel (3 channels): read the source once, write 2 * 3 * sizeof(out). The unfused
// processors write and re-read the resized uint8 image, a float32 normalised copy (12 B/pixel), a permuted
// copy (12 B) and, for images, the temporal expansion (24 B): about 5x the bytes, in 4 passes over memory.
// Measured (1 thread, AVX-512 VBMI, 32 frames 640x360 -> 54 MB fp32, phase timer, into a reused buffer):
// horizontal 4.2 ms, vertical 1.2, normalise + layout 2.5, total ~8 ms, plus ~2 ms of first-touch page
// faults on a fresh output buffer (with huge pages). Before this loop set: 15-16 ms (horizontal 4.2 with the
// transposing loop, vertical 4.5, table + layout 6.2). The horizontal pass is the next target: its compute
// is ~2.9 ms with the source in cache, the rest is the cold read of the 22 MB source.
// SIMD, chosen at run time (set_cpu_simd(false) forces the portable loops, for tests; all integer sums are
// the libraries' own, so every path is bit-identical):
//   horizontal  AVX-512 VBMI: per 16 output bytes, a two-source byte permute gathers each byte's taps as
//               16-bit pairs from a 128-byte window and one vpmaddwd per tap pair adds them (hpass_rows_vbmi);
//               for downscales beyond ~4x (wider windows) or without VBMI: 16-row blocks transposed in 16x16
//               byte tiles, one 16-lane multiply-add per tap (AVX-512BW hand loop or the portable loop);
//               AVX2 without AVX-512: the same tiles, taps in pairs through vpmaddwd (hpass_mac_avx2).
//               Tried and dropped: VNNI vpdpbusd on 4 taps at once with PIL's 22-bit weights as 7-bit digits
//               (3-4 per weight): fewer instructions, but 1.0x (3 digits) to 2x slower (4 digits) on this CPU.
//   vertical    AVX-512BW: register-blocked, 64 output bytes in registers over all taps, tap pairs through
//               vpmaddwd (vpass_row_avx512); AVX2: the same with 32 bytes (vpass_row_avx2); else the portable
//               loop (compiler-vectorised). Measured on a 2-core AMD EPYC with AVX2 only (bench_crop_resize_patchify,
//               1 thread, same run): the AVX2 loops take the 32-frame video from 85.9 to 23.8 ms and the 8 crops
//               from 24.2 to 5.8 ms against the portable loops (3.6x, 4.2x).
//   store       AVX-512 VBMI: values computed from the table's closed form, written straight into merge-window
//               order (crop_resize_patchify_store.cpp), used only where it equals the table bit for bit.
// Plans (taps, weights, permute indices) are cached by (mode, in, out) (cached_plan), scratch buffers are
// per thread and kept across calls: 8 crops of 1280x720 frames went from ~2.2 to ~1.65 ms of kernel CPU time.
// Page faults: the output buffer's interior is madvise(MADV_HUGEPAGE)d before it is first written (see
// advise_huge_pages): a fresh 54 MB buffer costs ~26 ms of faults with 4 KiB pages on this VM, ~2-4 ms with 2 MiB.
// Exactness: the arithmetic is PIL's / ATen's own (csrc/include/crop_resize_patchify.h): uint8 results
// between the two passes, integer fixed point, so outputs equal the oracles bit for bit.
// Parallelism: tasks (item, temporal patch, window rows) on run_tasks (crop_resize_patchify_pool.cpp: the
// caller plus helper threads that join when they wake; no end-of-loop barrier, no spin-waiting: the caller waits
// only for tasks a helper has already claimed, never for a helper the OS has not scheduled yet). A task is a
// whole temporal slice when there are enough of them (videos), else one 28-row window row (a few images).
// Threads: omp_get_max_threads() (torch.set_num_threads sets it too).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_isa.h"
#include "crop_resize_patchify.h"
#include "crop_resize_patchify_pool.h"
#include "crop_resize_patchify_simd.h"
#include "crop_resize_patchify_store.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 conversion intrinsics start from _mm512_undefined_*(): a known false "may be used
// uninitialized" under -Wall.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// One binary for every x86-64: the loader picks the widest ISA this CPU has for the hot loops.
#define VCF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VCF_CLONES
#endif

namespace vcf {

AxisPlan make_axis_plan(int mode, int in, int out) {
  AxisPlan p;
  p.in = in;
  p.out = out;
  p.identity = in == out;
  p.taps = axis_max_taps(in, out);
  p.first.resize(out);
  p.size.resize(out);
  std::vector<double> wd((size_t)out * p.taps);
  double wmax = 0.0;
  for (int i = 0; i < out; ++i) {
    int first = 0, size = 0;
    wmax = std::max(wmax, axis_weights(mode, in, out, i, p.taps, &first, &size, &wd[(size_t)i * p.taps]));
    p.first[i] = first;
    p.size[i] = size;
  }
  p.precision = mode == kPil ? kPilPrecision : torch_precision(wmax);
  p.w.resize(wd.size());
  for (size_t j = 0; j < wd.size(); ++j) p.w[j] = to_fixed(wd[j], p.precision);
  return p;
}

// --- the two passes -------------------------------------------------------------------------------------
// Horizontal, 16 rows at a time: the block is transposed (16x16 byte tiles, SSE2) so that the 16 rows' values
// of one input column sit side by side; each tap is then one multiply-add over 16 int32 lanes (one AVX-512
// instruction) with one weight for all lanes, instead of 16 scalar ones; the 16-lane results are transposed
// back the same way. Integer arithmetic, same sums in any order (no overflow: sum |w| * 255 < 2^31): bit-identical.

// Runtime ISA choice for the hand-written loops (AVX-512 VBMI, AVX-512, AVX2), capped by VIDEOCOM_CPU_ISA as
// the kernels with per-ISA copies are (cpu_isa.h: tests run the AVX2 loops on AVX-512 machines that way);
// set_cpu_simd(false) forces the portable loops (tests).
static std::atomic<bool> g_simd{true};

static bool have_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         vcf::cpu_isa() == vcf::Isa::avx512;
  return ok;
#else
  return false;
#endif
}

// Byte permutes (VBMI) for the horizontal pass and the computed normalisation store.
static bool have_avx512_vbmi() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool ok = have_avx512() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi");
  return ok;
#else
  return false;
#endif
}
#define VCF_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))

// AVX2 without AVX-512 (AMD Zen 1-3, older Intel): 16-bit multiply-add loops for both passes.
static bool have_avx2() {
#if defined(__GNUC__) && defined(__x86_64__)
  static const bool ok = __builtin_cpu_supports("avx2") && vcf::cpu_isa() >= vcf::Isa::avx2;
  return ok;
#else
  return false;
#endif
}

// The choice is made once, on the caller's thread at the entry points (a bad VIDEOCOM_CPU_ISA is a ValueError
// there, never an exception inside a helper thread).
static void resolve_isa() { (void)have_avx512_vbmi(), (void)have_avx2(); }

const char* cpu_simd_isa() {
  if (!g_simd) return "portable";
  if (have_avx512()) return have_avx512_vbmi() ? "avx512_vbmi" : "avx512";
  return have_avx2() ? "avx2" : "portable";
}


bool set_cpu_simd(bool enabled) {
  return g_simd.exchange(enabled);
}



// dst[c][r] = src[r][c] for a 16 x 16 byte tile; src rows by pointer (a short block repeats its last row).
static inline void transpose16(const uint8_t* const* src, int64_t src_off, uint8_t* dst, int64_t dst_stride) {
#if defined(__SSE2__)
  __m128i a[16], b[16];
  for (int r = 0; r < 16; ++r) a[r] = _mm_loadu_si128((const __m128i*)(src[r] + src_off));
  for (int g = 0; g < 8; ++g) {  // rows 2g, 2g+1: columns 0-7 | 8-15, interleaved by byte
    b[2 * g] = _mm_unpacklo_epi8(a[2 * g], a[2 * g + 1]);
    b[2 * g + 1] = _mm_unpackhi_epi8(a[2 * g], a[2 * g + 1]);
  }
  for (int q = 0; q < 4; ++q)  // rows 4q..4q+3: a[4q + k] holds columns 4k..4k+3
    for (int h = 0; h < 2; ++h) {
      a[4 * q + 2 * h] = _mm_unpacklo_epi16(b[4 * q + h], b[4 * q + 2 + h]);
      a[4 * q + 2 * h + 1] = _mm_unpackhi_epi16(b[4 * q + h], b[4 * q + 2 + h]);
    }
  for (int o = 0; o < 2; ++o)  // rows 8o..8o+7: b[8o + m] holds columns 2m, 2m+1
    for (int k = 0; k < 4; ++k) {
      b[8 * o + 2 * k] = _mm_unpacklo_epi32(a[8 * o + k], a[8 * o + 4 + k]);
      b[8 * o + 2 * k + 1] = _mm_unpackhi_epi32(a[8 * o + k], a[8 * o + 4 + k]);
    }
  for (int m = 0; m < 8; ++m) {
    _mm_storeu_si128((__m128i*)(dst + (2 * m) * dst_stride), _mm_unpacklo_epi64(b[m], b[8 + m]));
    _mm_storeu_si128((__m128i*)(dst + (2 * m + 1) * dst_stride), _mm_unpackhi_epi64(b[m], b[8 + m]));
  }
#else
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) dst[c * dst_stride + r] = src[r][src_off + c];
#endif
}

// tin: input columns x 16 rows (bytes) -> tout: output columns x 16 rows, portable loop (vectorised by the
// compiler over the 16 rows).
VCF_CLONES static void hpass_mac(const uint8_t* tin, const AxisPlan& p, uint8_t* tout) {
  const int32_t half = fixed_half(p.precision);
  for (int ox = 0; ox < p.out; ++ox) {
    const int32_t* k = p.w.data() + (size_t)ox * p.taps;
    const int n = p.size[ox];
    for (int c = 0; c < 3; ++c) {
      int32_t a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = half;
      const uint8_t* col = tin + (size_t)(3 * p.first[ox] + c) * kRows;
      for (int j = 0; j < n; ++j) {
        const int32_t w = k[j];
        const uint8_t* v = col + (size_t)j * 3 * kRows;
        for (int r = 0; r < kRows; ++r) a[r] += w * v[r];
      }
      uint8_t* d = tout + (size_t)(3 * ox + c) * kRows;
      for (int r = 0; r < kRows; ++r) d[r] = clip8(a[r], p.precision);
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// Same loop by hand: the 3 channels of a tap are 48 contiguous bytes -> 3 accumulators, one broadcast weight.
__attribute__((target("avx512f,avx512bw"))) static void hpass_mac_avx512(const uint8_t* tin, const AxisPlan& p,
                                                                          uint8_t* tout) {
  const __m512i half = _mm512_set1_epi32(fixed_half(p.precision)), lo = _mm512_setzero_si512(),
                hi = _mm512_set1_epi32(255);
  const __m128i shift = _mm_cvtsi32_si128(p.precision);
  for (int ox = 0; ox < p.out; ++ox) {
    const int32_t* k = p.w.data() + (size_t)ox * p.taps;
    const int n = p.size[ox];
    const uint8_t* v = tin + (size_t)3 * p.first[ox] * kRows;
    __m512i a0 = half, a1 = half, a2 = half;
    for (int j = 0; j < n; ++j, v += 3 * kRows) {
      const __m512i w = _mm512_set1_epi32(k[j]);
      a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(w, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)v))));
      a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(w, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(v + 16)))));
      a2 = _mm512_add_epi32(a2, _mm512_mullo_epi32(w, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(v + 32)))));
    }
    uint8_t* d = tout + (size_t)3 * ox * kRows;  // arithmetic shift = floor, then clamp: clip8 per lane
    _mm_storeu_si128((__m128i*)d, _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_sra_epi32(a0, shift), lo), hi)));
    _mm_storeu_si128((__m128i*)(d + 16), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_sra_epi32(a1, shift), lo), hi)));
    _mm_storeu_si128((__m128i*)(d + 32), _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(_mm512_sra_epi32(a2, shift), lo), hi)));
  }
}

#endif

// --- horizontal pass without transposes (AVX-512 VBMI) -------------------------------------------------------
// For 16 consecutive output bytes (a "group": 5 1/3 pixels), every tap they read lies in a 128-byte window of the
// input row (for downscales up to ~4x). A two-source byte permute (vpermt2b) with a zeroing mask then places, for
// each output byte, its channel's taps 2q and 2q+1 as a zero-extended 16-bit pair in that byte's int32 lane, and
// one vpmaddwd with per-lane weight pairs adds both taps: 3 instructions per tap pair for 16 outputs, and
// the permute indices and weights are precomputed once per axis. Four rows share each index / weight load.
// The same integer sums as hpass_mac (22-bit PIL weights split as in vpass_row_avx512): bit-identical.
struct HPlan : AxisPlan {
  bool simd = false, split = false;  // simd: every group fits its window (else the transposing loop runs)
  bool madd = false;                  // weights fit vpmaddwd (as int16, or split when `split`): the AVX2 loop
  int groups = 0, pairs = 0;
  std::vector<int32_t> start;                 // window start byte of each group
  std::vector<int32_t> group_pairs;           // tap pairs the group's widest output needs (<= pairs: `taps` is
                                              // an upper bound, most outputs have 1-2 taps fewer)
  std::vector<uint8_t> idx;                   // (groups, pairs, 64) permute indices
  std::vector<int32_t> wlo, whi;              // (groups, pairs, 16) weight pairs (lo / hi halves when split)
};

static HPlan make_hplan(int mode, int in, int out) {
  HPlan h;
  static_cast<AxisPlan&>(h) = make_axis_plan(mode, in, out);
  int32_t wmin = 0, wmax = 0;
  for (int32_t w : h.w) wmin = std::min(wmin, w), wmax = std::max(wmax, w);
  if (h.identity || wmin < -(1 << 26) || wmax >= (1 << 26)) return h;
  h.split = wmin < -32768 || wmax >= 32768;
  h.madd = true;
  const int out_bytes = 3 * out;
  h.groups = (out_bytes + 15) / 16;
  h.pairs = (h.taps + 1) / 2;
  h.start.resize(h.groups);
  h.group_pairs.assign(h.groups, 0);
  h.idx.assign((size_t)h.groups * h.pairs * 64, 0);
  h.wlo.assign((size_t)h.groups * h.pairs * 16, 0);
  h.whi.assign(h.wlo.size(), 0);
  for (int g = 0; g < h.groups; ++g) {
    const int ws = 3 * h.first[16 * g / 3];
    h.start[g] = ws;
    for (int k = 0; k < 16 && 16 * g + k < out_bytes; ++k) {
      const int b = 16 * g + k, ox = b / 3, c = b % 3;
      h.group_pairs[g] = std::max(h.group_pairs[g], (h.size[ox] + 1) / 2);
      for (int j = 0; j < h.size[ox]; ++j) {
        const int at = 3 * (h.first[ox] + j) + c - ws;
        if (at < 0 || at >= 128) {  // window too wide (strong downscale): the transposing loop runs
          h.idx.clear(), h.wlo.clear(), h.whi.clear();
          return h;
        }
        const size_t q = (size_t)g * h.pairs + j / 2;
        h.idx[q * 64 + 4 * k + 2 * (j % 2)] = (uint8_t)at;
        const int32_t w = h.w[(size_t)ox * h.taps + j];
        const int32_t lo = h.split ? (w & 0x7FF) : w, hi = w >> 11;
        h.wlo[q * 16 + k] |= (int32_t)((uint32_t)(uint16_t)lo << (16 * (j % 2)));
        h.whi[q * 16 + k] |= (int32_t)((uint32_t)(uint16_t)hi << (16 * (j % 2)));
      }
    }
  }
  h.simd = true;
  return h;
}

// Plans depend only on (mode, in, out): every frame of a video, and crops or frames of equal sizes, share them.
// Building the two plans of a 1280x720 -> 420x224 crop costs ~0.06 ms, about a tenth of its whole resize, so
// recent ones are kept (a small map, emptied when full; plans are immutable and shared by pointer).
template <typename Plan>
static std::shared_ptr<const Plan> cached_plan(int mode, int in, int out, Plan (*make)(int, int, int)) {
  static std::mutex mu;
  static std::unordered_map<uint64_t, std::shared_ptr<const Plan>> plans;
  const uint64_t key = ((uint64_t)mode << 62) | ((uint64_t)(uint32_t)in << 31) | (uint32_t)out;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto hit = plans.find(key);
    if (hit != plans.end()) return hit->second;
  }
  auto plan = std::make_shared<const Plan>(make(mode, in, out));
  std::lock_guard<std::mutex> lock(mu);
  if (plans.size() >= 128) plans.clear();
  plans.emplace(key, plan);
  return plan;
}

#if defined(__GNUC__) && defined(__x86_64__)
template <bool kSplit>
VCF_VBMI static void hpass_rows_vbmi(const uint8_t* src, int64_t stride, int nrows, const HPlan& p, uint8_t* dst,
                                     int64_t dst_stride) {
  constexpr int kR = 4;
  const int in_bytes = 3 * p.in, out_bytes = 3 * p.out;
  const __m512i half = _mm512_set1_epi32(fixed_half(p.precision)), zero = _mm512_setzero_si512();
  const __m128i shift = _mm_cvtsi32_si128(p.precision);
  const __mmask64 pairs16 = 0x5555555555555555ULL;  // bytes 0 and 2 of each int32 lane: two zero-extended words
  for (int r0 = 0; r0 < nrows; r0 += kR) {
    const int m = std::min(kR, nrows - r0);
    const uint8_t* rows[kR];
    for (int k = 0; k < kR; ++k) rows[k] = src + (int64_t)(r0 + std::min(k, m - 1)) * stride;
    for (int g = 0; g < p.groups; ++g) {
      const int ws = p.start[g], avail = in_bytes - ws;
      const __mmask64 m0 = avail >= 64 ? ~0ULL : (1ULL << avail) - 1;
      const __mmask64 m1 = avail >= 128 ? ~0ULL : avail > 64 ? (1ULL << (avail - 64)) - 1 : 0;
      __m512i lo[kR], hi[kR], acc[kR], acch[kR];
      for (int k = 0; k < kR; ++k) {
        if (avail >= 128) {  // plain loads where possible: masked loads that miss the cache are slow on AMD
          _mm_prefetch((const char*)rows[k] + ws + 384, _MM_HINT_T0);
          lo[k] = _mm512_loadu_si512(rows[k] + ws);
          hi[k] = _mm512_loadu_si512(rows[k] + ws + 64);
        } else {
          lo[k] = _mm512_maskz_loadu_epi8(m0, rows[k] + ws);
          hi[k] = _mm512_maskz_loadu_epi8(m1, rows[k] + ws + 64);
        }
        acc[k] = half;
        acch[k] = zero;
      }
      const size_t q0 = (size_t)g * p.pairs;
      for (int q = 0; q < p.group_pairs[g]; ++q) {
        const __m512i idx = _mm512_loadu_si512(p.idx.data() + (q0 + q) * 64);
        const __m512i wl = _mm512_loadu_si512(p.wlo.data() + (q0 + q) * 16);
        const __m512i wh = kSplit ? _mm512_loadu_si512(p.whi.data() + (q0 + q) * 16) : zero;
        for (int k = 0; k < kR; ++k) {
          const __m512i v = _mm512_maskz_permutex2var_epi8(pairs16, lo[k], idx, hi[k]);
          acc[k] = _mm512_add_epi32(acc[k], _mm512_madd_epi16(v, wl));
          if (kSplit) acch[k] = _mm512_add_epi32(acch[k], _mm512_madd_epi16(v, wh));
        }
      }
      const int nb = std::min(16, out_bytes - 16 * g);
      const __mmask16 sm = (__mmask16)((1u << nb) - 1);
      for (int k = 0; k < m; ++k) {
        __m512i a = kSplit ? _mm512_add_epi32(acc[k], _mm512_slli_epi32(acch[k], 11)) : acc[k];
        a = _mm512_max_epi32(_mm512_sra_epi32(a, shift), zero);  // floor, clamp below; saturation clamps above
        // register-form narrowing + masked store: the memory form of vpmovusdb is microcoded (slow) on AMD
        _mm_mask_storeu_epi8(dst + (int64_t)(r0 + k) * dst_stride + 16 * g, sm, _mm512_cvtusepi32_epi8(a));
      }
    }
  }
}
#endif

// rows [0, nrows) of `src` (row stride in bytes, in RGB pixels each) -> dst rows (out pixels each).
static void hpass_rows(const uint8_t* src, int64_t stride, int nrows, const HPlan& p, uint8_t* dst,
                       int64_t dst_stride, std::vector<uint8_t>& tin, std::vector<uint8_t>& tout) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (p.simd && g_simd && have_avx512_vbmi()) {
    if (p.split) hpass_rows_vbmi<true>(src, stride, nrows, p, dst, dst_stride);
    else hpass_rows_vbmi<false>(src, stride, nrows, p, dst, dst_stride);
    return;
  }
#endif
  const int in_bytes = 3 * p.in, out_bytes = 3 * p.out;
  tin.resize((size_t)(in_bytes + 3) * kRows);  // + 3 columns read (with weight 0) by the AVX2 loop
  tout.resize((size_t)out_bytes * kRows);
#if defined(__GNUC__) && defined(__x86_64__)
  const bool simd = g_simd && have_avx512(), avx2 = !simd && g_simd && p.madd && have_avx2();
#endif
  for (int r0 = 0; r0 < nrows; r0 += kRows) {
    const int m = std::min(kRows, nrows - r0);
    const uint8_t* rows[kRows];
    for (int r = 0; r < kRows; ++r) rows[r] = src + (int64_t)(r0 + std::min(r, m - 1)) * stride;  // short block:
    int x = 0;                                                           // repeat the last row (not stored)
    for (; x + 16 <= in_bytes; x += 16) transpose16(rows, x, tin.data() + (size_t)x * kRows, kRows);
    for (; x < in_bytes; ++x)
      for (int r = 0; r < kRows; ++r) tin[(size_t)x * kRows + r] = rows[r][x];
#if defined(__GNUC__) && defined(__x86_64__)
    if (simd) hpass_mac_avx512(tin.data(), p, tout.data());
    else if (avx2) hpass_mac_avx2(tin.data(), p, tout.data(), p.split);
    else
#endif
      hpass_mac(tin.data(), p, tout.data());
    uint8_t* drow[kRows];
    uint8_t tile[16 * 16];
    for (int r = 0; r < kRows; ++r) drow[r] = dst + (int64_t)(r0 + r) * dst_stride;
    const uint8_t* trow[kRows];
    int ox = 0;
    for (; ox + 16 <= out_bytes; ox += 16) {
      if (m == kRows) {
        for (int r = 0; r < kRows; ++r) trow[r] = tout.data() + (size_t)(ox + r) * kRows;
        // transpose16 reads rows of the source by pointer: here source row = output column ox + r
        uint8_t* d0 = drow[0] + ox;
        transpose16(trow, 0, d0, dst_stride);
      } else {
        for (int r = 0; r < kRows; ++r) trow[r] = tout.data() + (size_t)(ox + r) * kRows;
        transpose16(trow, 0, tile, 16);
        for (int r = 0; r < m; ++r) std::memcpy(drow[r] + ox, tile + r * 16, 16);
      }
    }
    for (; ox < out_bytes; ++ox)
      for (int r = 0; r < m; ++r) drow[r][ox] = tout[(size_t)ox * kRows + r];
  }
}

// Vertical: n rows starting at `rows` (row stride in bytes) -> one row of `width` bytes; contiguous over
// the row, so the compiler vectorises it.
VCF_CLONES static void vpass_row(const uint8_t* rows, int64_t stride, const int32_t* w, int n, int width,
                                 int precision, int32_t* acc, uint8_t* dst) {
  const int32_t half = fixed_half(precision);
  for (int i = 0; i < width; ++i) acc[i] = half;
  for (int j = 0; j < n; ++j) {
    const uint8_t* r = rows + j * stride;
    const int32_t wj = w[j];
    for (int i = 0; i < width; ++i) acc[i] += wj * r[i];
  }
  for (int i = 0; i < width; ++i) dst[i] = clip8(acc[i], precision);
}


#if defined(__GNUC__) && defined(__x86_64__)
// Same pass by hand, register-blocked: 64 output bytes stay in four int32 accumulators over all taps, and taps
// go in pairs through one 16-bit multiply-add (vpmaddwd: v_j * w_j + v_j+1 * w_j+1 per int32 lane), the
// arithmetic ATen's own uint8 kernel uses. Bytes of rows j, j+1 are interleaved then zero-extended to 16-bit
// pairs; the pack-back (packs_epi32, packus_epi16) undoes that lane order and clamps to 0..255 like clip8.
// Weights wider than 16 bits (PIL's 22-bit precision) are split w = hi * 2^11 + lo with 0 <= lo < 2^11, two
// multiply-adds, recombined exactly as (sum v * hi) * 2^11 + sum v * lo. Integer sums, same values: bit-identical.
template <bool kSplit>
__attribute__((target("avx512f,avx512bw"))) static void vpass_row_avx512(const uint8_t* rows, int64_t stride,
                                                                         const int32_t* w, int n, int width,
                                                                         int precision, uint8_t* dst) {
  int32_t lo_pair[kMaxPairs], hi_pair[kMaxPairs];
  const int pairs = weight_pairs<kSplit>(w, n, lo_pair, hi_pair);
  const __m512i half = _mm512_set1_epi32(fixed_half(precision)), zero = _mm512_setzero_si512();
  const __m128i shift = _mm_cvtsi32_si128(precision);
  for (int i = 0; i < width; i += 64) {
    const __mmask64 mask = width - i >= 64 ? ~0ULL : (1ULL << (width - i)) - 1;
    __m512i a0 = half, a1 = half, a2 = half, a3 = half, h0 = zero, h1 = zero, h2 = zero, h3 = zero;
    const uint8_t* r = rows + i;
    for (int q = 0; q < pairs; ++q, r += 2 * stride) {
      const __m512i x = _mm512_maskz_loadu_epi8(mask, r);
      const __m512i y = 2 * q + 1 < n ? _mm512_maskz_loadu_epi8(mask, r + stride) : zero;
      const __m512i xy_lo = _mm512_unpacklo_epi8(x, y), xy_hi = _mm512_unpackhi_epi8(x, y);
      const __m512i p0 = _mm512_unpacklo_epi8(xy_lo, zero), p1 = _mm512_unpackhi_epi8(xy_lo, zero);
      const __m512i p2 = _mm512_unpacklo_epi8(xy_hi, zero), p3 = _mm512_unpackhi_epi8(xy_hi, zero);
      const __m512i wl = _mm512_set1_epi32(lo_pair[q]);
      a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(p0, wl));
      a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(p1, wl));
      a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(p2, wl));
      a3 = _mm512_add_epi32(a3, _mm512_madd_epi16(p3, wl));
      if (kSplit) {
        const __m512i wh = _mm512_set1_epi32(hi_pair[q]);
        h0 = _mm512_add_epi32(h0, _mm512_madd_epi16(p0, wh));
        h1 = _mm512_add_epi32(h1, _mm512_madd_epi16(p1, wh));
        h2 = _mm512_add_epi32(h2, _mm512_madd_epi16(p2, wh));
        h3 = _mm512_add_epi32(h3, _mm512_madd_epi16(p3, wh));
      }
    }
    if (kSplit) {
      a0 = _mm512_add_epi32(a0, _mm512_slli_epi32(h0, 11));
      a1 = _mm512_add_epi32(a1, _mm512_slli_epi32(h1, 11));
      a2 = _mm512_add_epi32(a2, _mm512_slli_epi32(h2, 11));
      a3 = _mm512_add_epi32(a3, _mm512_slli_epi32(h3, 11));
    }
    a0 = _mm512_sra_epi32(a0, shift), a1 = _mm512_sra_epi32(a1, shift);
    a2 = _mm512_sra_epi32(a2, shift), a3 = _mm512_sra_epi32(a3, shift);
    const __m512i bytes = _mm512_packus_epi16(_mm512_packs_epi32(a0, a1), _mm512_packs_epi32(a2, a3));
    _mm512_mask_storeu_epi8(dst + i, mask, bytes);
  }
}
#endif


// One output row of the vertical pass: a hand loop when allowed (AVX-512BW, else AVX2; taps fit the pair
// table), else the portable one.
static void vpass(const uint8_t* rows, int64_t stride, const int32_t* w, int n, int width, int precision,
                  std::vector<int32_t>& acc, uint8_t* dst) {
#if defined(__GNUC__) && defined(__x86_64__)
  const bool avx512 = g_simd && have_avx512();
  if ((avx512 || (g_simd && have_avx2())) && n <= 256) {
    int32_t wmin = 0, wmax = 0;
    for (int j = 0; j < n; ++j) wmin = std::min(wmin, w[j]), wmax = std::max(wmax, w[j]);
    if (wmin >= -32768 && wmax < 32768) {  // ATen's int16 weights
      if (avx512) vpass_row_avx512<false>(rows, stride, w, n, width, precision, dst);
      else vpass_row_avx2(rows, stride, w, n, width, precision, dst, false);
      return;
    }
    if (wmin >= -(1 << 26) && wmax < (1 << 26)) {  // PIL's 22-bit weights: hi = w >> 11 fits int16
      if (avx512) vpass_row_avx512<true>(rows, stride, w, n, width, precision, dst);
      else vpass_row_avx2(rows, stride, w, n, width, precision, dst, true);
      return;
    }
  }
#endif
  acc.resize(width);
  vpass_row(rows, stride, w, n, width, precision, acc.data(), dst);
}

namespace {

// Horizontal-pass rows of one frame kept across the window rows of a task: each input row is filtered once
// (bands overlap by the vertical filter's reach), just before the vertical pass reads it (cache-warm).
struct HRows {
  const MediaItem* item = nullptr;
  int frame = -1, lo = 0, hi = 0;  // rows [lo, hi) are in `rows`, row r at (r - lo) * width
  std::vector<uint8_t> rows;
};

struct Scratch {
  uint64_t call = 0;  // the kernel call hcache belongs to
  std::vector<uint8_t> hrows, band[2], tin, tout;
  HRows hcache[2];  // one per temporal slot
  std::vector<int32_t> acc;
  std::vector<uint32_t> planes32;  // normalised window row, channel-planar (float32 bits)
  std::vector<uint16_t> planes16;  // same for bf16 / fp16
  template <typename T>
  std::vector<T>& planes() {
    if constexpr (sizeof(T) == 4) return planes32; else return planes16;
  }
};

// Resized rows [y0, y0 + n) of one frame into `band` (n x out_w x 3), passes in the library's order.
void resize_band(const MediaItem& it, const HPlan& ph, const AxisPlan& pv, int frame, int y0, int n,
                 Scratch& s, int slot, uint8_t* band) {
  const uint8_t* src = it.src + (int64_t)frame * it.frame_stride;
  const int width = it.out_w * 3;
  if (!pv.identity && !ph.identity && vertical_first(it.mode, it.in_h, it.in_w, it.out_h, it.out_w)) {
    // vertical pass over the full input width for the band's n rows, then each row horizontally
    const int in_width = it.in_w * 3;
    s.hrows.resize((size_t)n * in_width);
    for (int y = y0; y < y0 + n; ++y)
      vpass(src + (int64_t)pv.first[y] * it.row_stride, it.row_stride, &pv.w[(size_t)y * pv.taps], pv.size[y],
            in_width, pv.precision, s.acc, &s.hrows[(size_t)(y - y0) * in_width]);
    hpass_rows(s.hrows.data(), in_width, n, ph, band, width, s.tin, s.tout);
    return;
  }
  // horizontal first: the input rows the band's vertical taps need
  int lo = y0, hi = y0 + n;
  if (!pv.identity) {
    lo = pv.first[y0];
    hi = 0;
    for (int y = y0; y < y0 + n; ++y) hi = std::max(hi, pv.first[y] + pv.size[y]);
  }
  const uint8_t* hbase;  // row `lo` after the horizontal pass
  int64_t hstride;
  if (ph.identity) {
    hbase = src + (int64_t)lo * it.row_stride;
    hstride = it.row_stride;
  } else {
    HRows& h = s.hcache[slot];
    if (h.item != &it || h.frame != frame || lo < h.lo || lo > h.hi) {  // another frame, or not the next band
      h.item = &it, h.frame = frame, h.lo = h.hi = lo;
      if (h.rows.size() < (size_t)(it.in_h - lo) * width) h.rows.resize((size_t)(it.in_h - lo) * width);
    }
    if (hi > h.hi) {
      hpass_rows(src + (int64_t)h.hi * it.row_stride, it.row_stride, hi - h.hi, ph,
                 h.rows.data() + (size_t)(h.hi - h.lo) * width, width, s.tin, s.tout);
      h.hi = hi;
    }
    hbase = h.rows.data() + (size_t)(lo - h.lo) * width;
    hstride = width;
  }
  if (pv.identity) {
    for (int y = 0; y < n; ++y) std::memcpy(band + (size_t)y * width, hbase + (int64_t)y * hstride, width);
    return;
  }
  for (int y = y0; y < y0 + n; ++y)
    vpass(hbase + (int64_t)(pv.first[y] - lo) * hstride, hstride, &pv.w[(size_t)y * pv.taps], pv.size[y], width,
          pv.precision, s.acc, band + (size_t)(y - y0) * width);
}

// Normalise one window row (28 resized rows) of both temporal slots into channel-planar tables (one
// sequential pass, table lookups in L1), then copy 14-value runs into merge-window order: the scatter is
// contiguous copies instead of a stride-3 gather per value.
template <typename T>
void write_window_row(const uint8_t* band0, const uint8_t* band1, int out_w, int wy, const T* lut, T* out,
                      std::vector<T>& planes) {
  const int gw = out_w / kPatch;
  const size_t plane = (size_t)kWindow * out_w;
  const int slots = band1 == band0 ? 1 : kTemporal;  // an image's frame fills both slots from one table
  planes.resize(slots * 3 * plane);
  for (int t = 0; t < slots; ++t) {
    const uint8_t* b = t ? band1 : band0;
    T* p0 = planes.data() + (t * 3 + 0) * plane;
    T* p1 = p0 + plane;
    T* p2 = p1 + plane;
    for (size_t i = 0; i < plane; ++i) {
      p0[i] = lut[b[3 * i + 0]];
      p1[i] = lut[256 + b[3 * i + 1]];
      p2[i] = lut[512 + b[3 * i + 2]];
    }
  }
  for (int wx = 0; wx < gw / kMerge; ++wx)
    for (int my = 0; my < kMerge; ++my)
      for (int mx = 0; mx < kMerge; ++mx) {
        T* row = out + patch_row(wy, wx, my, mx, gw) * kPatchDim;
        const size_t x0 = (size_t)wx * kWindow + mx * kPatch;
        for (int c = 0; c < 3; ++c)
          for (int t = 0; t < kTemporal; ++t) {
            const T* src = planes.data() + ((t % slots) * 3 + c) * plane + (size_t)my * kPatch * out_w + x0;
            T* d = row + patch_col(c, t, 0, 0);
            for (int y = 0; y < kPatch; ++y) std::memcpy(d + y * kPatch, src + (size_t)y * out_w, kPatch * sizeof(T));
          }
      }
}

template <typename T>
void run(const std::vector<MediaItem>& items, const T* lut, T* out, int store, const NormFormula* formula) {
  std::vector<std::shared_ptr<const HPlan>> ph(items.size());
  std::vector<std::shared_ptr<const AxisPlan>> pv(items.size());
  int64_t num_slices = 0;  // (item, temporal patch) pairs
  bool all_videos = true;
  for (size_t i = 0; i < items.size(); ++i) {
    all_videos = all_videos && items[i].num_frames > 1;
    ph[i] = cached_plan(items[i].mode, items[i].in_w, items[i].out_w, make_hplan);
    pv[i] = cached_plan(items[i].mode, items[i].in_h, items[i].out_h, make_axis_plan);
    num_slices += (items[i].num_frames + kTemporal - 1) / kTemporal;
  }
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif
  // Task = window rows [wy0, wy1) of one temporal patch. Videos with enough slices to keep every thread busy
  // take a whole slice per task (equal sizes, no vertical-filter overlap recomputed between bands); images
  // (crops of very different sizes) take one window row per task, which balances the threads.
  const bool whole = all_videos && num_slices >= 4 * threads;
  struct Task { int item, p, wy0, wy1; };
  std::vector<Task> tasks;
  for (size_t i = 0; i < items.size(); ++i) {
    const int num_p = (items[i].num_frames + kTemporal - 1) / kTemporal, num_wy = items[i].out_h / kWindow;
    for (int p = 0; p < num_p; ++p) {
      if (whole) tasks.push_back({(int)i, p, 0, num_wy});
      else
        for (int wy = 0; wy < num_wy; ++wy) tasks.push_back({(int)i, p, wy, wy + 1});
    }
  }
  const int64_t num_tasks = (int64_t)tasks.size();
  // Scratch buffers live as long as their thread (no allocation per call); the horizontal-row caches are
  // only valid within one call (they hold item pointers).
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;
  run_tasks(num_tasks, threads, [&](int64_t k) {
    thread_local Scratch s;
    if (s.call != call) {
      s.call = call;
      for (HRows& h : s.hcache) h.item = nullptr;
    }
    const Task& task = tasks[k];
    const MediaItem& it = items[task.item];
    const int width = it.out_w * 3;
    const int gh = it.out_h / kPatch, gw = it.out_w / kPatch;
    s.band[0].resize((size_t)kWindow * width);
    s.band[1].resize((size_t)kWindow * width);
    const int f0 = source_frame(task.p, 0, it.num_frames), f1 = source_frame(task.p, 1, it.num_frames);
    T* slice = out + (it.row_offset + (int64_t)task.p * gh * gw) * kPatchDim;
    // window row by window row: resize both frames' 28 rows, then write them while they are in L1/L2
    for (int wy = task.wy0; wy < task.wy1; ++wy) {
      const uint8_t* w0 = s.band[0].data();
      const uint8_t* w1 = w0;
      resize_band(it, *ph[task.item], *pv[task.item], f0, wy * kWindow, kWindow, s, 0, s.band[0].data());
      if (f1 != f0) {
        resize_band(it, *ph[task.item], *pv[task.item], f1, wy * kWindow, kWindow, s, 1, s.band[1].data());
        w1 = s.band[1].data();
      }
      if (store != kStoreTable) write_window_row_simd(store, w0, w1, it.out_w, wy, *formula, slice);
      else write_window_row<T>(w0, w1, it.out_w, wy, lut, slice, s.planes<T>());
    }
  });
}

}  // namespace

// The output is usually a fresh allocation, so each first touch of a 4 KiB page is a page fault: about 2 us
// each on this machine, 25 ms of CPU for a 54 MB video output (more than its whole resize). Asking for
// transparent huge pages on the buffer's 2 MiB-aligned interior makes that 4 ms (512x fewer faults; the
// kernel still zeroes the pages). Harmless when the pages already exist; c10's THP_MEM_ALLOC_ENABLE does the
// same for its own allocations.
static void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = (uintptr_t)2 << 20;
  const uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
  if (hi > lo) madvise((void*)lo, hi - lo, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

void crop_resize_patchify_cpu(const std::vector<MediaItem>& items, const void* lut, void* out, int elem_size,
                              const NormFormula* formula) {
  resolve_isa();
  int64_t rows = 0;
  for (const MediaItem& it : items) rows += item_rows(it);
  advise_huge_pages(out, (size_t)rows * kPatchDim * elem_size);
  const int store = choose_store(lut, elem_size, formula, g_simd && have_avx512_vbmi());
  if (elem_size == 4)  // float32 bits
    run<uint32_t>(items, static_cast<const uint32_t*>(lut), static_cast<uint32_t*>(out), store, formula);
  else  // bf16 / fp16 bits
    run<uint16_t>(items, static_cast<const uint16_t*>(lut), static_cast<uint16_t*>(out), store, formula);
}

const char* cpu_store_kind(const void* lut, int elem_size, const NormFormula* formula) {
  static const char* const names[] = {"table", "f32", "bf16", "f16"};
  return names[choose_store(lut, elem_size, formula, g_simd && have_avx512_vbmi())];
}

void resize_uint8_cpu(const uint8_t* src, int64_t row_stride, int in_h, int in_w, int out_h, int out_w,
                      int mode, uint8_t* dst) {
  resolve_isa();
  MediaItem it;
  it.src = src;
  it.row_stride = row_stride;
  it.in_h = in_h;
  it.in_w = in_w;
  it.out_h = out_h;
  it.out_w = out_w;
  it.mode = mode;
  HPlan ph = make_hplan(mode, in_w, out_w);
  AxisPlan pv = make_axis_plan(mode, in_h, out_h);
  Scratch s;
  resize_band(it, ph, pv, 0, 0, out_h, s, 0, dst);
}

}  // namespace vcf
