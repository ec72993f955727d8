// The Video-CoM protocol core, torch-free: the manipulation grammar and the reference's frame/resize
// arithmetic. The Python twin is videocom_fast/protocol/reference.py; its module docstring states the
// grammar and this file implements the same steps on UTF-8 bytes (every token of the grammar is ASCII, so
// a non-ASCII byte never matches anything and byte scanning is exact). Offsets here are byte offsets; the
// binding (bind_protocol.cpp) converts them to Python character offsets.
//
// Inputs are assumed checked (the binding checks ranges and says which argument is bad); nothing here
// allocates per character or backtracks: every scan is linear in the text.
#pragma once
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

namespace vcf::protocol {

enum class Kind : uint8_t { Segment = 0, Frame = 1, Zoom = 2, Answer = 3 };

struct ParsedAction {
  Kind kind;
  int64_t start;       // byte offset of the head
  int64_t end;         // byte offset just past the value (answers: past "X.")
  int64_t desc_begin;  // description bytes [desc_begin, desc_end) (answers: the stripped option text)
  int64_t desc_end;
  int64_t first_value;  // values[first_value, first_value + num_values) (zoom: 4 per box)
  int64_t num_values;
  char letter;  // answers only
};

struct ParseResult {
  std::vector<ParsedAction> actions;
  std::vector<int32_t> values;
  void clear() {
    actions.clear();
    values.clear();
  }
};

// All valid actions in text order (the grammar of reference.py).
void parse_actions(std::string_view text, ParseResult& out);

// Kind of the first tool head (valid or not) as int(Kind), or -1 when the text names no tool.
int mentioned_tool(std::string_view text);

// --- segments, resize, sampling (spec sections 1 and 4) ---
int64_t num_segments(int64_t total_frames, double fps, double min_seconds, double max_seconds);
std::vector<std::pair<int64_t, int64_t>> segment_ranges(int64_t total_frames, double fps);
std::pair<int64_t, int64_t> smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels,
                                         int64_t max_pixels);
int64_t smart_nframes(int64_t nframes, int64_t total, double fps, int64_t min_frames, int64_t max_frames);

// torch.linspace(0, end, steps) in float32 exactly as aten's CPU kernel computes it, rounded half to even.
void linspace_round(int64_t end, int64_t steps, std::vector<int64_t>& out);

struct TimeRange {
  double start, end;
};
// Sorted disjoint inclusive candidate intervals (whole video when the union has < 2 frames).
std::vector<std::pair<int64_t, int64_t>> candidate_intervals(int64_t total_frames, double fps,
                                                             const std::vector<TimeRange>& ranges);
std::vector<int64_t> sample_frame_indices(int64_t total_frames, double fps, int64_t nframes,
                                          const std::vector<TimeRange>& ranges,
                                          const std::vector<int64_t>& frame_list);

}  // namespace vcf::protocol
