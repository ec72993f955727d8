"""The lean step's device traffic on the stand-in accelerator (videocom_fast/testing/standin.py, copied
unchanged from the `device` branch): the model on the `meta` device with CPU shadows, one packed step of
decodes and a prefill chunk with its metadata uploaded in ONE host-to-device copy, the fused forward (the
torch.library ops run on the shadows), the sampler on the device, and ONE download of ids + log-probs.
Asserted: zero syncs until that download, exactly one after; the values equal the same step on the CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_op_count import KernelOpCounter
from helpers_rollout import tiny_dir  # noqa: F401
from videocom_fast import modeling
from videocom_fast.models import load
from videocom_fast.rollout import attention as attn, packed_forward
from videocom_fast.rollout.kv_cache import PagedKVPool
from videocom_fast.rollout.sampling import SamplingParams, counter_uniforms, sample
from videocom_fast.testing.standin import StandIn

BS = 16


def _step(model, device, dev=None, backend="sdpa"):
    """One step: sequences 0-2 decode at context 20, 33, 7 (their earlier rows are whatever the pool holds),
    sequence 3 prefills 12 rows from 0. Returns (token ids, log-probs) as host lists."""
    tc = modeling.inner(model).language_model.config
    pool = PagedKVPool(tc.num_hidden_layers, 16, BS, tc.num_key_value_heads,
                       tc.hidden_size // tc.num_attention_heads, device=device, layout="standard")
    tables = [[0, 1], [2, 3, 4], [5], [6]]
    ctx, q_lens = [20, 33, 7, 12], [1, 1, 1, 12]
    q_starts = [0, 1, 2, 3]
    L, N = 15, 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, L)
    pos = np.concatenate([[19, 32, 6], np.arange(12)])
    slots = [tables[s][(ctx[s] - 1) // BS] * BS + (ctx[s] - 1) % BS for s in range(3)] + [6 * BS + i for i in range(12)]
    rows = [0, 1, 2, 14]
    u = counter_uniforms(np.arange(N, dtype=np.uint64) + 11, np.full(N, 5, dtype=np.uint64))
    meta = attn.PagedBatch(pool, q_starts, q_lens, ctx, tables, backend=backend)
    host = np.concatenate([ids, np.tile(pos, 3), slots, rows, u.view(np.int64),
                           np.zeros(meta.staged_size(), np.int64)])
    meta.stage(host[5 * L + 2 * N:])
    up = torch.from_numpy(host).to(device)                            # the step's one upload
    meta.bind(up[5 * L + 2 * N:])
    x = modeling.inner(model).get_input_embeddings()(up[:L])
    h = packed_forward.PackedForward(model)(x, up[L:4 * L].view(3, L), up[4 * L:5 * L], meta)
    logits = modeling.lm_head(model)(h.index_select(0, up[5 * L:5 * L + N])).float()
    before = None if dev is None else dev.num_syncs()
    tok, lp = sample(logits, SamplingParams(temperature=0.9, top_k=20),
                     uniforms=up[5 * L + N:5 * L + 2 * N].view(torch.float64))
    tok_f, lp_f = torch.stack((tok.to(torch.float64), lp.to(torch.float64))).cpu().tolist()   # the one download
    return [int(t) for t in tok_f], lp_f, before


def test_device_path_issues_at_most_12_kernels_per_layer(tiny_dir):
    """The path a GPU takes (torch.library ops, standard KV layout, attention counted as one op as flash-attn's
    paged kernel is), counted on the stand-in device."""
    model, _ = load(tiny_dir, dtype=torch.float32)
    with torch.no_grad(), StandIn() as dev:
        dmodel = dev.put(model)
        with KernelOpCounter(attention_as_one=True) as c:
            _step(dmodel, dev.device, dev)
    assert c.layer_calls == modeling.inner(model).language_model.config.num_hidden_layers
    assert c.per_layer <= 12, dict(c.layer_by_op)
    assert c.per_layer == 10, dict(c.layer_by_op)
    assert c.layer_by_op["add_rms_norm_"] == 2 * c.layer_calls and c.layer_by_op["kv_write_"] == c.layer_calls


def test_triton_attention_path_issues_10_kernels_per_layer(tiny_dir):
    """CUDA without flash-attn: the Triton paged kernel is ONE op (videocom::paged_attention_), counted as it
    is, with no exemption for attention."""
    model, _ = load(tiny_dir, dtype=torch.float32)
    with torch.no_grad(), StandIn() as dev:
        dmodel = dev.put(model)
        with KernelOpCounter() as c:
            _step(dmodel, dev.device, dev, backend="triton")
    assert c.layer_calls == modeling.inner(model).language_model.config.num_hidden_layers
    assert c.per_layer == 10, dict(c.layer_by_op)
    assert c.layer_by_op["paged_attention_"] == c.layer_calls


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_lean_step_syncs_once_on_the_standin_device(tiny_dir, backend):
    model, _ = load(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        want_tok, want_lp, _ = _step(model, "cpu", backend=backend)
        with StandIn() as dev:
            dmodel = dev.put(model)
            got_tok, got_lp, before = _step(dmodel, dev.device, dev, backend=backend)
            assert before == 0, dev.report()                 # nothing inside the forward read the device
            assert dev.num_syncs() == 1, dev.report()        # the download
            assert dev.num_syncs("d2h") == 1, dev.report()
    assert got_tok == want_tok
    np.testing.assert_allclose(got_lp, want_lp, rtol=0, atol=1e-5)
