"""The vision tower: VisionForward vs transformers' path (modeling.vision_embeds, patch_matmul=True), same run.

Workloads (tiny Qwen2.5-VL from models.build_tiny, fp32, torch's threads = 2 here):
  videos  4 videos of grid (16, 18, 30): the spec's main-video budget, 34,560 patches, one call
  images  8 images of grid (1, 6, 12): a round of FIND_FRAME / SPATIAL_ZOOM crops, 576 patches, one call
Each workload is its own group (vision_forward_videos / vision_forward_images) with the transformers path as
role "baseline"; both paths are checked equal before timing. extra_info: visual tokens/s (rows after the
merger) and patches/s. The grid plan is cached after the first call, as in the engine's steady state.
Run: .venv/bin/pytest bench/bench_vision_forward.py --benchmark-only -o python_files="bench_*.py"
"""
from __future__ import annotations

import pytest
import torch

from videocom_fast import modeling
from videocom_fast.vision_forward import VisionForward

WORKLOADS = {"videos": [(16, 18, 30)] * 4, "images": [(1, 6, 12)] * 8}
_medians: dict = {}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from videocom_fast.models import build_tiny, load
    return load(build_tiny(tmp_path_factory.mktemp("bench_vision_tiny"), seed=0), dtype=torch.float32)[0]


@pytest.mark.parametrize("path", ["transformers", "vision_forward"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_vision_forward(benchmark, tiny_model, workload, path):
    grid = torch.tensor(WORKLOADS[workload])
    patches = int(grid.prod(-1).sum())
    pv = torch.randn(patches, 3 * 2 * 14 * 14)
    vf = VisionForward(tiny_model)
    base = lambda: modeling.vision_embeds(tiny_model, pv, grid, video=True, patch_matmul=True)  # noqa: E731
    cand = lambda: vf(pv, grid)                                                                  # noqa: E731
    want, got = base(), cand()           # warm-up (builds the grid plan) and the two paths agree
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    benchmark.group = f"vision_forward_{workload}"
    benchmark.extra_info["role"] = "baseline" if path == "transformers" else "candidate"
    benchmark.pedantic(base if path == "transformers" else cand, rounds=7 if workload == "videos" else 30,
                       warmup_rounds=1)
    med = benchmark.stats["median"]
    benchmark.extra_info["visual_tokens_per_s"] = patches // 4 / med
    benchmark.extra_info["patches_per_s"] = patches / med
    _medians[(workload, path)] = med


@pytest.fixture(scope="module", autouse=True)
def _ratio_table(request):
    yield
    if not _medians:
        return
    lines = ["", f"vision tower, tiny model, fp32, {torch.get_num_threads()} threads   transformers ms   "
                 "VisionForward ms   speedup"]
    for w in WORKLOADS:
        b, c = _medians.get((w, "transformers")), _medians.get((w, "vision_forward"))
        if b and c:
            lines.append(f"  {w + ' ' + str(WORKLOADS[w][0]) + ' x' + str(len(WORKLOADS[w])):<44}"
                         f"{b * 1e3:>12.2f}{c * 1e3:>19.2f}{b / c:>10.2f}x")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines))
