"""The HTML report shows each round's text, action, reply and the exact media the model received; a real
browser (Debian's headless Chromium) renders it and we check the rendered DOM."""
import json
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from videocom_fast.protocol import parse_action
from videocom_fast.report import trajectory_record, write_records, write_report


def _item(kind, frames, box=None, indices=(0,)):
    return SimpleNamespace(kind=kind, frames=frames, box=box, indices=indices, resized_hw=(56, 84))


def _fake_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (4, 60, 90, 3), dtype=torch.uint8, generator=g)
    rounds = ["The object appears in segment 2. FIND_SEGMENT(object) = [2]",
              "Look closer. FIND_FRAME(object) = [17]",
              "Zoom in. SPATIAL_ZOOM(object) = [10, 10, 40, 30]",
              "It shows 7. FINAL_ANSWER: B. 7"]
    obs = [SimpleNamespace(text="Continue solving the question after rewatching the selected segment.",
                           reason="ok", media=[_item("video", frames, indices=(8, 9, 10, 11))]),
           SimpleNamespace(text="Continue solving the question with the selected frame.", reason="ok",
                           media=[_item("image", frames[:1], indices=(16,))]),
           SimpleNamespace(text="Continue solving the question by focusing on the zoomed region.", reason="ok",
                           media=[_item("image", frames[:1], box=(12, 15, 50, 40), indices=(16,))]),
           SimpleNamespace(text="", reason="answer", media=[])]
    traj = SimpleNamespace(sample_index=3, rollout_index=1, round_texts=rounds, observations=obs,
                           actions=[parse_action(r) for r in rounds], finish_reason="answer",
                           generated_mask=[True] * 40 + [False] * 60, token_ids=list(range(100)),
                           media=[_item("video", frames, indices=(0, 1, 2, 3))])
    sample = {"conversations": [{"from": "human", "value": "<video>\nWhich digit? Options: A. 3, B. 7"},
                                {"from": "gpt", "value": "B. 7"}]}
    rec = trajectory_record(traj, sample, {"accuracy": 1.0, "reasoning": 0.5})
    write_records(tmp_path / "trajectories.jsonl", [rec])
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "loss": 3.0 / (i + 1)})
                                                              for i in range(10)))
    (tmp_path / "summary.json").write_text(json.dumps({"rollout_tokens_per_s": 1234.5}))
    return rounds


def test_report_contains_rounds_and_media(tmp_path):
    rounds = _fake_run(tmp_path)
    html = write_report(tmp_path).read_text()
    for r in rounds:
        assert r.split(".")[0] in html
    # prompt video strip (4 thumbs) + rewatch strip (4) + frame (1) + zoom frame with box (1) + its crop (1)
    assert html.count('class="thumb"') == 4 + 4 + 1 + 1
    assert html.count('class="crop"') == 1
    assert 'class="curve"' in html
    assert "rollout_tokens_per_s" in html


def test_report_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        write_report(tmp_path / "nope")


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    _fake_run(tmp_path)
    page = write_report(tmp_path)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    # Count images that actually decoded (naturalWidth > 0) by rendering a script's result into the DOM.
    probe = tmp_path / "probe.html"
    # (on load: the pictures get their src from the page's script, and decode after it ran)
    probe.write_text(page.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => document.body.setAttribute('data-decoded', "
                   "Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length));"
                   "</script></body>"))
    dom = subprocess.run([_chromium(), *flags, "--virtual-time-budget=3000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "FIND_SEGMENT(object) = [2]" in dom
    assert "FINAL_ANSWER: B. 7" in dom
    assert 'data-decoded="12"' in dom  # 11 media pictures + 1 training curve, all decodable PNGs


# --- issue 15: 1-based frames, each picture once, every episode, answered/gold, thin crops, KL curve ------

def _records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]


def test_frames_are_one_based_and_zoom_labelled_by_the_answer(tmp_path):
    _fake_run(tmp_path)
    page = write_report(tmp_path).read_text()
    assert "frame 17 (ok)" in page and "frames [16]" not in page          # FIND_FRAME(object) = [17]
    assert "zoom: crop [12, 15, 50, 40] (original pixels) of frame 17 (ok)" in page
    assert "video, frames 9, 10, 11, 12" in page                           # indices (8, 9, 10, 11)
    assert "answered B, gold B" in page


def test_each_picture_embedded_once_and_every_episode_shown(tmp_path):
    _fake_run(tmp_path)
    rec = _records(tmp_path)[0]
    many = [dict(rec, sample_index=i, rollout_index=i % 8) for i in range(70)]
    write_records(tmp_path / "trajectories.jsonl", many)
    write_records(tmp_path / "trajectories_eval.jsonl", many[:40])
    page = write_report(tmp_path).read_text()
    assert page.count('<details class="traj"') == 110                     # 70 + 40, none dropped
    assert page.count('data-i="') == 110 * 11
    pool = json.loads(page.split("const IMG = ")[1].split(";\n")[0])
    # prompt video == rewatch frames (4; the FIND_FRAME picture is the first of them), the boxed frame and
    # the crop: 6 distinct pictures
    assert len(pool) == 6 and page.count("base64,") == 1 + 1             # the script's prefix + the curve PNG
    assert 'id="trajectories_eval"' in page and "filt(" in page


def test_boxes_drawn_inside_and_thin_crops_bounded():
    from videocom_fast.report import THUMB_H, _thumb

    frame = torch.zeros(60, 90, 3, dtype=torch.uint8)
    img = _thumb(frame, height=60, box=(0, 0, 90, 60))                    # x2/y2 exclusive: the whole frame
    px = img.load()
    assert px[89, 30] == (255, 40, 40) and px[45, 59] == (255, 40, 40)   # right and bottom edges visible
    thin = _thumb(torch.zeros(2, 300, 3, dtype=torch.uint8))
    assert thin.width <= 4 * THUMB_H and thin.height <= THUMB_H


def test_kl_curve(tmp_path):
    _fake_run(tmp_path)
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "metrics.jsonl").write_text("\n".join(
        json.dumps({"step": i, "reward/mean": 0.1 * i, "kl": 0.001 * i}) for i in range(1, 6)))
    page = write_report(tmp_path).read_text()
    assert 'alt="GRPO KL to the reference"' in page and 'alt="GRPO reward"' in page
