"""Packing: pack boundaries, block-diagonal causal attention and its varlen metadata, and the packed loss
against the model's own unpacked forward (transformers' Qwen2.5-VL forward is the oracle)."""
import random

import pytest
import torch

from fixtures_sft import synth_small, tiny_dir  # noqa: F401
from videocom_fast.training.packing import (block_causal_mask, collate, install_packed_attention,
                                            pack_indices, packed_attention, packed_loss_sum)
from videocom_fast.training.sft_data import IGNORE_INDEX, SFTDataset


def test_pack_indices_budget_and_order():
    rng = random.Random()
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 120)
        packs = pack_indices(lengths, budget)
        assert [i for p in packs for i in p] == list(range(len(lengths)))  # every example once, in order
        for p in packs:
            assert sum(lengths[i] for i in p) <= budget or len(p) == 1    # oversize examples stand alone
        for a, b in zip(packs, packs[1:]):   # greedy: the next example did not fit
            assert sum(lengths[i] for i in a) + lengths[b[0]] > budget
    with pytest.raises(ValueError, match="max_tokens"):
        pack_indices([3], 0)


@pytest.mark.parametrize("lens,hq,hkv", [([5, 1, 9], 4, 2), ([17], 2, 2), ([3, 3, 3, 7, 1], 6, 3)])
def test_packed_attention_is_block_causal(lens, hq, hkv):
    L, D = sum(lens), 8
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, hq, L, D, dtype=torch.float64)
    k, v = torch.randn(1, hkv, L, D, dtype=torch.float64), torch.randn(1, hkv, L, D, dtype=torch.float64)
    out, _ = packed_attention(None, q, k, v, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                              max_length_q=max(lens), max_length_k=max(lens))
    # oracle: plain softmax attention with the explicit block-diagonal causal mask
    mask = block_causal_mask(cu, L)
    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    s = (q @ kk.transpose(-1, -2)) * 0.3
    ref = s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-10, atol=1e-10)
    # the mask itself: no attention across examples, causal within
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    i, j = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    assert torch.equal(mask, (seg[i] == seg[j]) & (j <= i))


def test_packed_attention_kv_decode_alignment():
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 7, 4, dtype=torch.float64), torch.randn(1, 2, 7, 4, dtype=torch.float64)
    out, _ = packed_attention(None, q, k, v, scaling=0.5)
    mask = torch.ones(3, 7, dtype=torch.bool).tril(4)  # query i sees keys 0..4+i
    ref = ((q @ k.transpose(-1, -2)) * 0.5).masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref.transpose(1, 2))


@pytest.fixture(scope="module")
def examples(synth_small, tiny_dir):  # noqa: F811
    from videocom_fast.models import load
    import json

    data, mc = synth_small
    _, processor = load(tiny_dir)
    samples = json.loads((data / "sft.json").read_text())
    ds = SFTDataset(samples, processor.tokenizer, mc, media_root=data)
    return [ds[i] for i in range(len(ds))]


def test_collate_metadata(examples):
    b = collate(examples[:3])
    lens = [e.num_tokens for e in examples[:3]]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert b.max_seqlen == max(lens)
    # positions restart per example; each example's last token has no target (no cross-example target)
    for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):
        assert int(b.position_ids[:, 0, s].max()) == 0
        assert b.targets[e - 1] == IGNORE_INDEX
    assert b.num_trained == sum(e.num_trained for e in examples[:3])


def _hf_loss_sum(model, ex):
    """Sum of -log p over the trained tokens from the model's own forward (the oracle)."""
    from videocom_fast.mrope import install_original_rope_index, mm_token_type_ids

    install_original_rope_index(model)
    ids = ex.input_ids[None]
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
              mm_token_type_ids=mm_token_type_ids(ids, model.config.image_token_id, model.config.video_token_id))
    if ex.pixel_values is not None:
        kw.update(pixel_values=ex.pixel_values.double(), image_grid_thw=ex.image_grid_thw)
    if ex.pixel_values_videos is not None:
        kw.update(pixel_values_videos=ex.pixel_values_videos.double(), video_grid_thw=ex.video_grid_thw,
                  second_per_grid_ts=ex.second_per_grid_ts)
    logits = model(**kw).logits[0].double()
    tgt = ex.labels[1:]
    keep = tgt != IGNORE_INDEX
    return -logits[:-1][keep].log_softmax(-1).gather(-1, tgt[keep, None]).sum()


@pytest.mark.slow
def test_packed_loss_equals_unpacked_model_forward(examples, tiny_dir):  # noqa: F811
    from videocom_fast.models import load

    oracle, _ = load(tiny_dir, dtype=torch.float64)
    packed, _ = load(tiny_dir, dtype=torch.float64)
    install_packed_attention(packed)
    exs = examples[:4]
    want = sum(_hf_loss_sum(oracle, e) for e in exs)
    b = collate(exs)
    b.pixel_values, b.pixel_values_videos = b.pixel_values.double(), b.pixel_values_videos.double()
    got = packed_loss_sum(packed, b)
    # chunked_token_logprobs upcasts logits with .float(): fp32 log-softmax even for a float64 model, so the
    # tolerance is fp32's (relative 1e-6 of a sum of ~500 terms)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-4)
    # the gradient of the packed sum equals the sum of per-example gradients
    got.backward()
    g_packed = {n: p.grad.clone() for n, p in packed.named_parameters() if p.grad is not None}
    packed.zero_grad()
    for e in exs:
        one = collate([e])
        one.pixel_values, one.pixel_values_videos = one.pixel_values.double(), one.pixel_values_videos.double()
        packed_loss_sum(packed, one).backward()
    assert g_packed
    for n, p in packed.named_parameters():
        if n in g_packed:
            torch.testing.assert_close(g_packed[n], p.grad, rtol=1e-8, atol=1e-10)
