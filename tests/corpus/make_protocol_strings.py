"""Writes protocol_strings.jsonl next to this file: `python tests/corpus/make_protocol_strings.py`.

Every expectation below was written by hand from the grammar in videocom_fast/protocol/reference.py's
docstring, never produced by running the parser: [kind, values, description, text[start:end]]. Huge inputs
are stored as parts ([piece, times], concatenated) with a summary per action
[kind, len(values), values[0], description (None: not checked)(, times)]; tests/test_protocol.py reads both.
"""
import json
from pathlib import Path
S, F, Z, A = "segment", "frame", "zoom", "answer"
rows = []
def add(name, text, expected):
    rows.append({"name": name, "text": text, "expected": expected})
def big(name, parts, summary):
    # parts: [[piece, times], ...] concatenated; summary: [[kind, num_values, first_value, description(, times)]]
    rows.append({"name": name, "parts": parts, "summary": summary})

# spec section 2 examples
add("spec_segment_list", "FIND_SEGMENT(the man opens the door) = [2, 5]",
    [[S, [2, 5], "the man opens the door", "FIND_SEGMENT(the man opens the door) = [2, 5]"]])
add("spec_segment_int_defect2", "FIND_SEGMENT(the man opens the door) = 3",
    [[S, [3], "the man opens the door", "FIND_SEGMENT(the man opens the door) = 3"]])
add("spec_frame_list", "FIND_FRAME(the moment the cup falls) = [123]",
    [[F, [123], "the moment the cup falls", "FIND_FRAME(the moment the cup falls) = [123]"]])
add("spec_frame_int", "FIND_FRAME(cup falls) = 123", [[F, [123], "cup falls", "FIND_FRAME(cup falls) = 123"]])
add("spec_zoom", "SPATIAL_ZOOM(the license plate) = [10, 20, 110, 80]",
    [[Z, [[10, 20, 110, 80]], "the license plate", "SPATIAL_ZOOM(the license plate) = [10, 20, 110, 80]"]])
add("spec_zoom_two_boxes", "SPATIAL_ZOOM(two signs) = [0, 0, 50, 50], [60, 60, 120, 100]",
    [[Z, [[0, 0, 50, 50], [60, 60, 120, 100]], "two signs", "SPATIAL_ZOOM(two signs) = [0, 0, 50, 50], [60, 60, 120, 100]"]])
add("spec_answer", "FINAL_ANSWER: B. a red car", [[A, "B", "a red car", "FINAL_ANSWER: B."]])
add("realistic_round", "The cup is on the table in segment 3.\nI need a closer look.\nFIND_FRAME(cup on the table) = [245]",
    [[F, [245], "cup on the table", "FIND_FRAME(cup on the table) = [245]"]])
# case-insensitive tool names
add("case_lower_segment", "find_segment(x) = [1]", [[S, [1], "x", "find_segment(x) = [1]"]])
add("case_mixed_frame", "Find_Frame(x) = 4", [[F, [4], "x", "Find_Frame(x) = 4"]])
add("case_mixed_zoom", "spatial_ZOOM(x) = [1,2,3,4]", [[Z, [[1, 2, 3, 4]], "x", "spatial_ZOOM(x) = [1,2,3,4]"]])
add("case_lower_answer", "final_answer: C. foo", [[A, "C", "foo", "final_answer: C."]])
add("answer_letter_lowercase_invalid", "FINAL_ANSWER: b. lower", [])
# parentheses inside descriptions
add("paren_in_description", "FIND_FRAME(the man (left) picks up a cup (blue)) = 12",
    [[F, [12], "the man (left) picks up a cup (blue)", "FIND_FRAME(the man (left) picks up a cup (blue)) = 12"]])
add("nested_parens", "FIND_SEGMENT(((a))) = [1]", [[S, [1], "((a))", "FIND_SEGMENT(((a))) = [1]"]])
add("empty_description", "FIND_FRAME() = 8", [[F, [8], "", "FIND_FRAME() = 8"]])
add("paren_then_bad_value_then_good", "FIND_FRAME(a) = x FIND_SEGMENT(b) = [2]",
    [[F, [2], "a) = x FIND_SEGMENT(b", "FIND_FRAME(a) = x FIND_SEGMENT(b) = [2]"]])
add("tool_inside_description", "FIND_SEGMENT(FIND_FRAME(x) = 4",
    [[S, [4], "FIND_FRAME(x", "FIND_SEGMENT(FIND_FRAME(x) = 4"]])
# several actions per line, tools inside other text, rounds joined without separators (defect 4)
add("two_per_line", "FIND_FRAME(a) = 3 then FIND_FRAME(b) = 4",
    [[F, [3], "a", "FIND_FRAME(a) = 3"], [F, [4], "b", "FIND_FRAME(b) = 4"]])
add("embedded_in_prose", "Next I call FIND_SEGMENT(dog runs) = [4] to check.",
    [[S, [4], "dog runs", "FIND_SEGMENT(dog runs) = [4]"]])
add("embedded_in_word", "theFIND_FRAME(x) = 2", [[F, [2], "x", "FIND_FRAME(x) = 2"]])
add("markdown_wrapped", "**FIND_FRAME(x) = 6**", [[F, [6], "x", "FIND_FRAME(x) = 6"]])
add("rounds_joined_no_separator", "look.FIND_SEGMENT(a) = [1]FIND_FRAME(b) = 7FINAL_ANSWER: A. yes",
    [[S, [1], "a", "FIND_SEGMENT(a) = [1]"], [F, [7], "b", "FIND_FRAME(b) = 7"], [A, "A", "yes", "FINAL_ANSWER: A."]])
add("answer_text_stops_at_next_head", "FINAL_ANSWER: A. foo FIND_FRAME(x) = 3",
    [[A, "A", "foo", "FINAL_ANSWER: A."], [F, [3], "x", "FIND_FRAME(x) = 3"]])
add("invalid_frame_then_valid", "FIND_FRAME(a) = [1, 2] FIND_FRAME(b) = 5", [[F, [5], "b", "FIND_FRAME(b) = 5"]])
add("invalid_does_not_wipe_valid_defect2", "FIND_SEGMENT(a) = [1]\nFIND_SEGMENT(b) = [x]\nFIND_SEGMENT(c) = 4",
    [[S, [1], "a", "FIND_SEGMENT(a) = [1]"], [S, [4], "c", "FIND_SEGMENT(c) = 4"]])
# negative and overflowing numbers
add("negative_int", "FIND_FRAME(x) = -3", [])
add("negative_first_in_list", "FIND_SEGMENT(x) = [-1, 2]", [])
add("negative_later_in_list", "FIND_SEGMENT(x) = [1, -2]", [])
add("negative_zoom", "SPATIAL_ZOOM(x) = [1, -2, 3, 4]", [])
add("int32_max_ok", "FIND_FRAME(x) = 2147483647", [[F, [2147483647], "x", "FIND_FRAME(x) = 2147483647"]])
add("int32_overflow", "FIND_FRAME(x) = 2147483648", [])
add("overflow_in_list", "FIND_SEGMENT(x) = [1, 99999999999]", [])
add("overflow_in_zoom", "SPATIAL_ZOOM(x) = [1, 2, 3, 4294967296]", [])
add("overflow_second_box", "SPATIAL_ZOOM(x) = [1, 2, 3, 4], [5, 6, 7, 99999999999]", [])
add("leading_zeros_ok", "FIND_FRAME(x) = 00000000000000000007", [[F, [7], "x", "FIND_FRAME(x) = 00000000000000000007"]])
add("zero_value_parses", "FIND_FRAME(x) = 0", [[F, [0], "x", "FIND_FRAME(x) = 0"]])
add("decimal_stops_at_dot", "FIND_FRAME(x) = 3.5", [[F, [3], "x", "FIND_FRAME(x) = 3"]])
add("digits_then_letters", "FIND_FRAME(x) = 12abc", [[F, [12], "x", "FIND_FRAME(x) = 12"]])
# missing / odd brackets
add("list_missing_close", "FIND_SEGMENT(x) = [1, 2", [])
add("list_missing_open", "FIND_SEGMENT(x) = 1, 2]", [[S, [1], "x", "FIND_SEGMENT(x) = 1"]])
add("desc_missing_close", "FIND_SEGMENT(x = [1]", [])
add("head_missing_open", "FIND_SEGMENT x) = [1]", [])
add("missing_equals", "FIND_SEGMENT(x) [1]", [])
add("empty_list", "FIND_SEGMENT(x) = []", [])
add("commas_only", "FIND_SEGMENT(x) = [,]", [])
add("double_commas", "FIND_SEGMENT(x) = [1,,2,]", [[S, [1, 2], "x", "FIND_SEGMENT(x) = [1,,2,]"]])
add("blank_separated_list", "FIND_SEGMENT(x) = [1 2 3]", [[S, [1, 2, 3], "x", "FIND_SEGMENT(x) = [1 2 3]"]])
add("frame_two_numbers_invalid", "FIND_FRAME(x) = [3, 4]", [])
add("zoom_three_numbers", "SPATIAL_ZOOM(x) = [1, 2, 3]", [])
add("zoom_nested_brackets", "SPATIAL_ZOOM(x) = [[1, 2, 3, 4]]", [])
add("zoom_bare_numbers", "SPATIAL_ZOOM(x) = 1, 2, 3, 4", [])
add("zoom_no_comma_between_boxes", "SPATIAL_ZOOM(x) = [1,2,3,4] [5,6,7,8]",
    [[Z, [[1, 2, 3, 4], [5, 6, 7, 8]], "x", "SPATIAL_ZOOM(x) = [1,2,3,4] [5,6,7,8]"]])
add("zoom_double_comma_stops", "SPATIAL_ZOOM(x) = [1,2,3,4],, [5,6,7,8]",
    [[Z, [[1, 2, 3, 4]], "x", "SPATIAL_ZOOM(x) = [1,2,3,4]"]])
add("zoom_short_second_box", "SPATIAL_ZOOM(x) = [1,2,3,4], [5,6,7]", [[Z, [[1, 2, 3, 4]], "x", "SPATIAL_ZOOM(x) = [1,2,3,4]"]])
add("zoom_eight_numbers_one_list", "SPATIAL_ZOOM(x) = [1,2,3,4,5,6,7,8]", [])
add("nested_brackets_segment", "FIND_SEGMENT(x) = [[1, 2]]", [])
# line ends and whitespace
add("newline_in_description", "FIND_FRAME(x\n) = 3", [])
add("cr_in_description", "FIND_FRAME(x\r) = 3", [])
add("newline_after_equals", "FIND_FRAME(x) =\n3", [])
add("newline_before_equals", "FIND_FRAME(x)\n= 3", [])
add("tabs", "FIND_SEGMENT(x)\t=\t[1,\t2]", [[S, [1, 2], "x", "FIND_SEGMENT(x)\t=\t[1,\t2]"]])
add("vt_ff_are_blanks", "FIND_FRAME(x)\x0b=\x0c3", [[F, [3], "x", "FIND_FRAME(x)\x0b=\x0c3"]])
add("answer_no_space", "FINAL_ANSWER:B.x", [[A, "B", "x", "FINAL_ANSWER:B."]])
add("answer_space_before_colon", "FINAL_ANSWER : D. spaced colon", [[A, "D", "spaced colon", "FINAL_ANSWER : D."]])
add("answer_letter_on_next_line", "FINAL_ANSWER:\nE. next line", [[A, "E", "next line", "FINAL_ANSWER:\nE."]])
add("answer_parenthesized_invalid", "FINAL_ANSWER: (C) foo", [])
add("answer_no_dot_invalid", "FINAL_ANSWER: C", [])
add("two_answers", "FINAL_ANSWER: A. first\nFINAL_ANSWER: B. second",
    [[A, "A", "first", "FINAL_ANSWER: A."], [A, "B", "second", "FINAL_ANSWER: B."]])
add("answer_text_crlf_stripped", "FINAL_ANSWER: A.   text  \r\nmore", [[A, "A", "text", "FINAL_ANSWER: A."]])
# unicode (offsets are Python characters)
add("unicode_description", "Ünïcödé 🎬 FIND_FRAME(日本語 (テスト)) = 42 ✓",
    [[F, [42], "日本語 (テスト)", "FIND_FRAME(日本語 (テスト)) = 42"]])
add("unicode_answer_text", "😀 FINAL_ANSWER: A. café ☕", [[A, "A", "café ☕", "FINAL_ANSWER: A."]])
add("fullwidth_brackets", "FIND_SEGMENT(x) = ［1］", [])
add("fullwidth_digit", "FIND_FRAME(x) = ３", [])
add("arabic_indic_digit", "FIND_FRAME(x) = ٣", [])
add("fullwidth_tool_name", "ＦＩＮＤ_FRAME(x) = 3", [])
add("long_s_not_s", "FIND_ſEGMENT(x) = [1]", [])
add("dotless_i_not_i", "FıND_FRAME(x) = 1", [])
add("nbsp_is_not_blank", "FIND_FRAME(x)\u00a0=\u00a03", [])
add("line_separator_is_not_line_end", "FIND_FRAME(a\u2028b) = 3", [[F, [3], "a\u2028b", "FIND_FRAME(a\u2028b) = 3"]])
add("lone_surrogate", "FIND_FRAME(\ud800) = 3 FINAL_ANSWER: A. \udfff", [[F, [3], "\ud800", "FIND_FRAME(\ud800) = 3"], [A, "A", "\udfff", "FINAL_ANSWER: A."]])
add("nul_byte", "FIND_FRAME(a\x00b) = 3", [[F, [3], "a\x00b", "FIND_FRAME(a\x00b) = 3"]])
# degenerate
add("empty", "", [])
add("blanks_only", " \t\n\r\x0b\x0c", [])
add("truncated_head", "FIND_", [])
add("answer_head_only", "FINAL_ANSWER", [])
add("answer_colon_only", "FINAL_ANSWER:", [])
add("tool_head_only", "SPATIAL_ZOOM(", [])
# huge inputs (built from parts so the file stays small); summary = [kind, len(values), values[0], description]
big("prose_1mb_then_action", [["lorem ipsum dolor ", 60000], ["FIND_FRAME(end) = 9", 1]], [[F, 1, 9, "end"]])
big("many_failing_heads_one_line", [["FIND_FRAME(", 100000], [") = [", 1], ["1,", 500000], ["1]", 1]], [])
big("million_numbers", [["FIND_SEGMENT(x) = [", 1], ["7, ", 1000000], ["8]", 1]], [[S, 1000001, 7, "x"]])
big("million_digit_number", [["FIND_FRAME(x) = ", 1], ["9", 1000000]], [])
big("million_zeros_then_one", [["FIND_FRAME(x) = ", 1], ["0", 1000000], ["1", 1]], [[F, 1, 1, "x"]])
big("many_answers_one_line", [["FINAL_ANSWER: A. ", 60000]], [[A, 1, "A", "", 60000]])
big("many_close_parens", [["FIND_FRAME(", 1], [") = x ", 200000], [") = 5", 1]], [[F, 1, 5, None]])
big("many_heads_no_close", [["FIND_SEGMENT(a ", 80000]], [])
big("answer_colon_far", [["FINAL_ANSWER", 1], [" ", 1000000], [": C. far", 1]], [[A, 1, "C", "far"]])
big("nested_open_brackets", [["FIND_SEGMENT(x) = ", 1], ["[", 500000], ["1]", 1]], [])
with open(Path(__file__).with_name("protocol_strings.jsonl"), "w") as f:
    for r in rows:
        f.write(json.dumps(r, ensure_ascii=True) + "\n")
print(len(rows))
