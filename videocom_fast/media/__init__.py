"""Media layer: exact-frame decoding (`decode`), a shared LRU frame cache (`cache`), the overlay (`overlay`).

    from videocom_fast.media import open_video, VideoSource, FrameCache
"""
from .cache import FrameCache
from .decode import VideoError, VideoSource, available_backends, open_video, probe

__all__ = ["open_video", "VideoSource", "VideoError", "FrameCache", "probe", "available_backends"]
