"""DALI video decoding: a bounded pool of reusable pipelines, frames left on the device they were decoded on.

Why: one pipeline (and one NVDEC decoder) per opened video, never closed, grows with the number of live
groups (up to 32 in the engine) and pins their decoder memory on the GPU; copying NVDEC's frames to the
host and back made the CUDA/Triton preprocessing kernels dead code. Here:

- `fn.decoders.video` takes the ENCODED file as an input, so a pipeline is not tied to a video: a process
  keeps at most `VIDEOCOM_DALI_DECODERS` pipelines (default 2: the engine's env worker and the frame cache's
  prefetch thread) in `DecoderPool`, lent to one request at a time, and closes idle ones (least recently
  used first) when another device needs a slot. Sources hold no pipeline; `close_decoders()` drops them all.
- A source reads its file once (`np.fromfile` when opened); each request passes those bytes to DALI without
  a copy (`external_source(no_copy=True)`) together with its sorted frame indices.
  NOTE: DALI's decoder still demuxes the stream on every run (its API keeps no per-file state between runs);
  the FrameCache in front of it makes that once per frame batch, not once per rollout.
- device="mixed" decodes with NVDEC on `cuda_device_index()` (LOCAL_RANK, else torch's current device; not
  GPU 0) and the frames are copied device-to-device out of DALI's buffer into a torch tensor on that GPU,
  on torch's current stream: `get_frames` returns CUDA uint8 frames and the preprocessing dispatch
  (preprocess.py) runs the CUDA/Triton kernel on them straight into device `pixel_values`.
  The CPU variant (VP8/VP9/MJPEG only, FACTS.md) returns CPU frames; it is how this file is tested here.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from .. import envs
from .decode import VideoInfo, VideoSource, _fail

# codecs DALI's CPU variant decodes (FACTS.md: it refuses H.264, HEVC, MPEG-4)
DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg"}
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}


def cuda_device_index() -> int:
    """The GPU this process decodes on: LOCAL_RANK when it names a visible device, else torch's current one."""
    rank = envs.local_rank()
    if rank is not None and rank < torch.cuda.device_count():
        return rank
    return torch.cuda.current_device()


# --- the pipeline pool ---------------------------------------------------------------------------------------

def _build_pipeline(device: str, device_id: int | None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, exec_dynamic=True, prefetch_queue_depth=1)
    def pipe():
        # no_copy: DALI reads the source's bytes in place (they stay alive and unchanged during the run)
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=True)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(enc, device=device, frames=frames)

    p = pipe()
    p.build()
    return p


class DecoderPool:
    """At most `capacity` DALI pipelines alive; each serves any video of its (variant, device) key."""

    def __init__(self, capacity: int, build=_build_pipeline):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"DecoderPool: capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._build = build
        self._idle: list = []           # (key, pipeline), least recently used first
        self._busy = 0
        self._cond = threading.Condition()
        self.built = self.closed = 0

    def acquire(self, key: tuple):
        with self._cond:
            while True:
                for i, (k, p) in enumerate(self._idle):
                    if k == key:
                        del self._idle[i]
                        self._busy += 1
                        return p
                if self._busy + len(self._idle) < self.capacity:
                    self._busy += 1     # the slot is ours; build outside the lock
                    break
                if self._idle:          # a slot held by another key's idle pipeline: close it
                    self._idle.pop(0)
                    self.closed += 1
                    continue
                self._cond.wait()
        try:
            p = self._build(*key)
        except BaseException:
            with self._cond:
                self._busy -= 1
                self._cond.notify()
            raise
        with self._cond:
            self.built += 1
        return p

    def release(self, key: tuple, pipe, broken: bool = False) -> None:
        """Give `pipe` back; a pipeline whose run raised is dropped, not lent again."""
        with self._cond:
            self._busy -= 1
            if broken:
                self.closed += 1
            else:
                self._idle.append((key, pipe))
            self._cond.notify()

    def close_idle(self) -> int:
        """Drop every idle pipeline (their decoders are freed with them); returns how many."""
        with self._cond:
            n = len(self._idle)
            self._idle.clear()
            self.closed += n
            return n

    def stats(self) -> dict:
        with self._cond:
            return dict(capacity=self.capacity, idle=len(self._idle), busy=self._busy, built=self.built,
                        closed=self.closed)


_POOL: DecoderPool | None = None
_POOL_LOCK = threading.Lock()


def decoder_pool() -> DecoderPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = DecoderPool(envs.dali_decoders())
        return _POOL


def close_decoders() -> int:
    """Close every idle DALI pipeline of this process (e.g. before a long training phase)."""
    return decoder_pool().close_idle() if _POOL is not None else 0


# --- the source ----------------------------------------------------------------------------------------------

class DaliSource(VideoSource):
    """A video decoded by DALI. device "cpu" (VP8/VP9/MJPEG) or "mixed" (NVDEC on `device_id`)."""

    backend = "dali"

    def __init__(self, info: VideoInfo, device: str = "cpu", device_id: int | None = None, pool=None):
        super().__init__(info)
        if device not in ("cpu", "mixed"):
            raise ValueError(f"DaliSource: device must be 'cpu' or 'mixed', got {device!r}")
        codecs = DALI_CPU_CODECS if device == "cpu" else DALI_GPU_CODECS
        if info.codec not in codecs:
            raise _fail(self.path, f"codec {info.codec!r} is not decodable by DALI's {device} variant")
        if device == "mixed" and device_id is None:
            device_id = cuda_device_index()
        self._key = (device, device_id if device == "mixed" else None)
        self.device = torch.device("cuda", device_id) if device == "mixed" else torch.device("cpu")
        self._pool = pool or decoder_pool()
        self._data = np.fromfile(self.path, dtype=np.uint8)   # the file, read once

    def _decode_sorted(self, indices):
        if self._data is None:
            raise _fail(self.path, "the source is closed")
        pipe, ok = self._pool.acquire(self._key), False
        try:
            pipe.feed_input("enc", [self._data])
            pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            (out,) = pipe.run()
            frames_NHWC = self._to_torch(out)
            ok = True
        finally:
            self._pool.release(self._key, pipe, broken=not ok)
        if tuple(frames_NHWC.shape) != (len(indices), self.height, self.width, 3):
            raise _fail(self.path, f"DALI returned shape {tuple(frames_NHWC.shape)}")
        return frames_NHWC

    def _to_torch(self, out) -> torch.Tensor:
        """The batch's one sample as a torch tensor that owns its memory (DALI reuses its output buffers)."""
        if self._key[0] == "cpu":    # the CPU variant's output is host memory
            return torch.from_numpy(np.array(out[0]))
        from nvidia.dali.plugin.pytorch import feed_ndarray
        t = out.as_tensor()      # (1, N, H, W, 3) on the GPU
        dst = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
        # device-to-device on torch's current stream: the kernels that read `dst` next are ordered after it
        feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device))
        return dst[0]

    def close(self):
        self._data = None


__all__ = ["DaliSource", "DecoderPool", "decoder_pool", "close_decoders", "cuda_device_index",
           "DALI_CPU_CODECS", "DALI_GPU_CODECS"]
