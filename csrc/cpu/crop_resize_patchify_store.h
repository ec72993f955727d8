// The computed normalise + merge-window store of the CPU kernel (csrc/cpu/crop_resize_patchify_store.cpp).
#pragma once

#include <cstdint>

#include "crop_resize_patchify.h"

namespace vcf {

enum StoreKind : int { kStoreTable = 0, kStoreF32 = 1, kStoreBf16 = 2, kStoreF16 = 3 };

// Which store reproduces `lut` (3 x 256 values of elem_size bytes) from `formula` bit for bit: kStoreF32 / Bf16 /
// F16 (computed with AVX-512 VBMI), or kStoreTable (look values up: no formula, `vbmi` false, or a mismatch).
int choose_store(const void* lut, int elem_size, const NormFormula* formula, bool vbmi);

// One window row (28 resized rows of each temporal slot, RGB bytes; band1 == band0 for an image) normalised by
// `formula` and written into merge-window order at out (the temporal slice's first pixel_values row).
// store: what choose_store returned (not kStoreTable).
void write_window_row_simd(int store, const uint8_t* band0, const uint8_t* band1, int out_w, int wy,
                           const NormFormula& formula, void* out);

}  // namespace vcf
