"""DALI decoding (media/dali.py) on this GPU-less machine, and "frames decoded on a device stay there".

DALI's CPU variant decodes VP9 and MJPEG (not H.264, FACTS.md), so the pool, the indices, the bounds and
the closing are checked on those codecs with real pipelines; every test frame carries a barcode of its own
index (helpers_media.read_index). NVDEC itself cannot run here: its output placement is stood in for by the
meta device, where any host copy (`.cpu()`, `.numpy()`, `np.asarray`) raises, so the path from the decoder
through the FrameCache, the env and the preprocessing dispatch to `pixel_values` must stay on the device.
"""
from __future__ import annotations

import gc
import random
import threading
import weakref

import numpy as np
import pytest
import torch

from helpers_media import default_suffix, make_frames, read_index, write_video
from videocom_fast.media import FrameCache, dali, open_video, probe

pytest.importorskip("nvidia.dali")
N = 40


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali")
    seed = random.randrange(2**31)
    out = {}
    for codec, (h, w) in {"vp9": (96, 160), "mjpeg": (64, 130)}.items():
        out[codec] = str(write_video(d / f"v_{codec}{default_suffix(codec)}", make_frames(N, h, w, seed=seed),
                                     fps=8, codec=codec, gop=10))
    return out


@pytest.fixture
def pool(monkeypatch):
    """A fresh process pool of 2 pipelines that remembers (weakly) every pipeline it built."""
    built = []

    def build(*key):
        p = dali._build_pipeline(*key)
        built.append(weakref.ref(p))
        return p

    p = dali.DecoderPool(2, build=build)
    p.built_refs = built
    monkeypatch.setattr(dali, "_POOL", p)
    return p


def _live(refs):
    gc.collect()
    return sum(r() is not None for r in refs)


def test_many_open_videos_share_a_bounded_pool_of_pipelines(videos, pool):
    """Eight open sources (as eight live groups would hold), requests interleaved from two threads: at most
    2 pipelines ever exist, every frame is the one asked for, and closing frees the pipelines."""
    srcs = [open_video(videos["vp9" if i % 2 else "mjpeg"], backend="dali") for i in range(8)]
    assert all(s.backend == "dali" and s.device == torch.device("cpu") for s in srcs)
    errors = []

    def work(k):
        rng = random.Random(k)
        try:
            for _ in range(3):
                s = srcs[rng.randrange(len(srcs))]
                idx = rng.sample(range(N), 5) + [rng.randrange(N)]
                got = s.get_frames(idx)
                assert [read_index(f) for f in got.numpy()] == idx
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert pool.built <= 2 and _live(pool.built_refs) <= 2
    assert dali.close_decoders() == pool.stats()["closed"] >= 1
    assert _live(pool.built_refs) == 0                  # no decoder outlives close_decoders()
    assert [read_index(f) for f in srcs[0].get_frames([N - 1]).numpy()] == [N - 1]   # rebuilt on demand


def test_file_read_once_and_fed_without_copies(videos, pool, monkeypatch):
    reads, fed = [], []
    real_fromfile = np.fromfile
    monkeypatch.setattr(dali.np, "fromfile", lambda *a, **k: reads.append(a[0]) or real_fromfile(*a, **k))
    src = open_video(videos["vp9"], backend="dali", verify="none")
    from nvidia.dali import Pipeline
    feed = Pipeline.feed_input
    monkeypatch.setattr(Pipeline, "feed_input",
                        lambda self, name, data, *a, **k: (fed.append((name, data[0])), feed(self, name, data, *a, **k))[1])
    for idx in ([3, 1], [N - 1], [0, 20, 21]):
        assert [read_index(f) for f in src.get_frames(idx).numpy()] == idx
    assert reads == [videos["vp9"]]
    encoded = [d for name, d in fed if name == "enc"]
    assert len(encoded) == 3 and all(d is src._data for d in encoded)     # the same bytes, never re-read
    src.close()
    with pytest.raises(ValueError, match="closed"):
        src.get_frames([0])


def test_bounds_and_codecs_named(videos, pool):
    src = open_video(videos["mjpeg"], backend="dali")
    with pytest.raises(ValueError, match=r"indices\[1\] = 40 is out of range"):
        src.get_frames([0, N])
    with pytest.raises(ValueError, match="-1"):
        src.get_frames([-1])
    assert src.get_frames([]).shape == (0, 64, 130, 3)
    with pytest.raises(ValueError, match="capacity"):
        dali.DecoderPool(0)


def test_pool_waits_for_a_free_pipeline_and_drops_broken_ones():
    """Capacity 1, two keys: the second acquire waits until the first is released, then closes the idle
    pipeline of the other key to build its own; a pipeline whose run raised is not lent again."""
    built = []
    pool = dali.DecoderPool(1, build=lambda *key: built.append(key) or object())
    a = pool.acquire(("cpu", None))
    got = []
    t = threading.Thread(target=lambda: got.append(pool.acquire(("mixed", 1))))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got                      # blocked: the only slot is busy
    pool.release(("cpu", None), a)
    t.join(5)
    assert got and built == [("cpu", None), ("mixed", 1)] and pool.stats()["closed"] == 1
    pool.release(("mixed", 1), got[0], broken=True)
    assert pool.stats()["idle"] == 0 and pool.acquire(("mixed", 1)) is not got[0]


def test_gpu_decoder_uses_local_rank_not_gpu_0(videos, monkeypatch):
    """The NVDEC variant decodes on LOCAL_RANK's GPU (else torch's current device); the source says where
    its frames will be. (Built without running: pipelines are made on the first request.)"""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert dali.cuda_device_index() == 3
    src = dali.DaliSource(probe(videos["vp9"]), device="mixed")
    assert src.device == torch.device("cuda", 3) and src._key == ("mixed", 3)
    monkeypatch.setenv("LOCAL_RANK", "5")        # one visible GPU per process: LOCAL_RANK is not an index
    assert dali.cuda_device_index() == 1
    monkeypatch.delenv("LOCAL_RANK")
    assert dali.cuda_device_index() == 1


# --- frames on the device stay on the device ---------------------------------------------------------------

class _OnDevice(dali.DaliSource):
    """The real DALI CPU decode, its output placed on the meta device as NVDEC's lands on the GPU."""

    def __init__(self, info):
        super().__init__(info, device="cpu")
        self.device = torch.device("meta")

    def _to_torch(self, out):
        return super()._to_torch(out).to(self.device)


def test_device_frames_reach_pixel_values_without_a_host_copy(videos, pool, monkeypatch):
    """decode -> FrameCache -> ManipulationEnv (video, frame, zoom) -> preprocess_items -> pixel_values, all on
    the device, through the device kernel that the dispatch picks for a non-host device."""
    import importlib

    from videocom_fast.env import ManipulationEnv, MediaConfig
    from videocom_fast.rollout.media_inputs import preprocess_items
    triton_mod = importlib.import_module("videocom_fast.kernels.crop_resize_patchify")
    launches = []

    def kernel(items, lut, out):
        launches.append({t.device.type for t in (lut, out, *(it.frames_THWC for it in items))})

    monkeypatch.setattr(triton_mod, "crop_resize_patchify_triton", kernel)
    src = _OnDevice(probe(videos["vp9"]))
    sample = {"video": videos["vp9"], "conversations": [{"value": "<video>\nWhat is shown?"}]}
    env = ManipulationEnv(sample, cache=FrameCache(), config=MediaConfig(main_nframes=8), source=src)
    items = [env.main_video()]
    items += env.step("FIND_FRAME(the tag) = 5").media
    items += env.step("SPATIAL_ZOOM(the tag) = [10, 10, 60, 50]").media
    assert [it.kind for it in items] == ["video", "image", "image"]
    assert all(it.frames.device.type == "meta" for it in items)
    out = preprocess_items(items, dtype=torch.bfloat16)
    assert launches and all(d == {"meta"} for d in launches)
    for (pv, grid), it in zip(out, items):
        assert pv.device.type == "meta" and pv.dtype == torch.bfloat16 and pv.shape[1] == 1176
        assert grid.device.type == "cpu" and pv.shape[0] == int(grid.prod())    # grids stay on the host
    # the cache kept the frames where they were decoded, and a second request is served from there
    again = env.main_video()
    assert again.frames.device.type == "meta" and env.cache.stats()["hits"] >= 8
