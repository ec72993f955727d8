"""Rewards: hand-made cases for each rule and each reference defect, and agreement of the two modes on
well-formed episodes (where the reference has no defect to trip over)."""
import random

import pytest

from videocom_fast import rewards
from videocom_fast.data import load_samples
from videocom_fast.protocol import smart_resize
from videocom_fast.rewards import (accuracy_reward, combined_reward, format_reward, reasoning_reward,
                                   resized_gold_boxes)

H, W = 192, 320  # original frame size used by the samples below


def sample(answer="B. red", segs=(3,), frames=((40, 44),), boxes=((42, (100, 50, 140, 90)),)):
    return {"conversations": [{"from": "human", "value": "<video>\nWhich colour? Options: A. blue, B. red"},
                              {"from": "gpt", "value": answer}],
            "valid_segments": list(segs), "valid_frames": [list(r) for r in frames],
            "valid_bounding_box": [[f, list(b)] for f, b in boxes], "frame_hw": (H, W)}


def scaled(box, hw=(H, W)):
    h, w = hw
    rh, rw = smart_resize(h, w, min_pixels=4 * 28 * 28, max_pixels=128 * 28 * 28)
    return [int(round(v * (rw / w if k % 2 == 0 else rh / h))) for k, v in enumerate(box)]


GOLD_BOX = (100, 50, 140, 90)


def zoom_line(box):
    return f"SPATIAL_ZOOM(the object) = [{', '.join(map(str, box))}]"


def good_episode(letter="B"):
    return ["Let me rewatch. FIND_SEGMENT(the object appears) = [3]",
            "Now the frame. FIND_FRAME(object visible) = [42]",
            "Zoom in. " + zoom_line(scaled(GOLD_BOX)),
            f"It is red. FINAL_ANSWER: {letter}. red"]


# --- accuracy --------------------------------------------------------------------------------------

def test_accuracy_basic_both_modes():
    s = [sample()] * 3
    comps = ["FINAL_ANSWER: B. red", "FINAL_ANSWER: A. blue", "FINAL_ANSWER: C. green"]
    for mode in ("fixed", "reference"):
        assert accuracy_reward(comps, s, reward_compat=mode) == [1.0, 0.0, 0.0]


def test_accuracy_defect3_letter_fallback():
    # No FINAL_ANSWER: the reference takes the first A-E letter of the text ("B" of "Because").
    comps = ["Because I think so", "Blue things appear"]
    assert accuracy_reward(comps, [sample()] * 2, reward_compat="reference") == [1.0, 1.0]
    assert accuracy_reward(comps, [sample()] * 2, reward_compat="fixed") == [0.0, 0.0]


def test_accuracy_last_answer_counts_and_case():
    s = [sample()]
    assert accuracy_reward(["FINAL_ANSWER: A. x\nFINAL_ANSWER: B. red"], s) == [1.0]
    assert accuracy_reward(["final_answer: B. red"], s) == [1.0]          # the protocol is case-insensitive
    assert accuracy_reward(["final_answer: B. red"], s, reward_compat="reference") == [0.0]


def test_gold_letter_from_final_answer_turn():
    s = sample(answer="FINAL_ANSWER: A. blue")
    assert accuracy_reward(["FINAL_ANSWER: A. blue"], [s]) == [1.0]
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        accuracy_reward(["FINAL_ANSWER: A. blue"], [sample(answer="?? none")])


# --- format ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,fixed,ref", [
    ("reasoning\nFINAL_ANSWER: B. red", 1.0, 1.0),
    ("FINAL_ANSWER: B.", 0.0, 0.0),                                   # no option text
    ("FINAL_ANSWER: b. red", 0.0, 0.0),                                # lower-case letter
    ("nothing at all", 0.0, 0.0),
    ("FINAL_ANSWER: B. red\nFIND_FRAME(x) = [3]", 0.0, 1.0),          # tool call after the answer
    ("FINAL_ANSWER: A. x\nFINAL_ANSWER: B. red", 0.0, 1.0),           # two contradicting answers
    ("FINAL_ANSWER: B. FINAL_ANSWER: B. red", 1.0, 1.0),                # an echo of the same letter
    ("FINAL_ANSWER: B. red\nFINAL_ANSWER: B.", 0.0, 1.0),              # the last answer has no option text
    ("FINAL_ANSWER: B. red FINAL_ANSWER: C. red", 0.0, 1.0),           # contradicting letters
    ("final_answer: B. red", 1.0, 0.0),                                # case-insensitive tool names
])
def test_format(text, fixed, ref):
    assert format_reward([text]) == [fixed]
    assert format_reward([text], reward_compat="reference") == [ref]


# --- reasoning -------------------------------------------------------------------------------------

def test_reasoning_full_marks_and_partial():
    s = [sample()]
    assert reasoning_reward([good_episode()], s) == [1.0]
    assert reasoning_reward([good_episode()], s, reward_compat="reference") == [1.0]
    wrong = ["FIND_SEGMENT(x) = [3, 5]", "FIND_FRAME(x) = [10]", zoom_line((0, 0, 10, 10)), "FINAL_ANSWER: B. red"]
    # 2 segments (1 right) + 1 frame (wrong) ; the box is on frame 10 which has no gold box
    assert reasoning_reward([wrong], s, reward_compat="reference") == [pytest.approx(1 / 3)]
    assert reasoning_reward([wrong], s) == [pytest.approx(1 / 4)]  # fixed: that box counts, and is wrong


def test_reasoning_zero_when_nothing_predicted_or_annotated():
    assert reasoning_reward(["FINAL_ANSWER: B. red"], [sample()]) == [0.0]
    bare = sample(segs=(), frames=(), boxes=())
    assert reasoning_reward([good_episode()], [bare]) == [0.0]
    assert reasoning_reward([good_episode()], [bare], reward_compat="reference") == [0.0]


def test_reasoning_defect2_single_int_segment():
    comp = "FIND_SEGMENT(the red object) = 3\nFIND_SEGMENT(again) = [3]\nFINAL_ANSWER: B. red"
    s = [sample(frames=(), boxes=())]
    assert reasoning_reward([comp], s) == [1.0]
    # the reference int()s the description, raises, and loses every segment -> nothing predicted
    assert reasoning_reward([comp], s, reward_compat="reference") == [0.0]


def test_reasoning_defect4_rounds_joined_without_separator():
    # the frame line runs into the next round's text; with "" joining, the next round's FIND_FRAME sits
    # on the same line as the segment call and the reference's line-based search misses it.
    rounds = ["FIND_SEGMENT(x) = [3]", "FIND_FRAME(y) = [42]", "FINAL_ANSWER: B. red"]
    s = [sample(boxes=())]
    assert reasoning_reward([rounds], s) == [1.0]
    assert reasoning_reward(["\n".join(rounds)], s, reward_compat="reference") == [1.0]
    # joined with "" the second line holds both tools: the reference still finds each on that line,
    # but a box whose FIND_FRAME line merged with the zoom line is scored against the old frame:
    rounds2 = ["FIND_FRAME(y) = [42]", zoom_line(scaled(GOLD_BOX)), "FINAL_ANSWER: B. red"]
    s2 = [sample(segs=(), frames=((40, 44),))]
    assert reasoning_reward([rounds2], s2) == [1.0]
    assert reasoning_reward([rounds2], s2, reward_compat="reference") == [1.0]
    rounds3 = ["FIND_FRAME(y) = [42]", "FIND_FRAME(z) = [7]" + zoom_line(scaled(GOLD_BOX)), "FINAL_ANSWER: B. red"]
    # fixed: frames {42 ok, 7 wrong}, box on frame 7 (no gold) wrong -> 1/3
    assert reasoning_reward([rounds3], s2) == [pytest.approx(1 / 3)]
    # reference ("" join): frame 42's line ends in "FIND_FRAME(z) = [7]SPATIAL_ZOOM..." -> the first match
    # on that line is frame 42 -> frames {42}; the zoom line belongs to frame 42 -> counted and right
    assert reasoning_reward([rounds3], s2, reward_compat="reference") == [1.0]


def test_reasoning_defect5_frame_list_last_number():
    # the reference's box extractor takes the LAST number of a frame list; the protocol rejects a list
    comp = "FIND_FRAME(x) = [7, 42]\n" + zoom_line(scaled(GOLD_BOX)) + "\nFINAL_ANSWER: B. red"
    s = [sample(segs=(), frames=((40, 44),))]
    # reference: frames {7, 42} -> 1 of 2 right; box on frame 42 -> right -> 2/3
    assert reasoning_reward([comp], s, reward_compat="reference") == [pytest.approx(2 / 3)]
    # fixed: no valid frame action; the box has no frame -> counted wrong
    assert reasoning_reward([comp], s) == [0.0]


def test_reasoning_boxes_are_rescaled_and_iou_threshold():
    s = dict(sample(segs=(), frames=((42, 42),), boxes=((42, (400, 200, 560, 360)),)), frame_hw=(720, 1280))
    g = resized_gold_boxes(s)[42]
    assert g == scaled((400, 200, 560, 360), (720, 1280)) and g != [400, 200, 560, 360]
    x1, y1, x2, y2 = g
    w = x2 - x1
    shifted = lambda d: (x1 + d, y1, x2 + d, y2)  # IoU = (w-d)/(w+d)
    d_ok = next(d for d in range(w, 0, -1) if (w - d) / (w + d) >= 0.35)
    for d, want in ((d_ok, 1.0), (d_ok + 1, 0.0)):
        comp = f"FIND_FRAME(x) = [42]\n{zoom_line(shifted(d))}\nFINAL_ANSWER: B. red"
        # frame right (1) + box (want) over 2
        for mode in ("fixed", "reference"):
            assert reasoning_reward([comp], [s], reward_compat=mode) == [pytest.approx((1 + want) / 2)]
    # the unscaled original box is far off in the resized frame
    comp = f"FIND_FRAME(x) = [42]\n{zoom_line((400, 200, 560, 360))}\nFINAL_ANSWER: B. red"
    assert reasoning_reward([comp], [s]) == [pytest.approx(0.5)]


def test_duplicate_boxes_counted_once_in_fixed_mode():
    s = [sample(segs=(), frames=((42, 42),))]
    comp = f"FIND_FRAME(x) = [42]\n{zoom_line((0, 0, 5, 5))}\n{zoom_line((0, 0, 5, 5))}\n" \
           f"{zoom_line(scaled(GOLD_BOX))}\nFINAL_ANSWER: B. red"
    assert reasoning_reward([comp], s) == [pytest.approx(2 / 3)]                       # frame, bad, good
    assert reasoning_reward([comp], s, reward_compat="reference") == [pytest.approx(2 / 4)]


# --- combined and agreement ------------------------------------------------------------------------

def test_combined_default_is_accuracy_plus_reasoning():
    s = [sample()] * 2
    comps = [good_episode("B"), good_episode("A")]
    total, parts = combined_reward(comps, s)
    assert parts["accuracy"] == [1.0, 0.0] and parts["reasoning"] == [1.0, 1.0] and parts["format"] == [1.0, 1.0]
    assert total == [2.0, 1.0]
    total, _ = combined_reward(comps, s, weights={"format": 0.5, "accuracy": 2.0})
    assert total == [2.5, 0.5]


def _ref_reasoning_reward_oracle(content, sol, gt):
    """The reference's reasoning_reward as one formula: its accuracy + its reasoning score."""
    return rewards._ref_accuracy(content, sol) + rewards._ref_reasoning_score(
        content, gt, rewards._ref_gold_boxes(content, gt))


def test_modes_agree_on_well_formed_episodes():
    rng = random.Random()  # fresh each run
    for _ in range(300):
        segs = rng.sample(range(1, 11), rng.randint(0, 3))
        lo = rng.randint(1, 200)
        s = sample(answer=f"{rng.choice('ABCD')}. x", segs=segs, frames=((lo, lo + rng.randint(0, 6)),),
                   boxes=((lo, (rng.randint(0, 150), rng.randint(0, 90), rng.randint(160, 319),
                                rng.randint(100, 191))),) if rng.random() < 0.7 else ())
        rounds = []
        if rng.random() < 0.8:
            rounds.append(f"r. FIND_SEGMENT(d) = [{', '.join(map(str, rng.sample(range(1, 11), rng.randint(1, 3))))}]")
        if rng.random() < 0.8:
            f = rng.choice([lo, lo + 1, rng.randint(1, 300)])
            rounds.append(f"r. FIND_FRAME(d) = [{f}]")
            if rng.random() < 0.7 and s["valid_bounding_box"] and f == lo:
                x1, y1 = rng.randint(0, 200), rng.randint(0, 100)
                rounds.append("r. " + zoom_line((x1, y1, x1 + rng.randint(1, 100), y1 + rng.randint(1, 60))))
        rounds.append(f"so FINAL_ANSWER: {rng.choice('ABCD')}. x")
        text = "\n".join(rounds)
        for fn in (accuracy_reward, format_reward, reasoning_reward):
            assert fn([rounds], [s]) == fn([text], [s], reward_compat="reference"), (fn.__name__, rounds, s)
        total, _ = combined_reward([text], [s], reward_compat="reference")
        assert total == [pytest.approx(_ref_reasoning_reward_oracle(text, gold := s["conversations"][1]["value"], s))]
        assert gold


def test_bad_inputs():
    with pytest.raises(ValueError, match="reward_compat"):
        accuracy_reward(["x"], [sample()], reward_compat="nope")
    with pytest.raises(ValueError, match="length"):
        accuracy_reward(["x", "y"], [sample()])
    with pytest.raises(ValueError, match=r"completions\[1\]"):
        format_reward(["x", 3])
    with pytest.raises(ValueError, match="weights"):
        combined_reward(["x"], [sample()], weights={"speed": 1.0})
    nohw = sample()
    del nohw["frame_hw"]
    with pytest.raises(ValueError, match="frame_hw"):
        reasoning_reward([good_episode()], [nohw])


def test_gold_chain_scores_full_reasoning_with_the_limits_it_was_shown(synth_small):
    """The synthesized gold chain's zoom box lives in the coordinates of a frame resized with the tiny
    config's image limits: scored with those limits every manipulation is right; with the protocol's
    default limits the gold boxes are rescaled differently and the zoom no longer matches."""
    import json

    data_dir, mc = synth_small
    sft = json.loads((data_dir / "sft.json").read_text())
    grpo = {s["id"]: s for s in load_samples(data_dir / "grpo.json", kind="grpo")}
    pairs = [("\n".join(t["value"] for t in s["conversations"] if t["from"] == "gpt"), grpo[s["id"]])
             for s in sft if s["id"] in grpo]
    assert pairs
    texts, samples = zip(*pairs)
    limits = (mc.image_min_pixels, mc.image_max_pixels)
    assert reasoning_reward(list(texts), list(samples), image_pixels=limits) == [1.0] * len(pairs)
    assert all(r < 1.0 for r in reasoning_reward(list(texts), list(samples)))
    total, parts = combined_reward(list(texts), list(samples), image_pixels=limits)
    assert parts["reasoning"] == [1.0] * len(pairs) and parts["accuracy"] == [1.0] * len(pairs)


# --- malformed input: errors name the argument, the sample and the field --------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("valid_segments", 5, r"samples\[1\]\['valid_segments'\]"),
    ("valid_segments", ["3"], r"samples\[1\]\['valid_segments'\]\[0\]"),
    ("valid_frames", [40, 44], r"samples\[1\]\['valid_frames'\]\[0\]"),
    ("valid_frames", [[40]], r"samples\[1\]\['valid_frames'\]\[0\]"),
    ("valid_bounding_box", [[42, [1, 2, 3]]], r"samples\[1\]\['valid_bounding_box'\]\[0\]"),
    ("valid_bounding_box", [[42, [1, 2, float("inf"), 9]]], r"samples\[1\]\['valid_bounding_box'\]\[0\]"),
    ("valid_bounding_box", [[42, [1, 2, 10**400, 9]]], r"samples\[1\]\['valid_bounding_box'\]\[0\]"),
    ("valid_bounding_box", {"42": [1, 2, 3, 4]}, r"samples\[1\]\['valid_bounding_box'\]"),
    ("frame_hw", [0, 320], r"samples\[1\]\['frame_hw'\]"),
    ("frame_hw", [float("nan"), 320], r"samples\[1\]\['frame_hw'\]"),
    ("conversations", "B. red", r"samples\[1\]\['conversations'\]"),
    ("conversations", [None], r"samples\[1\]\['conversations'\]"),
])
@pytest.mark.parametrize("mode", ["fixed", "reference"])
def test_malformed_sample_names_sample_and_field(field, value, match, mode):
    bad = sample()
    bad[field] = value
    with pytest.raises(ValueError, match=match):
        combined_reward([good_episode(), good_episode()], [sample(), bad], reward_compat=mode)


@pytest.mark.parametrize("samples", [None, [None], ["B. red"], sample()])
def test_samples_must_be_a_list_of_dicts(samples):
    with pytest.raises(ValueError, match="samples"):
        combined_reward(["FINAL_ANSWER: B. red"], samples)


@pytest.mark.parametrize("fn", [format_reward, accuracy_reward, reasoning_reward, combined_reward])
def test_a_bare_string_is_not_a_batch(fn):
    """A str is a sequence: without the check each CHARACTER was scored as one completion (format_reward
    returned 20 zeros for one well-formed answer)."""
    with pytest.raises(ValueError, match=r"completions must be a list .* got a str; wrap"):
        fn("FINAL_ANSWER: B. red", [sample()])
    assert format_reward(["FINAL_ANSWER: B. red"]) == [1.0]


# --- every way "fixed" differs from the reference (the module docstring's list, one case each) ------------
# Reference values were checked against the reference's own reward_funcs.py / reward_utils.py
# (mbzuai-oryx/Video-CoM) on these very strings; here they are read through reward_compat="reference".

_DS = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "D. red"}],
       "valid_segments": [1, 2], "valid_frames": [[40, 44], [60, 61]],
       "valid_bounding_box": [[42, [100, 50, 140, 90]]], "frame_hw": (H, W)}
_GB = ", ".join(map(str, scaled((100, 50, 140, 90))))
DIFFERENCES = [   # (name, text, part, reference value, fixed value)
    ("lowercase tool heads", "find_frame(y) = 42", "reasoning", 0.0, 1.0),
    ("lowercase answer head", "final_answer: D. red", "accuracy", 0.0, 1.0),
    ("blank before the answer colon", "FINAL_ANSWER : D. red", "accuracy", 0.0, 1.0),
    ("answer letter without a dot", "FINAL_ANSWER: D", "accuracy", 1.0, 0.0),
    ("lower-case answer letter", "FINAL_ANSWER: d. red", "accuracy", 1.0, 0.0),
    ("answer in prose", "FINAL_ANSWER: Definitely red", "accuracy", 1.0, 0.0),
    ("FIND_FRAME with a list", "FIND_FRAME(y) = [42, 7]", "reasoning", 0.5, 0.0),
    ("several calls on one line", "FIND_SEGMENT(a) = [1] FIND_SEGMENT(b) = [5]", "reasoning", 1.0, 0.5),
    ("zoom before a FIND_FRAME on its line", f"FIND_FRAME(y) = 7\nSPATIAL_ZOOM(z) = [{_GB}] FIND_FRAME(y) = 42",
     "reasoning", 2 / 3, 1 / 3),
    ("paren zoom form", "FIND_FRAME(y) = 42\nSPATIAL_ZOOM(z) = (1, 1, 5, 5)", "reasoning", 0.5, 1.0),
    ("bare zoom form", "FIND_FRAME(y) = 42\nSPATIAL_ZOOM(z) = 1, 1, 5, 5", "reasoning", 0.5, 1.0),
    ("zoom flat list of 8", "FIND_FRAME(y) = 42\nSPATIAL_ZOOM(z) = [1, 1, 5, 5, 2, 2, 6, 6]", "reasoning",
     1 / 3, 1.0),
    ("second bracket box", f"FIND_FRAME(y) = 42\nSPATIAL_ZOOM(z) = [{_GB}], [1, 1, 5, 5]", "reasoning",
     1.0, 2 / 3),
    ("number over int32", "FIND_FRAME(y) = 42\nFIND_FRAME(y) = 99999999999", "reasoning", 0.5, 1.0),
    ("number over 4,300 digits", f"FIND_FRAME(y) = [{'9' * 5000}]\nFIND_FRAME(y) = 42", "reasoning", 0.0, 1.0),
    ("box too large for a float", f"FIND_FRAME(y) = 42\nSPATIAL_ZOOM(z) = [1, 1, {'9' * 200}, {'9' * 200}]",
     "reasoning", 0.5, 1.0),
]


@pytest.mark.parametrize("name,text,part,ref,fixed", DIFFERENCES, ids=[d[0] for d in DIFFERENCES])
def test_documented_differences_from_the_reference(name, text, part, ref, fixed):
    """Each listed difference exists (reference mode returns a score, never raises) and is documented."""
    _, parts_ref = combined_reward([text], [_DS], reward_compat="reference")
    _, parts_fixed = combined_reward([text], [_DS])
    assert (parts_ref[part][0], parts_fixed[part][0]) == (pytest.approx(ref), pytest.approx(fixed))
    assert name.lower() in " ".join(rewards.__doc__.lower().split())
