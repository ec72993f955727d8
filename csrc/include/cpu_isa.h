// The instruction set of the CPU kernels that carry per-ISA copies (fused_step.cpp's SiLU*mul rows,
// paged_attention.cpp's tiles): the best this CPU has, or the cap VIDEOCOM_CPU_ISA names ("avx512", "avx2",
// "baseline"; read once per process). The cap exists for tests: a CI machine with AVX-512 runs the AVX2 and
// baseline copies too (tests/test_fused_step.py, one process per path). A bad or unsupported cap is a
// ValueError naming it, at every call, never a silent fallback.
#pragma once
#include <cstdlib>
#include <string>

#include "check.h"

namespace vcf {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };
inline constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};

inline Isa best_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

inline Isa pick_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("VIDEOCOM_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return best;
  for (int i = 0; i < 3; ++i) {
    if (want != kIsaNames[i]) continue;
    VCF_CHECK(i <= static_cast<int>(best), "VIDEOCOM_CPU_ISA=" + want + ": this CPU's best is " +
                                               kIsaNames[static_cast<int>(best)]);
    return static_cast<Isa>(i);
  }
  throw pybind11::value_error("VIDEOCOM_CPU_ISA=" + want + ": expected auto, avx512, avx2 or baseline");
}

inline Isa cpu_isa() {
  static const Isa isa = pick_isa();   // one choice per process (an inline function's static: one for all files)
  return isa;
}

}  // namespace vcf
