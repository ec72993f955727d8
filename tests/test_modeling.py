"""Driving the model piecewise (vision tower, scatter, language model with explicit positions) equals the
model's own forward, and chunked fp32 log-probs equal a full log-softmax."""
import pytest
import torch

from videocom_fast import modeling
from videocom_fast.chat import ChatTokens
from videocom_fast.mrope import install_original_rope_index, mm_token_type_ids, sequence_positions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from videocom_fast.models import build_tiny, load
    model, proc = load(build_tiny(tmp_path_factory.mktemp("tiny")), dtype=torch.float64)
    install_original_rope_index(model)
    return model, proc


def test_piecewise_forward_equals_model_forward(tiny):
    model, proc = tiny
    torch.manual_seed(0)
    chat = ChatTokens(proc.tokenizer)
    vid = proc.video_processor(videos=[torch.randint(0, 256, (4, 3, 56, 84), dtype=torch.uint8)],
                               min_pixels=28 * 28, max_pixels=56 * 84, return_tensors="pt",
                               do_sample_frames=False)
    img = proc.image_processor(images=[torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8)],
                               min_pixels=28 * 28, max_pixels=56 * 84, return_tensors="pt")
    nv = int(vid["video_grid_thw"][0].prod()) // 4
    ni = int(img["image_grid_thw"][0].prod()) // 4
    ids = chat.prompt("What is shown?", [("video", nv)]) + chat.assistant("FIND_FRAME(x) = [3]")
    ids += chat.user("Continue solving the question with the selected frame.", [("image", ni)])
    ids_L = torch.tensor(ids)
    types = mm_token_type_ids(ids_L, chat.image_pad, chat.video_pad)
    sgt = torch.tensor([0.5], dtype=torch.float64)
    pos = sequence_positions(types, img["image_grid_thw"], vid["video_grid_thw"], sgt)

    ref = model(input_ids=ids_L[None], mm_token_type_ids=types[None],
                pixel_values=img["pixel_values"].double(), image_grid_thw=img["image_grid_thw"],
                pixel_values_videos=vid["pixel_values_videos"].double(), video_grid_thw=vid["video_grid_thw"],
                second_per_grid_ts=sgt).logits[0]

    feats_v = modeling.vision_embeds(model, vid["pixel_values_videos"].double(), vid["video_grid_thw"], video=True)
    feats_i = modeling.vision_embeds(model, img["pixel_values"].double(), img["image_grid_thw"], video=False)
    x = modeling.embed(model, ids_L, feats_v + feats_i)  # sequence order: video block, then image block
    h = modeling.text_forward(model, x[None], pos[:, None, :])[0]
    ours = modeling.lm_head(model)(h)
    assert torch.allclose(ours, ref, atol=1e-10, rtol=0)

    lp = modeling.chunked_token_logprobs(model, h[:-1], ids_L[1:], temperature=0.7, chunk=5)
    full = torch.log_softmax(ref[:-1] / 0.7, -1).gather(-1, ids_L[1:, None]).squeeze(-1)
    assert lp.dtype == torch.float64  # never downcast below the model's precision
    assert torch.allclose(lp, full, atol=1e-10)


def test_embed_rejects_wrong_feature_count(tiny):
    model, proc = tiny
    chat = ChatTokens(proc.tokenizer)
    ids = torch.tensor(chat.user("x", [("image", 4)]))
    with pytest.raises(ValueError, match="4 media pad tokens but 3"):
        modeling.embed(model, ids, [torch.zeros(3, 128, dtype=torch.float64)])


@pytest.mark.parametrize("video", [True, False])
def test_patch_embed_as_matmul_equals_the_conv3d(tiny, video):
    """The engine's patch embedding (one matmul) gives the stock Conv3d's vision features: fp64 to 1e-12,
    on random pixels of odd grids; the module is restored afterwards."""
    model, _ = tiny
    grids = torch.tensor([[2, 6, 10], [4, 2, 14]] if video else [[1, 6, 10], [1, 14, 2]])
    pv = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, dtype=torch.float64)
    pe = modeling.inner(model).visual.patch_embed
    with torch.no_grad():
        want = modeling.vision_embeds(model, pv, grids, video=video)
        got = modeling.vision_embeds(model, pv, grids, video=video, patch_matmul=True)
        with modeling.patch_embed_as_matmul(model):
            assert "forward" in vars(pe)
            direct = pe(pv)
        assert "forward" not in vars(pe)
        ref = pe(pv)
    torch.testing.assert_close(direct, ref, rtol=0, atol=1e-12)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
