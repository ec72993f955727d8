// The Video-CoM protocol core (see protocol.h and the grammar in videocom_fast/protocol/reference.py).
//
// The scanner is the Python twin's algorithm step for step, so the two agree on every input:
//   head    leftmost FIND_SEGMENT( | FIND_FRAME( | SPATIAL_ZOOM( | FINAL_ANSWER<ws>*:   (ASCII, any case)
//   tool    description to the first ')' on the line followed by <ws>*=<ws>* and '[' or a digit; then
//           `[n, ...]` or `n` (segment, frame; frame wants exactly one) or boxes `[a,b,c,d] , [..]` (zoom)
//   answer  <ws>*[A-Z]. then the option text up to the line end or the next head, ASCII-blank-stripped
// Linear time: the line end, the description end and the last parsed value are cached, and queries come at
// non-decreasing positions, so failing heads that share a long line never rescan it.
//
// Float arithmetic mirrors CPython and aten operation by operation (no a*b+c pattern is left for the
// compiler to contract except where aten itself uses an FMA, written here as an explicit fmaf).
#include "protocol/protocol.h"

#include <algorithm>
#include <cmath>

namespace vcf::protocol {
namespace {

constexpr int64_t kInt32Max = 2147483647;

inline bool is_ws(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }  // Python re.A \s
inline bool is_digit(unsigned char c) { return c >= '0' && c <= '9'; }
inline bool is_eol(unsigned char c) { return c == '\n' || c == '\r'; }
inline unsigned char lower(unsigned char c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// text[i, i+len) equals `lit` (lowercase ASCII) ignoring ASCII case.
inline bool match_ci(std::string_view t, int64_t i, const char* lit, int64_t len) {
  if (i + len > static_cast<int64_t>(t.size())) return false;
  for (int64_t k = 0; k < len; ++k)
    if (lower(static_cast<unsigned char>(t[i + k])) != static_cast<unsigned char>(lit[k])) return false;
  return true;
}

struct Head {
  int64_t start, end;
  int kind;  // int(Kind)
};

// Leftmost head at or after pos; Python's `_HEAD.search`.
bool find_head(std::string_view t, int64_t pos, Head& h) {
  const int64_t n = static_cast<int64_t>(t.size());
  const unsigned char* p = reinterpret_cast<const unsigned char*>(t.data());
  for (int64_t i = pos; i < n; ++i) {
    const unsigned char c = p[i] | 0x20;  // 'F'/'f' -> 'f', 'S'/'s' -> 's' (other bytes do not matter here)
    if (c == 'f') {
      if (i + 1 < n && lower(p[i + 1]) != 'i') continue;
      if (match_ci(t, i, "find_segment(", 13)) { h = {i, i + 13, int(Kind::Segment)}; return true; }
      if (match_ci(t, i, "find_frame(", 11)) { h = {i, i + 11, int(Kind::Frame)}; return true; }
      if (match_ci(t, i, "final_answer", 12)) {
        int64_t j = i + 12;
        while (j < n && is_ws(p[j])) ++j;
        if (j < n && p[j] == ':') { h = {i, j + 1, int(Kind::Answer)}; return true; }
      }
    } else if (c == 's') {
      if (match_ci(t, i, "spatial_zoom(", 13)) { h = {i, i + 13, int(Kind::Zoom)}; return true; }
    }
  }
  return false;
}

// Python's _to_int: digits -> value, or -1 when it does not fit a signed 32-bit int.
int64_t to_int(const unsigned char* p, int64_t b, int64_t e) {
  while (b < e - 1 && p[b] == '0') ++b;  // leading zeros never overflow
  if (e - b > 10) return -1;
  int64_t v = 0;
  for (int64_t k = b; k < e; ++k) v = v * 10 + (p[k] - '0');
  return v <= kInt32Max ? v : -1;
}

struct Value {
  bool ok = false;
  int64_t end = 0;
  std::vector<int32_t> nums;  // zoom: 4 per box
};

class Scanner {
 public:
  explicit Scanner(std::string_view t)
      : t_(t), p_(reinterpret_cast<const unsigned char*>(t.data())), n_(static_cast<int64_t>(t.size())) {}

  int64_t line_end(int64_t pos) {
    if (pos > eol_) {  // NOTE: pos <= eol_ means no line break in [pos, eol_) since pos never decreases
      int64_t i = pos;
      while (i < n_ && !is_eol(p_[i])) ++i;
      eol_ = i;
    }
    return eol_;
  }

  // First ')' in [pos, eol) followed by <ws>*=<ws>* and '[' or a digit: (paren position, value position).
  bool desc_end(int64_t pos, int64_t eol, int64_t& paren, int64_t& vpos) {
    const bool cached = eol == desc_eol_ && pos >= desc_from_ && (!desc_found_ || pos <= desc_paren_);
    if (!cached) {
      desc_from_ = pos;
      desc_eol_ = eol;
      desc_found_ = false;
      for (int64_t i = pos; i < eol; ++i) {
        if (p_[i] != ')') continue;
        int64_t j = i + 1;
        while (j < eol && is_ws(p_[j])) ++j;
        if (j >= eol || p_[j] != '=') continue;
        ++j;
        while (j < eol && is_ws(p_[j])) ++j;
        if (j < eol && (p_[j] == '[' || is_digit(p_[j]))) {
          desc_found_ = true;
          desc_paren_ = i;
          desc_vpos_ = j;
          break;
        }
      }
    }
    paren = desc_paren_;
    vpos = desc_vpos_;
    return desc_found_;
  }

  const Value& value(int64_t vpos, int64_t eol, bool zoom) {
    Value& v = cache_[zoom];
    if (cache_pos_[zoom] != vpos) {  // value positions never repeat once the description end moves on
      cache_pos_[zoom] = vpos;
      if (zoom)
        parse_boxes(vpos, eol, v);
      else
        parse_numbers(vpos, eol, v);
    }
    return v;
  }

 private:
  void parse_numbers(int64_t vpos, int64_t eol, Value& v) {
    v.ok = false;
    v.nums.clear();
    if (p_[vpos] == '[') {
      int64_t j = vpos + 1;
      while (j < eol && (is_digit(p_[j]) || p_[j] == ',' || is_ws(p_[j]))) ++j;
      if (j == vpos + 1 || j >= eol || p_[j] != ']') return;
      for (int64_t k = vpos + 1; k < j;) {
        if (!is_digit(p_[k])) {
          ++k;
          continue;
        }
        int64_t e = k;
        while (e < j && is_digit(p_[e])) ++e;
        const int64_t x = to_int(p_, k, e);
        if (x < 0) return;
        v.nums.push_back(static_cast<int32_t>(x));
        k = e;
      }
      if (v.nums.empty()) return;
      v.end = j + 1;
    } else {  // a digit (the description end guarantees '[' or a digit)
      int64_t e = vpos;
      while (e < eol && is_digit(p_[e])) ++e;
      const int64_t x = to_int(p_, vpos, e);
      if (x < 0) return;
      v.nums.push_back(static_cast<int32_t>(x));
      v.end = e;
    }
    v.ok = true;
  }

  // `\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]` at pos; fills b[4] (-1 on overflow) and the end.
  bool match_box(int64_t pos, int64_t eol, int64_t b[4], int64_t& end) const {
    if (pos >= eol || p_[pos] != '[') return false;
    int64_t j = pos + 1;
    for (int k = 0; k < 4; ++k) {
      while (j < eol && is_ws(p_[j])) ++j;
      const int64_t d = j;
      while (j < eol && is_digit(p_[j])) ++j;
      if (j == d) return false;
      b[k] = to_int(p_, d, j);
      while (j < eol && is_ws(p_[j])) ++j;
      if (j >= eol || p_[j] != (k < 3 ? ',' : ']')) return false;
      ++j;
    }
    end = j;
    return true;
  }

  void parse_boxes(int64_t vpos, int64_t eol, Value& v) {
    v.ok = false;
    v.nums.clear();
    int64_t pos = vpos, b[4], end = 0;
    while (match_box(pos, eol, b, end)) {
      for (int k = 0; k < 4; ++k) {
        if (b[k] < 0) {
          v.nums.clear();
          return;
        }
        v.nums.push_back(static_cast<int32_t>(b[k]));
      }
      v.end = end;
      pos = end;  // separator: <ws>* ','? <ws>*
      while (pos < eol && is_ws(p_[pos])) ++pos;
      if (pos < eol && p_[pos] == ',') ++pos;
      while (pos < eol && is_ws(p_[pos])) ++pos;
    }
    v.ok = !v.nums.empty();
  }

  std::string_view t_;
  const unsigned char* p_;
  int64_t n_;
  int64_t eol_ = -1;
  int64_t desc_from_ = -1, desc_eol_ = -1, desc_paren_ = -1, desc_vpos_ = -1;
  bool desc_found_ = false;
  Value cache_[2];
  int64_t cache_pos_[2] = {-1, -1};
};

}  // namespace

void parse_actions(std::string_view text, ParseResult& out) {
  out.clear();
  const unsigned char* p = reinterpret_cast<const unsigned char*>(text.data());
  const int64_t n = static_cast<int64_t>(text.size());
  Scanner sc(text);
  Head h, next;
  bool have_next = false;  // `next` is the head search from pos, when an answer already did it
  int64_t pos = 0;
  while (have_next || find_head(text, pos, h)) {
    if (have_next) h = next;
    have_next = false;
    if (h.kind == int(Kind::Answer)) {
      int64_t j = h.end;
      while (j < n && is_ws(p[j])) ++j;
      if (!(j + 1 < n && p[j] >= 'A' && p[j] <= 'Z' && p[j + 1] == '.')) {
        pos = h.end;
        continue;
      }
      const int64_t a_end = j + 2;
      // The option text stops at the line end or the next head (output stays linear in the text).
      int64_t db = a_end, de = sc.line_end(a_end);
      have_next = find_head(text, a_end, next);
      if (have_next) de = std::min(de, next.start);
      while (db < de && is_ws(p[db])) ++db;
      while (de > db && is_ws(p[de - 1])) --de;
      out.actions.push_back({Kind::Answer, h.start, a_end, db, de, 0, 0, static_cast<char>(p[j])});
      pos = a_end;
      continue;
    }
    const int64_t eol = sc.line_end(h.end);
    int64_t paren = 0, vpos = 0;
    if (!sc.desc_end(h.end, eol, paren, vpos)) {
      pos = h.end;
      continue;
    }
    const Value& v = sc.value(vpos, eol, h.kind == int(Kind::Zoom));
    if (!v.ok || (h.kind == int(Kind::Frame) && v.nums.size() != 1)) {
      pos = h.end;
      continue;
    }
    const int64_t first = static_cast<int64_t>(out.values.size());
    out.values.insert(out.values.end(), v.nums.begin(), v.nums.end());
    out.actions.push_back({static_cast<Kind>(h.kind), h.start, v.end, h.end, paren, first,
                           static_cast<int64_t>(v.nums.size()), 0});
    pos = v.end;
  }
}

int mentioned_tool(std::string_view text) {
  Head h;
  int64_t pos = 0;
  while (find_head(text, pos, h)) {
    if (h.kind != int(Kind::Answer)) return h.kind;
    pos = h.end;
  }
  return -1;
}

// --- segments, resize, sampling -----------------------------------------------------------------------

int64_t num_segments(int64_t total_frames, double fps, double min_seconds, double max_seconds) {
  const double duration = static_cast<double>(total_frames) / fps;
  int64_t count = 10;
  while (duration / static_cast<double>(count) < min_seconds && count > 1) --count;
  if (duration / static_cast<double>(count) > max_seconds) {
    // Same jump as the Python twin: duration / c never rises with c.
    int64_t c = std::max(count, static_cast<int64_t>(duration / max_seconds));
    while (c > count && duration / static_cast<double>(c - 1) <= max_seconds) --c;
    while (duration / static_cast<double>(c) > max_seconds) ++c;
    count = c;
  }
  return count;
}

std::vector<std::pair<int64_t, int64_t>> segment_ranges(int64_t total_frames, double fps) {
  const int64_t count = num_segments(total_frames, fps, 10.0, 30.0);
  const int64_t per = total_frames / count;
  std::vector<std::pair<int64_t, int64_t>> out;
  out.reserve(count);
  for (int64_t s = 1; s <= count; ++s) out.emplace_back((s - 1) * per, s == count ? total_frames : s * per);
  return out;
}

std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                         int64_t max_pixels) {
  // NOTE: sides <= 2^24 and pixel counts <= 2^48 (checked by the binding) make every int -> double
  // conversion below exact, so each division rounds once, as CPython's int / int does.
  const double h = static_cast<double>(height), w = static_cast<double>(width), f = static_cast<double>(factor);
  int64_t h_bar = std::max(factor, static_cast<int64_t>(std::nearbyint(h / f)) * factor);  // round half even
  int64_t w_bar = std::max(factor, static_cast<int64_t>(std::nearbyint(w / f)) * factor);
  if (h_bar * w_bar > max_pixels) {
    const double beta = std::sqrt(static_cast<double>(height * width) / static_cast<double>(max_pixels));
    h_bar = std::max(factor, static_cast<int64_t>(std::floor(h / beta / f)) * factor);
    w_bar = std::max(factor, static_cast<int64_t>(std::floor(w / beta / f)) * factor);
  } else if (h_bar * w_bar < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / static_cast<double>(height * width));
    h_bar = static_cast<int64_t>(std::ceil(h * beta / f)) * factor;
    w_bar = static_cast<int64_t>(std::ceil(w * beta / f)) * factor;
  }
  return {h_bar, w_bar};
}

int64_t smart_nframes(int64_t nframes, int64_t total, double fps, int64_t min_frames, int64_t max_frames) {
  constexpr int64_t kF = 2;  // FRAME_FACTOR
  if (nframes < total)
    return std::max(kF, static_cast<int64_t>(std::nearbyint(static_cast<double>(nframes) / kF)) * kF);
  const double lo = std::ceil(static_cast<double>(min_frames) / kF) * kF;
  const double hi = std::floor(static_cast<double>(std::min(max_frames, total)) / kF) * kF;
  const double x = static_cast<double>(total) / fps * 2.0;
  const double n = std::min(std::min(std::max(x, lo), hi), static_cast<double>(total));
  return std::max(kF, static_cast<int64_t>(std::floor(n / kF)) * kF);
}

void linspace_round(int64_t end, int64_t steps, std::vector<int64_t>& out) {
  // aten's linspace_kernel for float: step in float32; the first half is start + step*i and the second
  // end - step*(steps-1-i), each compiled to one fused multiply-add (verified bit-exact against
  // torch.linspace on 187k (end, steps) pairs, 1 and 2 threads). steps == 1 yields [start].
  out.resize(static_cast<size_t>(steps));
  if (steps <= 0) return;
  if (steps == 1) {
    out[0] = 0;
    return;
  }
  const float start = 0.0f, fend = static_cast<float>(end);
  const float step = (fend - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t i = 0; i < steps; ++i) {
    const float v = i < halfway ? std::fmaf(step, static_cast<float>(i), start)
                                : std::fmaf(-step, static_cast<float>(steps - 1 - i), fend);
    out[static_cast<size_t>(i)] = static_cast<int64_t>(std::nearbyintf(v));  // Tensor.round: half to even
  }
}

std::vector<std::pair<int64_t, int64_t>> candidate_intervals(int64_t total_frames, double fps,
                                                             const std::vector<TimeRange>& ranges) {
  std::vector<std::pair<int64_t, int64_t>> iv;
  const double last = static_cast<double>(total_frames - 1);
  for (const TimeRange& r : ranges) {
    // floor(start*fps) .. ceil(end*fps)-1 clamped to the video; clamp in double before converting so any
    // finite time is safe (beyond 2^53 the clamp decides the result alike in Python's exact ints).
    const double lo_d = std::max(0.0, std::floor(r.start * fps));
    const double hi_d = std::min(last, std::ceil(r.end * fps) - 1.0);
    if (!(lo_d <= hi_d)) continue;
    iv.emplace_back(static_cast<int64_t>(lo_d), static_cast<int64_t>(hi_d));
  }
  std::sort(iv.begin(), iv.end());
  std::vector<std::pair<int64_t, int64_t>> merged;
  int64_t count = 0;
  for (const auto& [lo, hi] : iv) {
    if (!merged.empty() && lo <= merged.back().second + 1) {
      count += std::max<int64_t>(0, hi - merged.back().second);
      merged.back().second = std::max(merged.back().second, hi);
    } else {
      merged.emplace_back(lo, hi);
      count += hi - lo + 1;
    }
  }
  if (count < 2) return {{0, total_frames - 1}};
  return merged;
}

std::vector<int64_t> sample_frame_indices(int64_t total_frames, double fps, int64_t nframes,
                                          const std::vector<TimeRange>& ranges,
                                          const std::vector<int64_t>& frame_list) {
  const auto iv = candidate_intervals(total_frames, fps, ranges);
  std::vector<int64_t> offsets;  // candidates before each interval
  int64_t count = 0;
  for (const auto& [lo, hi] : iv) {
    offsets.push_back(count);
    count += hi - lo + 1;
  }
  const int64_t n = std::min(smart_nframes(nframes, count, fps, 4, 32), count);
  std::vector<int64_t> idx;
  linspace_round(count - 1, n, idx);
  std::vector<int64_t> out;
  out.reserve(idx.size() + frame_list.size());
  for (int64_t k : idx) {
    const size_t j = static_cast<size_t>(std::upper_bound(offsets.begin(), offsets.end(), k) - offsets.begin() - 1);
    out.push_back(iv[j].first + k - offsets[j]);
  }
  for (int64_t f : frame_list) {
    if (f == INT64_MIN) continue;
    const int64_t z = f - 1;
    auto it = std::upper_bound(iv.begin(), iv.end(), std::make_pair(z, INT64_MAX));
    if (it != iv.begin() && z <= std::prev(it)->second) out.push_back(z);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace vcf::protocol
