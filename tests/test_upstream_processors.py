"""patch_processor leaves transformers' processor contract intact: a patched Qwen2-VL image (torchvision and
PIL backends) or video processor serializes, saves and reloads like an unpatched one (the patch once stored
functions in the instance's __dict__, and `to_json_string()` / `save_pretrained()` failed for all three)."""
import copy
import json

import pytest
from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

import videocom_fast

CLASSES = [Qwen2VLImageProcessor, Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_patched_processor_serializes_saves_and_reloads(cls, tmp_path):
    plain, patched = cls(), videocom_fast.patch_processor(cls())
    assert isinstance(patched, cls) and type(patched) is not cls and type(plain) is cls   # patching is per instance
    assert json.loads(patched.to_json_string()) == json.loads(plain.to_json_string())
    assert patched.to_dict() == plain.to_dict()
    patched.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path)
    assert type(reloaded) is cls and reloaded.to_dict() == plain.to_dict()
    twin = copy.deepcopy(patched)
    assert type(twin) is type(patched) and videocom_fast.patch_processor(twin) is twin
    assert type(videocom_fast.patch_processor(copy.deepcopy(patched))) is type(patched)   # idempotent
