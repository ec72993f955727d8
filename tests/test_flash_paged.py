"""The engine's flash-attn paged path, run through a fake `flash_attn` that checks its arguments as the real
extension does (tests/fake_flash_attn.py): flash-attn cannot be installed on this machine (FACTS.md).

What is checked: the fake refuses what flash_api.cpp refuses (so passing it means something); the metadata
the engine builds (int32 cu_seqlens, int32 block tables, 256-row pages, causal bottom-right) gives causal
attention over each sequence's rows; `attention="auto"` picks it when flash-attn is importable, with 256-row
blocks, and says so in stats and build_info; the engine's greedy tokens through it equal the naive loop
(fp16: the fake computes in float32 like the real kernel; in bf16 the packed and the naive forwards round
differently enough to flip near-ties of the tiny random model, measured; in fp16 an episode may part from
the naive loop only at a near-tie of the float64 model's logits, within 2x the fp16 logit error).
"""
from __future__ import annotations

import random

import pytest
import torch

import fake_flash_attn
from fake_flash_attn import FlashArgumentError
from helpers_rollout import assert_greedy_equal_up_to_near_tie, env_factory, rollout_samples, tiny_dir  # noqa: F401
from test_kv_cache import _reference     # causal attention with GQA in float64
from videocom_fast.rollout import attention as attn
from videocom_fast.rollout.attention import PagedBatch
from videocom_fast.rollout.kv_cache import PagedKVPool


@pytest.fixture
def fake(monkeypatch):
    with fake_flash_attn.installed(monkeypatch) as f:
        yield f


def _step(backend, dtype, Hq, Hkv, D, lens, starts, bs=256, seed=0):
    """One packed step the way the engine builds it (shuffled block tables, earlier rows already written),
    through `attend`; returns (out per sequence, float64 reference per sequence)."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    pool = PagedKVPool(1, sum(-(-n // bs) for n in lens) + 2, bs, Hkv, D, dtype=dtype, layout="standard")
    free = list(range(pool.num_blocks))
    rnd.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // bs))] for n in lens]
    qs = [torch.randn(Hq, n, D, dtype=torch.float64, generator=g) for n in lens]
    ks = [torch.randn(Hkv, n, D, dtype=torch.float64, generator=g) for n in lens]
    vs = [torch.randn(Hkv, n, D, dtype=torch.float64, generator=g) for n in lens]
    scale = D ** -0.5
    # the reference sees the same rounded inputs the kernel sees
    want = [_reference(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), scale)[s:]
            for q, k, v, s in zip(qs, ks, vs, starts)]
    for t, n, k, v in zip(tables, lens, ks, vs):
        pool.write(0, pool.slots(t, 0, n), k.transpose(0, 1).to(dtype), v.transpose(0, 1).to(dtype))
    q_LHD = torch.cat([q[:, s:].transpose(0, 1) for q, s in zip(qs, starts)]).to(dtype)
    q_lens = [n - s for n, s in zip(lens, starts)]
    q_starts = [sum(q_lens[:i]) for i in range(len(lens))]
    meta = PagedBatch(pool, q_starts, q_lens, list(lens), tables, backend=backend)
    out = attn.attend(q_LHD, 0, meta, scale)
    return [out[a:a + n].double() for a, n in zip(q_starts, q_lens)], want


_LENS = [300, 1, 40, 700, 513, 257]     # rows of each sequence after this step
_STARTS = [0, 0, 39, 450, 512, 100]     # rows before it: 39, 512 are decodes; 450, 100 later chunks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 64), (7, 1, 40), (28, 4, 128)])
def test_flash_paged_step_equals_causal_attention(fake, dtype, Hq, Hkv, D):
    """Decodes, first chunks and later chunks, sequences over 1, 2 and 3 pages, GQA 2/7/7: ONE flash call per
    layer, and its error against float64 within 2x the SDPA backend's error in the same dtype (+1 ulp)."""
    seed = random.randrange(2 ** 31)
    got, want = _step("flash", dtype, Hq, Hkv, D, _LENS, _STARTS, seed=seed)
    assert fake.calls == 1
    base, _ = _step("sdpa", dtype, Hq, Hkv, D, _LENS, _STARTS, seed=seed)
    ulp = torch.finfo(dtype).eps
    for i, (o, b, w) in enumerate(zip(got, base, want)):
        err, base_err = (o - w).abs().max().item(), (b - w).abs().max().item()
        assert err <= 2 * base_err + ulp, f"sequence {i}, seed {seed}: flash {err:.3g} vs sdpa {base_err:.3g}"


def _call(fake, **change):
    """A valid paged call (2 sequences, 256-row pages), with `change` applied to its arguments."""
    q = torch.randn(5, 4, 32, dtype=torch.float16)
    k = torch.randn(3, 256, 2, 32, dtype=torch.float16)
    args = dict(q=q, k=k, v=torch.randn_like(k), cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 10, 300], dtype=torch.int32), max_seqlen_q=4, max_seqlen_k=290,
                causal=True, block_table=torch.tensor([[2, 0], [0, 1]], dtype=torch.int32))
    args.update(change)
    return fake.flash_attn_varlen_func(**args)


@pytest.mark.parametrize("change,match", [
    (dict(k=torch.zeros(6, 128, 2, 32, dtype=torch.float16), v=torch.zeros(6, 128, 2, 32, dtype=torch.float16)),
     "divisible by 256"),
    (dict(block_table=torch.tensor([[2, 0], [0, 1]])), "block_table must have dtype torch.int32"),
    (dict(block_table=torch.tensor([[2, 0], [0, 1]], dtype=torch.int32).t()), "contiguous last dimension"),
    (dict(cu_seqlens_q=torch.tensor([0, 1, 5])), "cu_seqlens_q must have dtype int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 0, 10, 0, 300, 0], dtype=torch.int32)[::2]), "must be contiguous"),
    (dict(q=torch.randn(5, 4, 32)), "fp16 and bf16"),
    (dict(q=torch.randn(5, 32, 4, dtype=torch.float16).transpose(1, 2)), "contiguous last dimension"),
    (dict(q=torch.randn(5, 3, 32, dtype=torch.float16)), "must divide"),
    (dict(cu_seqlens_q=torch.tensor([0, 1, 4], dtype=torch.int32)), "packed length 5"),
    (dict(max_seqlen_k=256), "exceeds the max_seqlen"),
    (dict(block_table=torch.tensor([[2, 0], [0, 3]], dtype=torch.int32)), "out of"),
    (dict(block_table=torch.tensor([[2], [0]], dtype=torch.int32)), "the table holds 1"),
])
def test_fake_refuses_what_flash_attn_refuses(fake, change, match):
    """The fake is only worth its checks: each bad argument is refused with flash_api.cpp's message."""
    _call(fake)   # the valid call passes
    with pytest.raises(FlashArgumentError, match=match):
        _call(fake, **change)


# --- the engine ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model16(tiny_dir):
    from videocom_fast.models import load
    return load(tiny_dir, dtype=torch.float16)


def test_engine_auto_runs_flash_paged_and_equals_naive_loop(fake, model16, rollout_samples, tiny_dir):
    from bench.naive_rollout import naive_rollout
    from videocom_fast.rollout import RolloutEngine
    model, proc = model16
    samples = rollout_samples[:2]
    eng = RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=3, max_new_tokens=40)
    assert eng.attn_backend == "flash"
    trajs = eng.generate(samples, num_generations=2, greedy=True)
    st = eng.stats
    assert st["attention"] == "flash-paged" and st["block_size"] == attn.FLASH_BLOCK_SIZE
    # every layer of every step went through flash_attn_varlen_func (no SDPA fallback)
    assert fake.calls == st["steps"] * model.config.text_config.num_hidden_layers > 0
    make_env = env_factory()
    model64 = None
    for si, group in enumerate(trajs):
        nv = naive_rollout(model, proc, make_env(samples[si]).fork(), max_rounds=3, max_new_tokens=40, greedy=True)
        for t in group:
            if t.token_ids == nv.token_ids:
                assert t.round_texts == nv.round_texts
                continue
            if model64 is None:
                from videocom_fast.models import load
                model64 = load(tiny_dir, dtype=torch.float64)[0]
            assert_greedy_equal_up_to_near_tie(t, nv.token_ids, model, model64, eng.suppress_ids.cpu(),
                                               f"sample {si} rollout {t.rollout_index}")


def test_engine_flash_choice_and_refusals(fake, model16, tiny_dir, monkeypatch):
    """16-row blocks, fp32 or no flash_attn: "auto" falls back (and says so), "flash" refuses by reason."""
    from videocom_fast.models import load
    from videocom_fast.rollout import RolloutEngine
    model, proc = model16
    eng = RolloutEngine(model, proc, block_size=16)
    assert eng.attn_backend == "sdpa" and eng.sched_config.block_size == 16
    with pytest.raises(ValueError, match="block_size % 256"):
        RolloutEngine(model, proc, block_size=16, attention="flash")
    assert RolloutEngine(model, proc, block_size=512, attention="flash").sched_config.block_size == 512
    model32, proc32 = load(tiny_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="fp16/bf16"):
        RolloutEngine(model32, proc32, attention="flash")
    assert attn.auto_label("cpu", torch.float16) == "flash-paged"
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)    # import flash_attn -> ImportError
    with pytest.raises(ValueError, match="not importable"):
        RolloutEngine(model, proc, attention="flash")
    assert RolloutEngine(model, proc).sched_config.block_size == 16
    assert attn.auto_label("cpu", torch.float16) == "sdpa"


def test_build_info_names_the_attention_auto_runs(fake, monkeypatch):
    import videocom_fast
    from videocom_fast.rollout.attention import cpp_available
    assert videocom_fast.build_info()["attention"] == ("cpp" if cpp_available("cpu", torch.float32) else "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)    # a GPU machine: bf16 on CUDA
    assert videocom_fast.build_info()["attention"] == "flash-paged"
    monkeypatch.setitem(__import__("sys").modules, "flash_attn", None)
    assert videocom_fast.build_info()["attention"] == "triton-paged"   # torch ships triton
    from videocom_fast.kernels import paged_attention as K
    monkeypatch.setattr(K, "triton", None)
    assert videocom_fast.build_info()["attention"] == "sdpa"
