// Python bindings of the CPU kernels (videocom_fast._C). Torch-free: buffers arrive as numpy arrays (zero-copy
// views of torch tensors); every check that protects the kernel from a bad buffer lives here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "crop_resize_patchify.h"

namespace py = pybind11;

namespace {

std::string at(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

void check_rgb_u8(const py::array& a, const std::string& name, int ndim) {
  VCF_CHECK(a.dtype().kind() == 'u' && a.itemsize() == 1, name + ": expected uint8");
  VCF_CHECK(a.ndim() == ndim, name + ": expected " + std::to_string(ndim) + " dims, got " + std::to_string(a.ndim()));
  VCF_CHECK(a.shape(ndim - 1) == 3, name + ": expected 3 channels in the last dim");
  VCF_CHECK(a.strides(ndim - 1) == 1 && a.strides(ndim - 2) == 3,
            name + ": pixels must be contiguous RGB (strides (..., 3, 1))");
  for (int d = 0; d < ndim; ++d) VCF_CHECK(a.strides(d) >= 0, name + ": negative strides are not supported");
}

// One media item of a launch, after the checks that name its index (shared by the CPU and CUDA bindings).
vcf::MediaItem checked_item(size_t i, const uint8_t* base, int t, int h, int w, int64_t frame_stride,
                            int64_t row_stride, const std::tuple<int, int, int, int>& box,
                            const std::tuple<int, int>& size, int mode, int64_t row_offset) {
  auto [x1, y1, x2, y2] = box;
  auto [oh, ow] = size;
  VCF_CHECK(t >= 1, at("frames", i) + ": no frames");
  VCF_CHECK(0 <= x1 && x1 < x2 && x2 <= w && 0 <= y1 && y1 < y2 && y2 <= h, at("boxes", i) + ": empty or outside the frame");
  VCF_CHECK(oh > 0 && ow > 0 && oh % vcf::kWindow == 0 && ow % vcf::kWindow == 0,
            at("sizes", i) + ": output sides must be positive multiples of 28");
  VCF_CHECK(mode == vcf::kPil || mode == vcf::kTorch, at("modes", i) + ": expected 0 (pil) or 1 (torch)");
  vcf::MediaItem it;
  it.src = base + y1 * row_stride + x1 * 3;
  it.frame_stride = frame_stride;
  it.row_stride = row_stride;
  it.num_frames = t;
  it.in_h = y2 - y1;
  it.in_w = x2 - x1;
  it.out_h = oh;
  it.out_w = ow;
  it.mode = mode;
  it.row_offset = row_offset;
  return it;
}

// Fused crop -> resize -> normalize -> patchify of many items into one pixel_values buffer (one launch).
// norm: optional closed form of `lut` (kind, scale, mean[3], std[3]); see vcf::NormFormula. The kernel uses it
// only where it reproduces the table bit for bit, so a wrong formula costs speed, never exactness.
using NormArg = std::optional<std::tuple<int, double, std::vector<double>, std::vector<double>>>;

vcf::NormFormula norm_formula(const NormArg& norm);

void crop_resize_patchify(const std::vector<py::array>& frames, const std::vector<std::tuple<int, int, int, int>>& boxes,
                          const std::vector<std::tuple<int, int>>& sizes, const std::vector<int>& modes,
                          const py::array& lut, py::array& out, const NormArg& norm) {
  const size_t n = frames.size();
  VCF_CHECK(boxes.size() == n && sizes.size() == n && modes.size() == n,
            "crop_resize_patchify: frames, boxes, sizes and modes must have the same length");
  const int elem = (int)out.itemsize();
  VCF_CHECK((elem == 4 && out.dtype().kind() == 'f') || (elem == 2 && (out.dtype().kind() == 'u' || out.dtype().kind() == 'i')),
            "out: expected float32 or 16-bit (bf16/fp16 bit patterns) elements");
  VCF_CHECK(lut.itemsize() == elem && lut.dtype().kind() == out.dtype().kind(), "lut: dtype must match out");
  VCF_CHECK(lut.ndim() == 2 && lut.shape(0) == 3 && lut.shape(1) == 256 && (lut.flags() & py::array::c_style),
            "lut: expected a contiguous (3, 256) array");
  VCF_CHECK(out.ndim() == 2 && out.shape(1) == vcf::kPatchDim && (out.flags() & py::array::c_style) && out.writeable(),
            "out: expected a writable contiguous (rows, 1176) array");
  std::vector<vcf::MediaItem> items(n);
  int64_t rows = 0;
  for (size_t i = 0; i < n; ++i) {
    const py::array& f = frames[i];
    check_rgb_u8(f, at("frames", i), 4);
    items[i] = checked_item(i, static_cast<const uint8_t*>(f.data()), (int)f.shape(0), (int)f.shape(1),
                            (int)f.shape(2), f.strides(0), f.strides(1), boxes[i], sizes[i], modes[i], rows);
    rows += vcf::item_rows(items[i]);
  }
  VCF_CHECK(out.shape(0) == rows, "out: expected " + std::to_string(rows) + " rows, got " + std::to_string(out.shape(0)));
  const vcf::NormFormula formula = norm_formula(norm);
  const void* lut_ptr = lut.data();
  void* out_ptr = out.mutable_data();
  py::gil_scoped_release release;
  vcf::crop_resize_patchify_cpu(items, lut_ptr, out_ptr, elem, norm ? &formula : nullptr);
}

vcf::NormFormula norm_formula(const NormArg& norm) {
  vcf::NormFormula formula;
  if (norm) {
    const auto& [kind, scale, mean, std] = *norm;
    VCF_CHECK(kind == 0 || kind == 1 || kind == 2, "norm: kind must be 0, 1 or 2");
    VCF_CHECK(mean.size() == 3 && std.size() == 3, "norm: expected (kind, scale, mean[3], std[3])");
    formula.kind = kind;
    formula.scale = scale;
    for (int c = 0; c < 3; ++c) formula.mean[c] = (float)mean[c], formula.std[c] = (float)std[c];
  }
  return formula;
}

std::string cpu_store_kind(const py::array& lut, const NormArg& norm) {
  VCF_CHECK((lut.itemsize() == 4 || lut.itemsize() == 2) && lut.ndim() == 2 && lut.shape(0) == 3 &&
                lut.shape(1) == 256 && (lut.flags() & py::array::c_style),
            "lut: expected a contiguous (3, 256) array of 4- or 2-byte elements");
  const vcf::NormFormula formula = norm_formula(norm);
  return vcf::cpu_store_kind(lut.data(), (int)lut.itemsize(), norm ? &formula : nullptr);
}

py::array_t<uint8_t> resize_uint8(const py::array& image, int out_h, int out_w, int mode) {
  check_rgb_u8(image, "image", 3);
  VCF_CHECK(out_h > 0 && out_w > 0, "out_h/out_w: must be positive");
  VCF_CHECK(image.shape(0) > 0 && image.shape(1) > 0, "image: empty");
  VCF_CHECK(mode == vcf::kPil || mode == vcf::kTorch, "mode: expected 0 (pil) or 1 (torch)");
  py::array_t<uint8_t> out({(py::ssize_t)out_h, (py::ssize_t)out_w, (py::ssize_t)3});
  const uint8_t* src = static_cast<const uint8_t*>(image.data());
  int64_t stride = image.strides(0);
  int in_h = (int)image.shape(0), in_w = (int)image.shape(1);
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    vcf::resize_uint8_cpu(src, stride, in_h, in_w, out_h, out_w, mode, dst);
  }
  return out;
}

py::tuple resample_axis(int mode, int in, int out) {
  VCF_CHECK(in > 0 && out > 0, "in/out: must be positive");
  VCF_CHECK(mode == vcf::kPil || mode == vcf::kTorch, "mode: expected 0 (pil) or 1 (torch)");
  vcf::AxisPlan p = vcf::make_axis_plan(mode, in, out);
  py::array_t<int32_t> first(p.out, p.first.data()), size(p.out, p.size.data());
  py::array_t<int32_t> w({(py::ssize_t)p.out, (py::ssize_t)p.taps}, p.w.data());
  return py::make_tuple(first, size, w, p.precision);
}

#ifdef VIDEOCOM_WITH_CUDA
// Device buffers arrive as raw pointers (the module is torch-free): frames[i] = (ptr, T, H, W, frame_stride,
// row_stride) with strides in bytes; the caller (videocom_fast.preprocess) owns the tensors and the stream.
void crop_resize_patchify_cuda(const std::vector<std::tuple<intptr_t, int, int, int, int64_t, int64_t>>& frames,
                               const std::vector<std::tuple<int, int, int, int>>& boxes,
                               const std::vector<std::tuple<int, int>>& sizes, const std::vector<int>& modes,
                               intptr_t lut, intptr_t out, int64_t rows, int elem_size, intptr_t stream) {
  const size_t n = frames.size();
  VCF_CHECK(boxes.size() == n && sizes.size() == n && modes.size() == n,
            "crop_resize_patchify_cuda: frames, boxes, sizes and modes must have the same length");
  VCF_CHECK(elem_size == 4 || elem_size == 2, "elem_size: expected 4 or 2");
  std::vector<vcf::MediaItem> items(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    auto [ptr, t, h, w, fs, rs] = frames[i];
    items[i] = checked_item(i, reinterpret_cast<const uint8_t*>(ptr), t, h, w, fs, rs, boxes[i], sizes[i], modes[i],
                            total);
    total += vcf::item_rows(items[i]);
  }
  VCF_CHECK(total == rows, "rows: expected " + std::to_string(total) + ", got " + std::to_string(rows));
  vcf::crop_resize_patchify_cuda(items, reinterpret_cast<const void*>(lut), reinterpret_cast<void*>(out), rows,
                                 elem_size, reinterpret_cast<void*>(stream));
}
#endif

}  // namespace

void register_fused_step(py::module_& m);   // csrc/cpu/fused_step.cpp (the engine step's fused ops)

void register_kernels(py::module_& m) {
  register_fused_step(m);
  m.def("crop_resize_patchify", &crop_resize_patchify, py::arg("frames"), py::arg("boxes"), py::arg("sizes"),
        py::arg("modes"), py::arg("lut"), py::arg("out"), py::arg("norm") = py::none(),
        "Fused crop -> resize -> normalize -> patchify of uint8 (T, H, W, 3) items into out (rows, 1176). norm: "
        "optional (kind, scale, mean[3], std[3]) closed form of lut (1: (v - mean) / std, 2: (float(v * scale) - "
        "mean) / std, float32), used by the SIMD store only where it equals lut bit for bit.");
  m.def("resize_uint8", &resize_uint8, py::arg("image"), py::arg("out_h"), py::arg("out_w"), py::arg("mode"),
        "Resize one uint8 (H, W, 3) image with PIL (mode 0) or ATen antialiased (mode 1) bicubic arithmetic.");
  m.def("set_cpu_simd", &vcf::set_cpu_simd, py::arg("enabled"),
        "Use the hand-written SIMD loops (AVX-512, else AVX2) when the CPU has them (True, default) or the portable "
        "ones; returns the previous setting.");
  m.def("cpu_simd_isa", []() { return std::string(vcf::cpu_simd_isa()); },
        "'avx512_vbmi', 'avx512', 'avx2' or 'portable': the CPU kernel's loops the next call runs.");
  m.def("cpu_store_kind", &cpu_store_kind, py::arg("lut"), py::arg("norm") = py::none(),
        "'f32' / 'bf16' / 'f16' when the CPU kernel computes values with the SIMD store for this table and formula, "
        "'table' when it looks them up.");
  m.def("resample_axis", &resample_axis, py::arg("mode"), py::arg("in_size"), py::arg("out_size"),
        "Fixed-point taps of one axis: (first, size, weights (out, taps) int32, precision).");
#ifdef VIDEOCOM_WITH_CUDA
  m.def("crop_resize_patchify_cuda", &crop_resize_patchify_cuda, py::arg("frames"), py::arg("boxes"),
        py::arg("sizes"), py::arg("modes"), py::arg("lut"), py::arg("out"), py::arg("rows"), py::arg("elem_size"),
        py::arg("stream"), "The fused kernel on CUDA device buffers (raw pointers; see preprocess.py).");
#endif
}
