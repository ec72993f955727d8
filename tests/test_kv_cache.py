"""Paged KV pool and paged attention against plain causal attention over each whole sequence (float64).

Every case builds a step the way the engine does: some sequences decode one token, others prefill a chunk on
top of rows written by earlier steps, all packed into ONE query; the pool's block tables are shuffled (and
shared between sequences where a test says so); the answer is naive causal attention over each sequence's
whole K/V in float64. Inputs are fresh random numbers each run (the seed is in the failure message).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from videocom_fast.rollout import attention as attn
from videocom_fast.rollout.attention import PagedBatch, cpp_available, paged_attention
from videocom_fast.rollout.kv_cache import PagedKVPool, StepCache

HAS_CPP = cpp_available("cpu", torch.float32)
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="videocom_fast._C not built")


class _Layer(torch.nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.layer_idx = idx


def _reference(q_HLD, k_HLD, v_HLD, scale):
    """Naive causal attention with GQA in float64: (L, Hq, D)."""
    rep = q_HLD.shape[0] // k_HLD.shape[0]
    k, v = k_HLD.repeat_interleave(rep, 0), v_HLD.repeat_interleave(rep, 0)
    s = (q_HLD @ k.transpose(1, 2)) * scale
    L = s.shape[-1]
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(0, 1)


def _seed() -> int:
    seed = random.randrange(2 ** 31)
    torch.manual_seed(seed)
    return seed


# --- the pool ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["k_transposed", "standard"])
def test_pool_write_gather_roundtrip_and_copy_rows(layout):
    if layout == "k_transposed" and not HAS_CPP:
        pytest.skip("videocom_fast._C not built")
    seed = _seed()
    pool = PagedKVPool(2, 13, 5, 3, 4, dtype=torch.float64, layout=layout)
    assert pool.layout == layout and pool.k[1].shape == (13, 5, 3, 4)
    if layout == "k_transposed":   # storage really is (NB, Hkv, D, BS): the kernel reads it that way
        assert pool.k[1].permute(0, 2, 3, 1).is_contiguous() and not pool.k[1].is_contiguous()
    table = random.sample(range(13), 4)
    k, v = torch.randn(17, 3, 4, dtype=torch.float64), torch.randn(17, 3, 4).double()
    # a strided key (as StepCache passes it: (L, Hkv, D) view of (Hkv, L, D)) and a float32 value (converted)
    pool.write(1, pool.slots(table, 0, 17), k.transpose(0, 1).contiguous().transpose(0, 1), v.float())
    gk, gv = pool.gather(1, table, 17)
    assert torch.equal(gk, k) and torch.equal(gv, v), f"seed {seed}"
    assert torch.equal(pool.k[1][table[2], 3], k[13])      # row 13 = block 2, row 3
    assert pool.k[0].abs().sum() == 0 and pool.v[0].abs().sum() == 0   # other layers untouched
    free = [b for b in range(13) if b not in table][0]
    pool.copy_rows(table[3], free, 2)   # rows 15, 16 live in block 3
    assert torch.equal(pool.k[1][free, :2], k[15:17]) and torch.equal(pool.v[0][free, :2], pool.v[0][table[3], :2])
    with pytest.raises(ValueError, match="rows"):
        pool.copy_rows(0, 1, 6)
    with pytest.raises(ValueError, match="slots"):
        pool.slots(table, 0, 21)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedKVPool(1, 0, 4, 1, 1, layout=layout)


@needs_cpp
def test_pool_layout_choice_and_rejections():
    assert PagedKVPool(1, 2, 4, 1, 8).layout == "k_transposed"                       # CPU float32: the kernel's
    assert PagedKVPool(1, 2, 4, 1, 8, dtype=torch.bfloat16).layout == "standard"     # SDPA reads bf16
    with pytest.raises(ValueError, match="layout must be"):
        PagedKVPool(1, 2, 4, 1, 8, layout="transposed")
    with pytest.raises(ValueError, match="k_transposed"):
        PagedKVPool(1, 2, 4, 1, 8, dtype=torch.float16, layout="k_transposed")
    pool = PagedKVPool(1, 3, 4, 2, 8)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"slots: index 2 \(slot 12\)"):
        pool.write(0, torch.tensor([0, 5, 12]), x, x)
    with pytest.raises(ValueError, match=r"k: expected \(len\(slots\), Hkv, D\)"):
        pool.write(0, torch.tensor([0, 5]), x, x[:2])


# --- attention against the naive loop -------------------------------------------------------------------


def _run_step(bs, Hq, Hkv, D, dtype, backend, lens, starts, *, layout="auto", shared=None, nb_pool=None):
    """Sequences of `lens` rows, of which rows [0, start) were written by earlier steps; this step packs rows
    [start, len) of every sequence into one query. `shared` = (i, j, rows): sequence j's first `rows` rows
    (whole blocks) are sequence i's blocks (prefix sharing: same K/V, one copy in the pool)."""
    seed = _seed()
    scale = D ** -0.5
    nb = [-(-n // bs) for n in lens]
    pool = PagedKVPool(1, nb_pool or sum(nb) + 3, bs, Hkv, D, dtype=dtype, layout=layout)
    free = list(range(pool.num_blocks))
    random.shuffle(free)
    tables, q_all, k_all, v_all = [], [], [], []
    for n in lens:
        tables.append([free.pop() for _ in range(-(-n // bs))])
        q_all.append(torch.randn(Hq, n, D, dtype=torch.float64))
        k_all.append(torch.randn(Hkv, n, D, dtype=torch.float64))
        v_all.append(torch.randn(Hkv, n, D, dtype=torch.float64))
    if shared:
        i, j, rows = shared
        assert rows % bs == 0 and rows <= min(starts[i], starts[j])
        tables[j][:rows // bs] = tables[i][:rows // bs]
        k_all[j][:, :rows], v_all[j][:, :rows] = k_all[i][:, :rows], v_all[i][:, :rows]
    want_all = [_reference(q, k, v, scale) for q, k, v in zip(q_all, k_all, v_all)]
    q_all, k_all, v_all = ([t.to(dtype) for t in ts] for ts in (q_all, k_all, v_all))
    for t, s, k, v in zip(tables, starts, k_all, v_all):   # earlier steps: rows [0, start)
        if s:
            pool.write(0, pool.slots(t, 0, s), k[:, :s].transpose(0, 1), v[:, :s].transpose(0, 1))
    q = torch.cat([q[:, s:] for q, s in zip(q_all, starts)], dim=1)[None]
    k = torch.cat([k[:, s:] for k, s in zip(k_all, starts)], dim=1)[None]
    v = torch.cat([v[:, s:] for v, s in zip(v_all, starts)], dim=1)[None]
    slots = torch.cat([pool.slots(t, s, n) for t, s, n in zip(tables, starts, lens)])
    StepCache(pool, slots).update(k, v, 0)
    q_lens = [n - s for n, s in zip(lens, starts)]
    q_starts = [sum(q_lens[:i]) for i in range(len(lens))]
    meta = PagedBatch(pool, q_starts, q_lens, lens, tables, backend=backend)
    out, _ = paged_attention(_Layer(0), q, k, v, None, scaling=scale, paged=meta)
    assert out.shape == (1, sum(q_lens), Hq, D) and out.dtype == dtype
    # fp32: the kernel accumulates in fp32 over up to ~1000 keys with its own exp (~1 ulp)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for i in range(len(lens)):
        got = out[0, q_starts[i]:q_starts[i] + q_lens[i]].double()
        torch.testing.assert_close(got, want_all[i][starts[i]:], rtol=tol, atol=tol,
                                   msg=lambda m: f"sequence {i}, seed {seed}: {m}")
    return meta


_CASES = [(4, 4, 2, 8), (16, 2, 2, 32), (3, 6, 1, 24), (5, 4, 1, 64), (16, 28, 4, 128), (16, 6, 2, 40),
          (16, 3, 3, 64), (7, 7, 1, 33)]
_LENS = [23, 1, 17, 40, 9, 30, 70]      # total rows of each sequence
_STARTS = [0, 0, 11, 39, 8, 18, 69]     # rows already in the KV before this step (39, 8, 69: decodes)


@pytest.mark.parametrize("backend", ["sdpa", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bs,Hq,Hkv,D", _CASES)
def test_paged_attention_equals_causal_attention(bs, Hq, Hkv, D, dtype, backend):
    """Several sequences, each at a different stage (prefill from 0, a later chunk, a decode), one call.
    Block sizes 16 (the kernel's compile-time fast path) and odd ones; head dims 32/64/128 (compile-time)
    and odd ones; GQA ratios 1, 2, 3, 4, 7."""
    if backend == "cpp" and not HAS_CPP:
        pytest.skip("videocom_fast._C not built")
    meta = _run_step(bs, Hq, Hkv, D, dtype, backend, _LENS, _STARTS)
    if backend == "cpp":   # every chunk, whatever its length, runs the kernel
        assert meta.cpp_chunks == list(range(len(_LENS))) and not meta.prefill_chunks


@needs_cpp
@pytest.mark.parametrize("layout", ["k_transposed", "standard"])
def test_sdpa_backend_reads_both_layouts(layout):
    _run_step(16, 4, 2, 32, torch.float32, "sdpa", _LENS, _STARTS, layout=layout)


@needs_cpp
def test_cpp_and_sdpa_routes_meet_in_one_output(monkeypatch):
    """With the routing limit lowered, short chunks run the kernel and long ones SDPA in the same call."""
    monkeypatch.setattr(attn, "CPP_MAX_QUERY_ROWS", 8)
    meta = _run_step(16, 4, 2, 32, torch.float64, "cpp", _LENS, _STARTS)
    assert sorted(meta.q_lens[i] for i in meta.cpp_chunks) == [1, 1, 1, 1, 6]
    assert sorted(meta.q_lens[i] for i in meta.prefill_chunks) == [12, 23]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 32), (7, 1, 24)])
def test_long_prefill_chunks_with_decodes(Hq, Hkv, D, dtype):
    """A 300-row chunk over 1000 keys (19 row tiles, 4 softmax segments), a 300-row prompt from row 0, a
    chunk of 17 rows (one full tile + 1 row), and decodes of other sequences, in one call."""
    lens = [1000, 300, 517, 601, 1, 250, 33]
    starts = [700, 0, 500, 600, 0, 249, 32]
    _run_step(16, Hq, Hkv, D, dtype, "cpp", lens, starts)


@needs_cpp
@pytest.mark.parametrize("bs", [16, 5])
def test_blocks_shared_between_sequences(bs):
    """Prefix sharing: sequences 0 and 1 (and 0 and 2) read the same prompt blocks, then their own."""
    lens = [20 * bs + 3, 20 * bs + 9, 12 * bs + 1]
    starts = [20 * bs + 2, 12 * bs, 10 * bs]      # a decode, a 9 * bs-row chunk and a 2 * bs + 1-row chunk
    _run_step(bs, 4, 2, 32, torch.float64, "cpp", lens, starts, shared=(0, 1, 12 * bs))
    _run_step(bs, 4, 2, 32, torch.float32, "cpp", lens, starts, shared=(0, 2, 10 * bs))


# --- the binding's checks --------------------------------------------------------------------------------


def _cpp_args(L=3, Hq=4, Hkv=2, D=8, NB=6, BS=4):
    q = np.random.default_rng().standard_normal((L, Hq, D)).astype(np.float32)
    k_store = np.zeros((NB, Hkv, D, BS), np.float32)          # K transposed within blocks
    i64 = lambda *x: np.array(x, dtype=np.int64)  # noqa: E731
    return dict(q=q, k_pool=k_store.transpose(0, 3, 1, 2), v_pool=np.zeros((NB, BS, Hkv, D), np.float32),
                out=np.full_like(q, np.nan), q_start=i64(0, 1), q_len=i64(1, 2), ctx_len=i64(5, 7),
                table_off=i64(0, 2), tables=np.array([0, 1, 2, 3], dtype=np.int32), scale=0.5)


@pytest.mark.parametrize("change,match", [
    (dict(tables=[0, 1, 2, 9]), "chunk 1: block id outside the pool"),
    (dict(q_len=[1, 8]), "chunk 1: need 1 <= q_len <= ctx_len"),
    (dict(q_len=[0, 2]), "chunk 0: need 1 <= q_len"),
    (dict(q_start=[0, 2]), "chunk 1: query rows outside q"),
    (dict(ctx_len=[5, 13]), "chunk 1: block table outside tables"),
    (dict(out="f64"), "out: wrong dtype"),
    (dict(k_pool="f64", v_pool="f64"), "k_pool: wrong dtype"),
    (dict(k_pool="f64"), "k_pool/v_pool: dtypes differ"),
    (dict(q_start="i32"), "q_start: wrong dtype"),
    (dict(table_off=[0]), "lengths differ"),
    (dict(q="2d"), "q: expected"),
    (dict(v_pool="short"), "shapes differ"),
    (dict(v_pool="strided"), "v_pool: must be contiguous"),
    (dict(k_pool="standard"), "k_pool: expected K transposed within blocks"),
    (dict(k_pool="strided"), "k_pool: expected K transposed within blocks"),
    (dict(out="short"), "out: shape must equal q's"),
    (dict(q="3heads", out="3heads"), "multiple of kv heads"),
    (dict(q="strided_d"), "head dim must be contiguous"),
])
def test_cpp_paged_attention_rejects_bad_buffers(change, match):
    """Every bad buffer is a ValueError naming it (never a read outside the pool, never a misread layout)."""
    _C = pytest.importorskip("videocom_fast._C")
    a = _cpp_args()
    for name, v in change.items():
        if v == "f64":
            a[name] = a[name].astype(np.float64)   # (astype keeps k_pool's transposed strides)
        elif v == "i32":
            a[name] = a[name].astype(np.int32)
        elif v == "2d":
            a[name] = a[name][0]
        elif v == "short":
            a[name] = a[name][:-1]
        elif v == "strided":
            a[name] = np.repeat(a[name], 2, axis=0)[::2]
        elif v == "standard":   # the same shape, stored (NB, BS, Hkv, D): would be misread as transposed
            a[name] = np.ascontiguousarray(a[name])
        elif v == "3heads":
            a[name] = np.ascontiguousarray(a[name][:, :3])
        elif v == "strided_d":
            a[name] = np.repeat(a[name], 2, axis=2)[:, :, ::2]
        else:
            a[name] = np.array(v, dtype=a[name].dtype)
    with pytest.raises(ValueError, match=match):
        _C.paged_attention(**a)
    a = _cpp_args()
    _C.paged_attention(**a)                   # the unchanged arguments are valid, every row written
    assert np.isfinite(a["out"]).all()


@needs_cpp
def test_cpp_paged_kv_write_rejects_bad_buffers():
    from videocom_fast import _C
    a = _cpp_args()
    kp, vp = a["k_pool"], a["v_pool"]
    x = np.ones((2, 2, 8), np.float32)
    slots = np.array([0, 23], dtype=np.int64)
    with pytest.raises(ValueError, match=r"slots: index 1 \(slot 24\)"):
        _C.paged_kv_write(kp, vp, np.array([0, 24], dtype=np.int64), x, x)
    with pytest.raises(ValueError, match="slots: wrong dtype"):
        _C.paged_kv_write(kp, vp, slots.astype(np.int32), x, x)
    with pytest.raises(ValueError, match="v: wrong dtype"):
        _C.paged_kv_write(kp, vp, slots, x, x.astype(np.float64))
    with pytest.raises(ValueError, match="k: the head dim must be contiguous"):
        _C.paged_kv_write(kp, vp, slots, np.repeat(x, 2, axis=2)[:, :, ::2], x)
    with pytest.raises(ValueError, match="k_pool: expected K transposed"):
        _C.paged_kv_write(np.ascontiguousarray(kp), vp, slots, x, x)
    _C.paged_kv_write(kp, vp, slots, x, 2 * x)
    assert kp[5, 3].sum() == 16 and vp[5, 3].sum() == 32 and kp.sum() == 32   # slot 23 = block 5, row 3


def test_without_metadata_falls_back_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    layer = _Layer(0)
    layer.is_causal = True
    layer.num_key_value_groups = 2
    got, _ = paged_attention(layer, q, k, v, None, scaling=0.3)
    want, _ = sdpa_attention_forward(layer, q, k, v, None, scaling=0.3)
    torch.testing.assert_close(got, want)


# --- the engine's pool: sized when generate starts, gone when it returns ----------------------------------


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    from helpers_rollout import make_data, make_tiny
    from videocom_fast.models import load
    model, proc = load(make_tiny(tmp_path_factory.mktemp("kv_tiny")), dtype=torch.float32)
    return model, proc, make_data(tmp_path_factory.mktemp("kv_data"), num_samples=2)


def _engine(tiny32, **kw):
    from helpers_rollout import env_factory
    from videocom_fast.rollout import RolloutEngine
    model, proc, _ = tiny32
    return RolloutEngine(model, proc, env_factory=env_factory(), max_rounds=1, max_new_tokens=2, **kw)


def _generate_watching_pool(eng, samples, monkeypatch):
    """generate(), returning a weak reference to the pool the engine held while it ran."""
    import weakref
    seen = []
    step = type(eng)._step

    def watching(self, out):
        seen.append(weakref.ref(self.pool))
        return step(self, out)

    monkeypatch.setattr(type(eng), "_step", watching)
    eng.generate(samples[:1], num_generations=2, greedy=True)
    monkeypatch.setattr(type(eng), "_step", step)
    assert seen and all(r() is seen[0]() for r in seen)   # one pool for the whole call
    return seen[0]


def test_engine_holds_no_kv_pool_after_generate(tiny32, monkeypatch):
    """Between rollouts (the training step's forward, backward, optimizer) the engine holds no KV memory:
    the pool is freed when generate returns, also when it fails; keep_kv_pool=True keeps and reuses it."""
    import gc
    samples = tiny32[2]
    eng = _engine(tiny32, kv_budget_tokens=16 * 40)
    assert eng.pool is None                                  # nothing allocated at construction
    ref = _generate_watching_pool(eng, samples, monkeypatch)
    gc.collect()
    assert eng.pool is None and ref() is None
    monkeypatch.setattr(type(eng), "_run", lambda self, s: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate(samples[:1], num_generations=2)
    assert eng.pool is None
    monkeypatch.undo()
    keep = _engine(tiny32, kv_budget_tokens=16 * 40, keep_kv_pool=True)
    first = _generate_watching_pool(keep, samples, monkeypatch)
    assert keep.pool is first() and keep.pool.num_blocks == 40
    assert _generate_watching_pool(keep, samples, monkeypatch)() is first()   # reused, not reallocated
    keep.release_kv_pool()
    gc.collect()
    assert first() is None


def test_kv_pool_follows_the_budget_read_at_generate_time(tiny32, monkeypatch):
    """VIDEOCOM_KV_CACHE_MB is read when generate starts, not when the engine is built; kv_budget_tokens is
    exact in blocks; a bad value is refused by name at generate time."""
    samples = tiny32[2]
    monkeypatch.setenv("VIDEOCOM_KV_CACHE_MB", "64")
    eng = _engine(tiny32)
    cfg = tiny32[0].config.text_config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    for mb in (3, 1.5):
        monkeypatch.setenv("VIDEOCOM_KV_CACHE_MB", str(mb))
        eng.generate(samples[:1], num_generations=2, greedy=True)
        want = int(mb * 2**20) // per_token
        assert eng.stats["kv_pool_blocks"] == -(-want // 16)
        assert abs(eng.stats["kv_pool_bytes"] - mb * 2**20) <= 16 * per_token
        assert eng.stats["scheduler"]["num_free_blocks"] == eng.stats["kv_pool_blocks"]
    monkeypatch.delenv("VIDEOCOM_KV_CACHE_MB")
    eng.generate(samples[:1], num_generations=2, greedy=True)
    assert abs(eng.stats["kv_pool_bytes"] - 256 * 2**20) <= 16 * per_token     # the CPU default
    monkeypatch.setenv("VIDEOCOM_KV_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="VIDEOCOM_KV_CACHE_MB"):
        eng.generate(samples[:1], num_generations=2)
    eng = _engine(tiny32, kv_budget_tokens=16 * 7 + 1)
    eng.generate(samples[:1], num_generations=2, greedy=True)
    assert eng.stats["kv_pool_blocks"] == 8 and eng.stats["attention"] == "cpp" * HAS_CPP + "sdpa" * (not HAS_CPP)
    with pytest.raises(ValueError, match="kv_budget_tokens"):
        _engine(tiny32, kv_budget_tokens=15)


def test_paged_batch_takes_lists_or_csr_and_names_a_wrong_call():
    """Block tables as lists become the same CSR arrays the engine passes; both or neither is refused."""
    pool = PagedKVPool(1, 8, 4, 1, 8)
    tables = [[3, 1, 7], [6], [5, 0, 2]]
    meta = PagedBatch(pool, [0, 1, 2], [1, 1, 5], [5, 1, 9], tables, backend="cpp")
    off, ids = meta.csr
    assert off.tolist() == [0, 3, 4, 7] and ids.tolist() == [3, 1, 7, 6, 5, 0, 2]
    assert [meta.table(i).tolist() for i in range(3)] == tables
    same = PagedBatch(pool, [0, 1, 2], [1, 1, 5], [5, 1, 9], backend="cpp", csr=(off, ids))
    assert all(np.array_equal(a, b) for a, b in zip(meta.cpp_meta(), same.cpp_meta()))
    assert same.cpp_meta()[4].tolist() == [3, 1, 6, 5, 0, 2]   # the first ceil(ctx / 4) ids of each table
    for bad in (dict(block_tables=tables, csr=(off, ids)), dict()):
        with pytest.raises(ValueError, match="block_tables or as csr"):
            PagedBatch(pool, [0, 1, 2], [1, 1, 5], [5, 1, 9], backend="cpp", **bad)
