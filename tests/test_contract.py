"""The media contract (videocom_fast/contract.py): synth, SFT and GRPO record the media settings and
generation limits they used; SFT refuses data whose zoom boxes are in other coordinates; grpo, eval and
rollout run under the model's recorded settings unless told otherwise."""
import dataclasses
import json
import shutil

import pytest

from videocom_fast.contract import (CONTRACT_FILE, check_zoom_coordinates, read_contract, resolve,
                                    write_contract)
from videocom_fast.env import MediaConfig
from videocom_fast.protocol import smart_resize

SMALL = dict(main_nframes=4, rewatch_nframes=2, video_min_pixels=3136, video_max_pixels=6272,
             image_min_pixels=3136, image_max_pixels=12544)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from videocom_fast.data import synthesize
    from videocom_fast.models import build_tiny

    root = tmp_path_factory.mktemp("contract")
    small = synthesize(root / "small", num_samples=3, seed=2, seconds=(4, 5), media_config=MediaConfig(**SMALL))
    return dict(root=root, small=small, model=build_tiny(root / "tiny", seed=0))


def test_synth_records_the_coordinates_of_its_zoom_boxes(world):
    c = read_contract(world["small"]["sft"])
    assert c["written_by"] == "synth" and c["media"] == SMALL
    assert c["zoom_hw"] == list(smart_resize(*c["frame_hw"], min_pixels=3136, max_pixels=12544))
    # the SFT chains' SPATIAL_ZOOM boxes lie inside that resized frame
    h, w = c["zoom_hw"]
    for s in json.loads(open(world["small"]["sft"]).read()):
        text = s["conversations"][5]["value"]
        x1, y1, x2, y2 = json.loads(text[text.index("= [") + 2:])
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


@pytest.mark.slow
def test_sft_refuses_data_written_for_other_image_limits(world, tmp_path):
    from videocom_fast.training.config import load_config
    from videocom_fast.training.sft import SFTConfig, run_sft

    cfg = load_config(SFTConfig, "sft_tiny", [f"data={world['small']['sft']}", f"output_dir={tmp_path / 'o'}",
                                              "media.image_max_pixels=100352", "progress=false"])
    with pytest.raises(ValueError) as e:
        run_sft(cfg)
    msg = str(e.value)
    # both settings, the file that records the data's, and the fix
    assert "image_max_pixels=12544" in msg and "image_max_pixels=100352" in msg and CONTRACT_FILE in msg
    assert "media.image_max_pixels=12544" in msg and "videocom-fast synth" in msg
    assert not (tmp_path / "o" / "_base").exists()        # stopped before a model was built


def test_limits_that_resize_alike_are_accepted(world):
    c = read_contract(world["small"]["sft"])
    H, W = c["frame_hw"]
    h, w = c["zoom_hw"]
    # a max_pixels a little above h*w resizes the frames to the same size: every box stays valid
    same = MediaConfig(**{**SMALL, "image_max_pixels": h * w + 1})
    assert list(smart_resize(H, W, min_pixels=3136, max_pixels=h * w + 1)) == [h, w]
    check_zoom_coordinates(world["small"]["sft"], same)
    with pytest.raises(ValueError):
        check_zoom_coordinates(world["small"]["sft"], MediaConfig(**{**SMALL, "image_max_pixels": 2 * 3136}))


def test_resolve_order_explicit_model_data_defaults(tmp_path, world):
    model = tmp_path / "m"
    write_contract(model, "sft", {**SMALL, "main_nframes": 6}, generation={"max_new_tokens": 9, "max_rounds": 3})
    m, g, src = resolve(model, world["small"]["grpo"], media={"rewatch_nframes": 3}, generation={"max_rounds": 4})
    assert (m.main_nframes, m.rewatch_nframes, m.image_max_pixels) == (6, 3, 12544)
    assert (g["max_new_tokens"], g["max_rounds"], g["temperature"]) == (9, 4, 0.9)
    assert str(model) in src["media"] and "explicit" in src["generation"]
    m, g, _ = resolve(tmp_path / "no_contract", world["small"]["grpo"])       # model without media.json: data
    assert dataclasses.asdict(m) == SMALL and g["max_new_tokens"] == 512
    m, _, src = resolve(None, None)
    assert m == MediaConfig() and src["media"] == "defaults"


@pytest.mark.slow
def test_sft_records_its_media_and_generation_limits_and_grpo_reads_them(world, tmp_path):
    from videocom_fast.training.config import load_config
    from videocom_fast.training.grpo import GRPOConfig, resolve_contract
    from videocom_fast.training.sft import SFTConfig, run_sft

    out = tmp_path / "sft"
    run_sft(load_config(SFTConfig, "sft_tiny", [f"data={world['small']['sft']}", f"output_dir={out}", "max_steps=1",
                                                f"media={json.dumps(SMALL)}", "max_new_tokens=24", "eval_fraction=0",
                                                "progress=false", "tensorboard=false", "eval_every=0"]))
    c = read_contract(out)
    assert c["written_by"] == "sft" and c["media"] == SMALL
    assert c["generation"] == {"max_new_tokens": 24, "max_rounds": 5}
    cfg = load_config(GRPOConfig, "grpo_tiny", [f"model={out}", f"data={world['small']['grpo']}"])
    got = resolve_contract(cfg, tmp_path / "grpo", write=True)
    assert got.media == SMALL and (got.max_new_tokens, got.max_rounds) == (24, 5)
    rec = read_contract(tmp_path / "grpo")
    assert rec["written_by"] == "grpo" and rec["generation"]["max_new_tokens"] == 24
    explicit = resolve_contract(load_config(GRPOConfig, "grpo_tiny", [
        f"model={out}", f"data={world['small']['grpo']}", "media.main_nframes=2", "max_new_tokens=8"]),
        tmp_path / "g2", write=False)
    assert explicit.media == {**SMALL, "main_nframes": 2} and explicit.max_new_tokens == 8


def test_resume_with_other_media_is_refused(world, tmp_path):
    from videocom_fast.training.grpo import GRPOConfig, resolve_contract

    out = tmp_path / "g"
    write_contract(out, "grpo", SMALL, generation={"max_new_tokens": 8, "max_rounds": 2})
    cfg = GRPOConfig(model="tiny", data=world["small"]["grpo"], output_dir=str(out), resume=True,
                     media={"main_nframes": 8})
    with pytest.raises(ValueError, match="resume.*main_nframes"):
        resolve_contract(cfg, out, write=True)


def _model_with_contract(world, tmp_path, **generation):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    write_contract(model, "grpo", SMALL, generation=generation)
    return model


@pytest.mark.slow
def test_eval_runs_under_the_models_recorded_limits(world, tmp_path):
    from videocom_fast.evaluate import evaluate

    model = _model_with_contract(world, tmp_path, max_new_tokens=6, max_rounds=2)
    s = evaluate(model, world["small"]["eval"], tmp_path / "e.json")
    # the random tiny model never answers: every round runs to the recorded per-round limit
    assert s["contract"]["media"] == SMALL and s["contract"]["generation"]["max_new_tokens"] == 6
    assert 0 < s["generated_tokens_mean"] <= 2 * 6 and s["rounds_mean"] <= 2


@pytest.mark.slow
def test_eval_cli_reproduces_an_in_process_evaluation(world, tmp_path, capsys):
    """The demo evaluates in process with its settings; the CLI on the same checkpoint, reading them from
    media.json, must give the same episodes (same seed and G)."""
    from videocom_fast.cli import main
    from videocom_fast.evaluate import evaluate

    model = _model_with_contract(world, tmp_path, max_new_tokens=5, max_rounds=3, temperature=0.9, top_k=50,
                                 top_p=1.0)
    ref = evaluate(model, world["small"]["grpo"], tmp_path / "eval_ref.json", greedy=False, num_generations=2, seed=1,
                   media=SMALL, max_new_tokens=5, max_rounds=3, tag="ref")
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data", world["small"]["grpo"], "--out", str(tmp_path / "eval_cli.json"),
                 "--sample", "--num-generations", "2", "--seed", "1"]) == 0
    got = json.loads(capsys.readouterr().out)
    for k in ("episodes", "reward_mean", "format_mean", "rounds_mean", "generated_tokens_mean", "tokens_mean"):
        assert got[k] == ref[k], k
    from videocom_fast.report import write_report

    html = write_report(tmp_path).read_text()     # the report shows what the episodes ran under
    assert "max_new_tokens=5" in html and "main_nframes=4" in html and "media.json" in html
    a = (tmp_path / "trajectories_ref.jsonl").read_text().splitlines()
    b = (tmp_path / "trajectories_eval.jsonl").read_text().splitlines()
    assert [json.loads(x)["rounds"] for x in a] == [json.loads(x)["rounds"] for x in b]


@pytest.mark.slow
def test_rollout_records_the_contract(world, tmp_path):
    from videocom_fast.evaluate import rollout_to_dir

    model = _model_with_contract(world, tmp_path, max_new_tokens=4, max_rounds=1)
    s = rollout_to_dir(model, world["small"]["grpo"], tmp_path / "r", num_generations=2, limit=1)
    assert s["episodes"] == 2 and s["generated_tokens_mean"] <= 4
    assert json.loads((tmp_path / "r" / "rollout.json").read_text())["contract"]["generation"]["max_rounds"] == 1


def test_missing_videos_name_the_sample_and_the_json(world, tmp_path):
    from videocom_fast.training.grpo import load_grpo_samples
    from videocom_fast.training.sft import _load_json_samples

    for name in ("sft", "grpo"):
        samples = json.loads(open(world["small"][name]).read())
        samples[1]["video"] = "videos/missing.mp4"
        (tmp_path / f"{name}.json").write_text(json.dumps(samples))
    with pytest.raises(ValueError, match=r"grpo\.json.*sample 1 \(id 'sample_0001'\).*missing\.mp4.*does not exist"):
        load_grpo_samples(str(tmp_path / "grpo.json"), media_root=str(world["small"]["out_dir"]))
    with pytest.raises(ValueError, match=r"sft\.json.*sample 1 \(id 'sample_0001'\).*missing\.mp4.*does not exist"):
        _load_json_samples(str(tmp_path / "sft.json"), media_root=str(world["small"]["out_dir"]))
    samples = json.loads((tmp_path / "sft.json").read_text())
    samples[1]["video"] = samples[0]["video"]
    samples[0]["conversations"][4]["media"]["image"] = "frames/gone.png"
    (tmp_path / "sft.json").write_text(json.dumps(samples))
    with pytest.raises(ValueError, match=r"sample 0 .*conversations\[4\]\.media\.image.*gone\.png"):
        _load_json_samples(str(tmp_path / "sft.json"), media_root=str(world["small"]["out_dir"]))


def test_synth_into_an_existing_directory_leaves_no_stale_files(tmp_path):
    from videocom_fast.data import synthesize

    d = tmp_path / "d"
    synthesize(d, num_samples=3, seed=0, seconds=(2, 2), workers=1)
    paths = synthesize(d, num_samples=2, seed=5, seconds=(2, 2), workers=1, codec="vp9")
    assert sorted(p.name for p in (d / "videos").iterdir()) == sorted(p.split("/")[-1] for p in paths["videos"])
    frames = sorted(p.name for p in (d / "frames").iterdir())
    assert len(frames) == 2 and all(f.startswith(("sample_0000", "sample_0001")) for f in frames)
