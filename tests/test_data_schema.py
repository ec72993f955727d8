"""videocom_fast.data.schema.load_samples: good files load (JSON list or JSONL, paths made absolute), every
bad file raises ValueError naming the sample index and the field. Media files are empty placeholders: the
schema checks that they exist, not what they hold."""
from __future__ import annotations

import copy
import json
import os

import pytest

from videocom_fast.data import load_samples
from videocom_fast.data.schema import load_samples as schema_load_samples

QUESTION = "<video>\nWhich character does the tag show?\nOptions: A. C, B. A, C. 3, D. F"


def sft_sample(i: int = 0) -> dict:
    return {
        "id": f"s{i}", "video": "videos/v.mp4",
        "conversations": [
            {"from": "human", "value": QUESTION, "segment_frame_list": {"2": [101]}, "media": {"frame_list": [7]}},
            {"from": "gpt", "value": "It is in segment 2. FIND_SEGMENT(the tag) = [2]"},
            {"from": "human", "value": "<video>\nContinue solving the question after rewatching the selected segment.",
             "media": {"type": "video", "time_ranges": [{"start": 10.0, "end": 20.0}], "frame_list": [101]}},
            {"from": "gpt", "value": "FIND_FRAME(the tag) = [101]"},
            {"from": "human", "value": "<image>\nContinue solving the question with the selected frame.",
             "media": {"type": "image", "image": "frames/f101.png", "frame": 101}},
            {"from": "gpt", "value": "SPATIAL_ZOOM(the tag) = [10, 20, 40, 50]"},
            {"from": "human", "value": "<image>\nContinue solving the question by focusing on the zoomed region.",
             "media": {"type": "image", "image": "frames/f101.png", "bbox": [[12, 22, 44, 55]]}},
            {"from": "gpt", "value": "The tag shows A. FINAL_ANSWER: B. A"},
        ],
    }


def grpo_sample(i: int = 0) -> dict:
    return {
        "id": f"g{i}", "video": "videos/v.mp4",
        "conversations": [{"from": "human", "value": QUESTION, "segment_frame_list": {"2": [101]}},
                          {"from": "gpt", "value": "B. A"}],
        "valid_segments": [2], "valid_frames": [[99, 103]], "valid_bounding_box": [[101, [10, 20, 40, 50]]],
        "answer": "B",
    }


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "frames").mkdir()
    (tmp_path / "videos" / "v.mp4").write_bytes(b"")
    (tmp_path / "frames" / "f101.png").write_bytes(b"")
    return tmp_path


def write(root, samples, name="data.json", jsonl=False):
    p = root / name
    if jsonl:
        p.write_text("\n".join(json.dumps(s) for s in samples) + "\n\n")
    else:
        p.write_text(json.dumps(samples, indent=1))
    return p


# --- good files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("jsonl", [False, True])
def test_sft_loads_and_resolves_paths(root, jsonl):
    samples = [sft_sample(0), sft_sample(1)]
    out = load_samples(write(root, samples, "d.jsonl" if jsonl else "d.json", jsonl), kind="sft")
    assert [s["index"] for s in out] == [0, 1]
    for s, orig in zip(out, samples):
        assert s["video"] == str(root / "videos" / "v.mp4") and os.path.isabs(s["video"])
        assert s["conversations"][4]["media"]["image"] == str(root / "frames" / "f101.png")
        assert s["conversations"][0]["value"] == orig["conversations"][0]["value"]  # original keys kept
        assert s["conversations"][2]["media"]["time_ranges"] == [{"start": 10.0, "end": 20.0}]
        assert s["id"] == orig["id"]


def test_grpo_loads(root):
    out = schema_load_samples(write(root, [grpo_sample(0), grpo_sample(1)]), kind="grpo")
    assert len(out) == 2 and out[1]["valid_frames"] == [[99, 103]] and out[1]["index"] == 1


def test_paths_relative_to_the_json_not_the_cwd(root, monkeypatch):
    sub = root / "splits"
    sub.mkdir()
    s = grpo_sample()
    s["video"] = "../videos/v.mp4"
    monkeypatch.chdir("/")
    (out,) = load_samples(write(sub, [s]), kind="grpo")
    assert out["video"] == str(root / "videos" / "v.mp4")


def test_urls_absolute_paths_lists_and_check_files(root):
    s = grpo_sample()
    s["video"] = ["https://example.org/a.mp4", str(root / "videos" / "v.mp4")]
    (out,) = load_samples(write(root, [s]), kind="grpo")
    assert out["video"] == ["https://example.org/a.mp4", str(root / "videos" / "v.mp4")]
    s = grpo_sample()
    s["video"] = "videos/missing.mp4"
    (out,) = schema_load_samples(write(root, [s]), kind="grpo", check_files=False)
    assert out["video"] == str(root / "videos" / "missing.mp4")


def test_image_question_sample(root):
    s = grpo_sample()
    del s["video"]
    s["image"] = "frames/f101.png"
    s["conversations"][0]["value"] = QUESTION.replace("<video>", "<image>")
    (out,) = load_samples(write(root, [s]), kind="grpo")
    assert out["image"] == str(root / "frames" / "f101.png")


# --- bad files: (mutation, expected message fragment) -------------------------------------------------

def _set(path, value):
    def f(s):
        *head, last = path
        d = s
        for k in head:
            d = d[k]
        if value is _DEL:
            del d[last]
        else:
            d[last] = value
    return f


_DEL = object()
C = "conversations"

SFT_BAD = [
    (_set(["video"], "videos/missing.mp4"), r"video: expected an existing file"),
    (_set(["video"], ""), r"video: expected a non-empty path"),
    (_set(["video"], []), r"video: expected a path or a non-empty list"),
    (_set(["image"], "frames/f101.png"), r'exactly one of "video" and "image"'),
    (_set(["video"], _DEL), r'exactly one of "video" and "image"'),
    (_set([C], []), r"conversations: expected a list of at least 2"),
    (_set([C], "hello"), r"conversations: expected a list"),
    (_set([C, 1, "from"], "human"), r"conversations\[1\]\.from: expected 'gpt'"),
    (_set([C, 0, "from"], "system"), r"conversations\[0\]\.from: expected 'human'"),
    (_set([C, 3, "value"], None), r"conversations\[3\]\.value: expected a string"),
    (_set([C, 0, "value"], "Which character?\nOptions: A. x, B. y"), r"conversations\[0\]\.value: expected the question with the <video> tag"),
    (_set([C, 0, "value"], "<video>\nWhich character?"), r"Options:"),
    (_set([C, 0, "media"], {"frame_list": [0]}), r"conversations\[0\]\.media\.frame_list\[0\]: expected a positive integer"),
    (_set([C, 0, "segment_frame_list"], {"two": [1]}), r"segment_frame_list key: expected a positive segment"),
    (_set([C, 0, "segment_frame_list"], {"2": [1.5]}), r"segment_frame_list\['2'\]\[0\]"),
    (_set([C, 2, "media", "type"], "audio"), r"conversations\[2\]\.media: expected a dict with \"type\""),
    (_set([C, 2, "media", "time_ranges"], [{"start": 20.0, "end": 10.0}]), r"time_ranges\[0\]: expected 0 <= start < end"),
    (_set([C, 2, "media", "time_ranges"], [{"start": 1.0}]), r"time_ranges\[0\]: expected \{\"start\""),
    (_set([C, 2, "media", "time_ranges"], [{"start": 1.0, "end": float("nan")}]), r"time_ranges\[0\]"),
    (_set([C, 2, "media", "time_ranges"], _DEL), r"conversations\[2\]\.media: expected a rewatch"),
    (_set([C, 2, "media", "frame_list"], [101, -3]), r"media\.frame_list\[1\]: expected a positive integer"),
    (_set([C, 2, "value"], "Continue solving the question after rewatching the selected segment."), r"conversations\[2\]\.value: expected the <video> tag"),
    (_set([C, 4, "media", "image"], "frames/none.png"), r"conversations\[4\]\.media\.image: expected an existing file"),
    (_set([C, 6, "media", "bbox"], [[10, 20, 5, 50]]), r"media\.bbox\[0\]: expected x2 > x1"),
    (_set([C, 6, "media", "bbox"], [[10, 20, 30]]), r"media\.bbox\[0\]: expected \[x1, y1, x2, y2\]"),
    (_set([C, 6, "media", "frame"], "101"), r"media\.frame: expected a positive integer"),
    (_set([C, 7, "value"], "The tag shows A."), r"conversations\[7\]\.value: expected the last gpt turn to hold 'FINAL_ANSWER"),
    (_set([C, 7, "media"], {"type": "image"}), r"conversations\[7\]\.media: expected no media on a gpt turn"),
    (lambda s: s[C].append({"from": "human", "value": "Choose the final answer from the provided options."}),
     r"conversations: expected an even number of turns"),
    (lambda s: s[C][2].update(media=None), r"conversations\[2\]\.value: expected no <video> tag"),
]

GRPO_BAD = [
    (_set([C, 1, "value"], "The answer is B"), r"conversations\[1\]\.value: expected the gold answer starting"),
    (_set(["answer"], "C"), r"answer: expected the gold turn's letter 'B'"),
    (_set(["valid_segments"], [2, 0]), r"valid_segments\[1\]: expected a positive integer"),
    (_set(["valid_segments"], 2), r"valid_segments: expected a list"),
    (_set(["valid_frames"], [[103, 99]]), r"valid_frames\[0\]: expected \[start, end\]"),
    (_set(["valid_frames"], [[1, 2, 3]]), r"valid_frames\[0\]"),
    (_set(["valid_bounding_box"], [[101, [1, 2, 3]]]), r"valid_bounding_box\[0\]\[1\]: expected \[x1, y1, x2, y2\]"),
    (_set(["valid_bounding_box"], [[0, [1, 2, 3, 4]]]), r"valid_bounding_box\[0\]\[0\]: expected a positive"),
    (_set(["valid_bounding_box"], [[101]]), r"valid_bounding_box\[0\]: expected \[frame,"),
    (_set(["segment_frame_list"], [1, 2]), r"segment_frame_list: expected a dict"),
]


@pytest.mark.parametrize("mutate,msg", SFT_BAD, ids=[f"sft{i}" for i in range(len(SFT_BAD))])
def test_bad_sft_sample_names_index_and_field(root, mutate, msg):
    samples = [sft_sample(0), sft_sample(1), sft_sample(2)]
    mutate(samples[2])
    with pytest.raises(ValueError, match=r"sample 2: .*" + msg):
        load_samples(write(root, samples), kind="sft")


@pytest.mark.parametrize("mutate,msg", GRPO_BAD, ids=[f"grpo{i}" for i in range(len(GRPO_BAD))])
def test_bad_grpo_sample_names_index_and_field(root, mutate, msg):
    samples = [grpo_sample(0), grpo_sample(1)]
    mutate(samples[1])
    with pytest.raises(ValueError, match=r"sample 1: .*" + msg):
        load_samples(write(root, samples, jsonl=True), kind="grpo")


def test_the_good_samples_above_are_good(root):
    # the bad cases differ from these by one mutation each: both kinds must load unmutated
    assert len(load_samples(write(root, [sft_sample(i) for i in range(3)]), kind="sft")) == 3
    assert len(load_samples(write(root, [grpo_sample(i) for i in range(2)], jsonl=True), kind="grpo")) == 2


def test_sft_file_is_not_a_grpo_file(root):
    with pytest.raises(ValueError, match=r"sample 0: conversations\[1\]\.value: expected the gold answer"):
        load_samples(write(root, [sft_sample()]), kind="grpo")
    g = grpo_sample()
    g["conversations"][1]["value"] = "B. A"
    with pytest.raises(ValueError, match=r"sample 0: conversations\[1\]\.value: expected the last gpt turn"):
        load_samples(write(root, [g]), kind="sft")


def test_file_level_errors(root):
    with pytest.raises(ValueError, match="kind must be one of"):
        load_samples(write(root, [grpo_sample()]), kind="dpo")
    with pytest.raises(ValueError, match="must be a JSON or JSONL file"):
        load_samples(root, kind="grpo")
    with pytest.raises(ValueError, match="no samples"):
        load_samples(write(root, []), kind="grpo")
    bad = root / "bad.json"
    bad.write_text('[{"video": "videos/v.mp4",')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_samples(bad, kind="grpo")
    bad.write_text(json.dumps(grpo_sample(0)) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"line 2 \(sample 1\) is not valid JSON"):
        load_samples(bad, kind="grpo")
    bad.write_text("video,conversations\n")
    with pytest.raises(ValueError, match="expected a JSON list of samples or JSONL"):
        load_samples(bad, kind="grpo")
    with pytest.raises(ValueError, match=r"sample 1: sample: expected a JSON object"):
        load_samples(write(root, [grpo_sample(0), ["not", "a", "dict"]]), kind="grpo")
    with pytest.raises(ValueError, match=r"sample 1: id: expected a unique id \(sample 0"):
        load_samples(write(root, [grpo_sample(0), grpo_sample(0)]), kind="grpo")


def test_input_samples_keep_their_content(root):
    s = sft_sample()
    before = copy.deepcopy(s)
    (out,) = load_samples(write(root, [s]), kind="sft")
    changed = {k for k in before if before[k] != out[k]}
    assert changed == {"video", "conversations"}  # only paths were rewritten
    assert out[C][6]["media"]["bbox"] == before[C][6]["media"]["bbox"]
