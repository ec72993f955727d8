// Python bindings of the protocol core: videocom_fast._C.protocol_* (wrapped by videocom_fast/protocol/cpp.py,
// which returns the same Python types as reference.py). This file owns the boundary: argument checks with
// the same bounds and the same ValueError (naming the argument and index) as the Python twin, str -> UTF-8
// bytes, and byte offsets -> Python character offsets. The scan itself runs without the GIL.
#include <Python.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "check.h"
#include "protocol/protocol.h"

namespace py = pybind11;
using namespace vcf::protocol;

namespace {

constexpr int64_t kInt32Max = 2147483647;
constexpr int64_t kMaxSide = int64_t(1) << 24;         // reference.MAX_SIDE
constexpr int64_t kMaxPixels = int64_t(1) << 48;       // reference.MAX_PIXELS_LIMIT
constexpr int64_t kMaxFrames = int64_t(1) << 24;       // reference.MAX_FRAMES_LIMIT

std::string show(py::handle v) { return py::repr(v).cast<std::string>(); }

int64_t int_arg(const std::string& fn, const std::string& name, py::handle v, int64_t lo, int64_t hi) {
  VCF_CHECK(!PyBool_Check(v.ptr()) && PyIndex_Check(v.ptr()),
            fn + ": " + name + " must be an int, got " + std::string(Py_TYPE(v.ptr())->tp_name) + " " + show(v));
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
  if (!idx) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  VCF_CHECK(overflow == 0 && x >= lo && x <= hi, fn + ": " + name + " must be in [" + std::to_string(lo) + ", " +
                                                     std::to_string(hi) + "], got " + show(idx));
  return x;
}

double float_arg(const std::string& fn, const std::string& name, py::handle v, bool positive = true) {
  double x = NAN;
  if (!PyUnicode_Check(v.ptr()) && !PyBytes_Check(v.ptr())) {
    x = PyFloat_AsDouble(v.ptr());
    if (x == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      x = NAN;
    }
  }
  VCF_CHECK(std::isfinite(x) && (!positive || x > 0),
            fn + ": " + name + " must be " + (positive ? "a finite number > 0" : "a finite number") + ", got " +
                show(v));
  return x;
}

// Python truthiness (`x or ()`); an object whose truth value raises (a numpy array) raises the same here.
bool truthy(py::handle v) {
  const int t = PyObject_IsTrue(v.ptr());
  if (t < 0) throw py::error_already_set();
  return t == 1;
}

py::list items(const std::string& fn, const std::string& name, py::handle v) {
  PyObject* l = PySequence_List(v.ptr());
  if (!l) {
    PyErr_Clear();
    throw py::value_error(fn + ": " + name + " must be a list, got " + show(v));
  }
  return py::reinterpret_steal<py::list>(l);
}

// --- text --------------------------------------------------------------------------------------------

PyObject* kind_name(Kind k) {
  // Interned once and kept for the life of the process (never freed: no teardown-order hazards).
  static PyObject* names[4] = {PyUnicode_InternFromString("segment"), PyUnicode_InternFromString("frame"),
                               PyUnicode_InternFromString("zoom"), PyUnicode_InternFromString("answer")};
  return names[static_cast<int>(k)];
}

// UTF-8 view of a str. A lone surrogate (legal in a Python str, not in UTF-8) is kept as its 3-byte
// "surrogatepass" form, so counting non-continuation bytes still counts Python characters.
std::string_view utf8(py::handle s, py::object& holder) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(s.ptr(), &size);
  if (data) return {data, static_cast<size_t>(size)};
  PyErr_Clear();
  holder = py::reinterpret_steal<py::object>(PyUnicode_AsEncodedString(s.ptr(), "utf-8", "surrogatepass"));
  if (!holder) throw py::error_already_set();
  return {PyBytes_AS_STRING(holder.ptr()), static_cast<size_t>(PyBytes_GET_SIZE(holder.ptr()))};
}

// Byte offsets -> character offsets, in one sweep over the bytes up to the largest offset.
struct CharOffsets {
  std::vector<int64_t> bytes, chars;
  void build(std::string_view t) {
    std::sort(bytes.begin(), bytes.end());
    bytes.erase(std::unique(bytes.begin(), bytes.end()), bytes.end());
    chars.resize(bytes.size());
    int64_t b = 0, c = 0;
    for (size_t k = 0; k < bytes.size(); ++k) {
      for (; b < bytes[k]; ++b) c += (static_cast<unsigned char>(t[b]) & 0xC0) != 0x80;
      chars[k] = c;
    }
  }
  int64_t operator()(int64_t byte) const {
    return chars[std::lower_bound(bytes.begin(), bytes.end(), byte) - bytes.begin()];
  }
};

py::list parse_actions_py(py::handle text) {
  py::list out;
  if (!PyUnicode_Check(text.ptr())) return out;  // the reference returns [] for anything but a str
  py::object holder;
  const std::string_view t = utf8(text, holder);
  ParseResult res;
  parse_actions(t, res);   // microseconds: keeps the GIL (a release costs a re-acquire wait when other threads
                           // run Python, ~70 us per call measured in the engine, whose env worker does)
  const bool ascii = PyUnicode_IS_ASCII(text.ptr());
  CharOffsets off;
  if (!ascii) {
    for (const ParsedAction& a : res.actions)
      off.bytes.insert(off.bytes.end(), {a.start, a.end, a.desc_begin, a.desc_end});
    off.build(t);
  }
  auto ch = [&](int64_t b) { return ascii ? b : off(b); };
  for (const ParsedAction& a : res.actions) {
    py::object values;
    if (a.kind == Kind::Answer) {
      values = py::str(std::string(1, a.letter));
    } else if (a.kind == Kind::Zoom) {
      py::list boxes(a.num_values / 4);
      for (int64_t b = 0; b < a.num_values / 4; ++b) {
        const int32_t* v = &res.values[a.first_value + 4 * b];
        boxes[b] = py::make_tuple(v[0], v[1], v[2], v[3]);
      }
      values = std::move(boxes);
    } else {
      py::list nums(a.num_values);
      for (int64_t k = 0; k < a.num_values; ++k) nums[k] = py::int_(res.values[a.first_value + k]);
      values = std::move(nums);
    }
    py::object desc = py::reinterpret_steal<py::object>(PyUnicode_Substring(text.ptr(), ch(a.desc_begin), ch(a.desc_end)));
    if (!desc) throw py::error_already_set();
    out.append(py::make_tuple(py::reinterpret_borrow<py::object>(kind_name(a.kind)), values, desc, ch(a.start),
                              ch(a.end)));
  }
  return out;
}

py::object mentioned_tool_py(py::handle text) {
  if (!PyUnicode_Check(text.ptr())) return py::none();
  py::object holder;
  const int k = mentioned_tool(utf8(text, holder));
  if (k < 0) return py::none();
  return py::reinterpret_borrow<py::object>(kind_name(static_cast<Kind>(k)));
}

// --- numbers -----------------------------------------------------------------------------------------

int64_t num_segments_py(py::handle total_frames, py::handle fps, py::handle min_seconds, py::handle max_seconds) {
  const std::string fn = "num_segments";
  const int64_t n = int_arg(fn, "total_frames", total_frames, 1, kInt32Max);
  const double f = float_arg(fn, "fps", fps);
  const double lo = float_arg(fn, "min_seconds", min_seconds), hi = float_arg(fn, "max_seconds", max_seconds);
  VCF_CHECK(static_cast<double>(n) / f / hi < static_cast<double>(kInt32Max),
            fn + ": " + std::to_string(n) + " frames at fps " + show(fps) + " need too many segments");
  return num_segments(n, f, lo, hi);
}

py::list segment_ranges_py(py::handle total_frames, py::handle fps) {
  const int64_t n = int_arg("num_segments", "total_frames", total_frames, 1, kInt32Max);
  const double f = float_arg("num_segments", "fps", fps);
  VCF_CHECK(static_cast<double>(n) / f / 30.0 < static_cast<double>(kInt32Max),
            "num_segments: " + std::to_string(n) + " frames at fps " + show(fps) + " need too many segments");
  py::list out;
  for (const auto& [a, b] : segment_ranges(n, f)) out.append(py::make_tuple(a, b));
  return out;
}

py::tuple smart_resize_py(py::handle height, py::handle width, py::handle factor, py::handle min_pixels,
                          py::handle max_pixels) {
  const std::string fn = "smart_resize";
  const int64_t h = int_arg(fn, "height", height, 1, kMaxSide), w = int_arg(fn, "width", width, 1, kMaxSide);
  const int64_t f = int_arg(fn, "factor", factor, 1, int64_t(1) << 16);
  const int64_t hi = int_arg(fn, "max_pixels", max_pixels, 1, kMaxPixels);
  const int64_t lo = int_arg(fn, "min_pixels", min_pixels, 0, hi);
  VCF_CHECK(static_cast<double>(std::max(h, w)) / static_cast<double>(std::min(h, w)) <= 200.0,
            fn + ": aspect ratio must be at most 200, got " + std::to_string(h) + "x" + std::to_string(w));
  const auto [rh, rw] = smart_resize(h, w, f, lo, hi);
  return py::make_tuple(rh, rw);
}

int64_t smart_nframes_py(py::handle nframes, py::handle total, py::handle fps, py::handle min_frames,
                         py::handle max_frames) {
  const std::string fn = "smart_nframes";
  const int64_t n = int_arg(fn, "nframes", nframes, 1, kInt32Max), t = int_arg(fn, "total", total, 1, kInt32Max);
  const double f = float_arg(fn, "fps", fps);
  const int64_t lo = int_arg(fn, "min_frames", min_frames, 0, kInt32Max);
  const int64_t hi = int_arg(fn, "max_frames", max_frames, 0, kInt32Max);
  return smart_nframes(n, t, f, lo, hi);
}

std::vector<TimeRange> time_ranges_arg(py::handle ranges, double fps) {
  const std::string fn = "sample_frame_indices";
  std::vector<TimeRange> out;
  if (!truthy(ranges)) return out;  // `time_ranges or ()`
  const py::list rs = items(fn, "time_ranges", ranges);
  for (size_t i = 0; i < rs.size(); ++i) {
    const py::handle r = rs[i];
    const std::string name = "time_ranges[" + std::to_string(i) + "]";
    py::object s, e;
    if (PyDict_Check(r.ptr())) {
      PyObject* ps = PyDict_GetItemString(r.ptr(), "start");
      PyObject* pe = PyDict_GetItemString(r.ptr(), "end");
      VCF_CHECK(ps && pe, fn + ": " + name + " must be {'start', 'end'} or (start, end), got " + show(r));
      s = py::reinterpret_borrow<py::object>(ps);
      e = py::reinterpret_borrow<py::object>(pe);
    } else {
      PyObject* l = PySequence_List(r.ptr());
      if (!l) PyErr_Clear();
      const py::object pair = py::reinterpret_steal<py::object>(l);
      VCF_CHECK(l && PyList_GET_SIZE(l) == 2,
                fn + ": " + name + " must be {'start', 'end'} or (start, end), got " + show(r));
      s = py::reinterpret_borrow<py::object>(PyList_GET_ITEM(l, 0));
      e = py::reinterpret_borrow<py::object>(PyList_GET_ITEM(l, 1));
    }
    TimeRange tr{float_arg(fn, name + ".start", s, false), float_arg(fn, name + ".end", e, false)};
    VCF_CHECK(std::isfinite(tr.start * fps) && std::isfinite(tr.end * fps),
              fn + ": " + name + " times fps overflows: " + show(r));
    out.push_back(tr);
  }
  return out;
}

py::list sample_frame_indices_py(py::handle total_frames, py::handle fps, py::handle nframes,
                                 py::handle time_ranges, py::handle frame_list) {
  const std::string fn = "sample_frame_indices";
  const int64_t n = int_arg(fn, "total_frames", total_frames, 1, kMaxFrames);
  const double f = float_arg(fn, "fps", fps);
  const int64_t k = int_arg(fn, "nframes", nframes, 1, kInt32Max);
  const std::vector<TimeRange> ranges = time_ranges_arg(time_ranges, f);
  std::vector<int64_t> frames;
  if (truthy(frame_list)) {
    const py::list fl = items(fn, "frame_list", frame_list);
    for (size_t i = 0; i < fl.size(); ++i)
      frames.push_back(int_arg(fn, "frame_list[" + std::to_string(i) + "]", fl[i], INT64_MIN, INT64_MAX));
  }
  const std::vector<int64_t> idx = sample_frame_indices(n, f, k, ranges, frames);   // microseconds: keeps the GIL
  py::list out(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) out[i] = py::int_(idx[i]);
  return out;
}

py::list linspace_round_py(py::handle end, py::handle steps) {
  const int64_t e = int_arg("linspace_round", "end", end, 0, kMaxFrames);
  const int64_t s = int_arg("linspace_round", "steps", steps, 1, kInt32Max);
  std::vector<int64_t> idx;
  linspace_round(e, s, idx);
  py::list out(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) out[i] = py::int_(idx[i]);
  return out;
}

}  // namespace

void register_protocol(py::module_& m) {
  m.def("protocol_parse_actions", &parse_actions_py, py::arg("text"),
        "[(kind, values, description, start, end)] of every valid action (character offsets); [] for a non-str");
  m.def("protocol_mentioned_tool", &mentioned_tool_py, py::arg("text"),
        "Kind of the first tool head, valid or not, else None");
  m.def("protocol_num_segments", &num_segments_py, py::arg("total_frames"), py::arg("fps"),
        py::arg("min_seconds") = 10.0, py::arg("max_seconds") = 30.0);
  m.def("protocol_segment_ranges", &segment_ranges_py, py::arg("total_frames"), py::arg("fps"));
  m.def("protocol_smart_resize", &smart_resize_py, py::arg("height"), py::arg("width"), py::arg("factor") = 28,
        py::arg("min_pixels") = 4 * 28 * 28, py::arg("max_pixels") = 128 * 28 * 28);
  m.def("protocol_smart_nframes", &smart_nframes_py, py::arg("nframes"), py::arg("total"), py::arg("fps"),
        py::arg("min_frames") = 4, py::arg("max_frames") = 32);
  m.def("protocol_sample_frame_indices", &sample_frame_indices_py, py::arg("total_frames"), py::arg("fps"),
        py::arg("nframes"), py::arg("time_ranges") = py::none(), py::arg("frame_list") = py::none());
  m.def("protocol_linspace_round", &linspace_round_py, py::arg("end"), py::arg("steps"),
        "torch.linspace(0, end, steps).round().long() (float32, half to even), torch-free");
}
