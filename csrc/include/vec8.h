// 8-lane float32 / int32 GCC vectors, their loads and stores, and the clone attribute of the row kernels that use
// them (an AVX2 copy in ymm registers beside the baseline one): causal_softmax.cpp and sampling.cpp.
#pragma once
#pragma GCC diagnostic ignored "-Wpsabi"   // 8-float vectors through inlined helpers in the baseline clone: no ABI use

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define VCF_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define VCF_CLONES_AVX2
#endif

typedef float V8f __attribute__((vector_size(32)));
typedef int32_t V8i __attribute__((vector_size(32)));

__attribute__((always_inline)) inline V8f load8(const float* p) {
  V8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store8(float* p, V8f v) { std::memcpy(p, &v, sizeof v); }
