"""pytest plugin (`-p upstream_patch_plugin`) for tests/test_upstream_processors.py: every Qwen2-VL image
(torchvision and PIL) and video processor that transformers' own tests construct is patched by
`videocom_fast.patch_processor` at the end of its __init__, so their tests run against patched instances."""
from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

import videocom_fast

for _cls in (Qwen2VLImageProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor):
    def _init(self, *a, __init=_cls.__init__, __cls=_cls, **k):
        __init(self, *a, **k)
        if type(self) is __cls:   # the generated subclass inherits this __init__: patch once
            videocom_fast.patch_processor(self)
    _cls.__init__ = _init
