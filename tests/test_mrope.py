"""M-RoPE: our original-rule positions against transformers' get_rope_index (text and images, where the
rules agree) and against an independent transcription of the original rule (videos, where 5.23 differs).
The incremental cursor must equal the full-sequence computation on random interleavings."""
import random

import pytest
import torch

from videocom_fast.mrope import (IMAGE, TEXT, VIDEO, MRopeCursor, install_original_rope_index, rope_index,
                                 sequence_positions)


def _random_sequence(rng, *, videos=True, n_items=None):
    """Token types plus grids for a random text/image/video interleaving (Qwen layout: start/end are text)."""
    types, imgs, vids, sgts = [], [], [], []
    for _ in range(n_items if n_items is not None else rng.randint(0, 5)):
        types += [TEXT] * rng.randint(1, 9)
        kind = rng.choice([IMAGE, VIDEO] if videos else [IMAGE])
        t = 1 if kind == IMAGE else rng.randint(1, 6)
        h, w = 2 * rng.randint(1, 5), 2 * rng.randint(1, 5)
        types += [kind] * (t * h * w // 4)
        if kind == IMAGE:
            imgs.append([t, h, w])
        else:
            vids.append([t, h, w])
            sgts.append(rng.choice([0.5, 1.0, 2.0, 2 / 3, 4.8, 0.25]))
    types += [TEXT] * rng.randint(1, 9)
    as_t = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return (torch.tensor(types, dtype=torch.int32), as_t(imgs), as_t(vids),
            torch.tensor(sgts, dtype=torch.float32) if sgts else None)


def _original_rule(types, imgs, vids, sgts, tps=2):
    """Independent transcription of transformers 4.51 Qwen2.5-VL get_rope_index (one sequence)."""
    types = types.tolist()
    out, st, i, ii, vi = [], 0, 0, 0, 0
    while i < len(types):
        if types[i] == TEXT:
            j = i
            while j < len(types) and types[j] == TEXT:
                j += 1
            out.append(torch.arange(j - i).view(1, -1).expand(3, -1) + st)
            st = int(out[-1].max()) + 1
            i = j
            continue
        if types[i] == IMAGE:
            t, h, w = imgs[ii].tolist()
            sgt, ii = 0, ii + 1
        else:
            t, h, w = vids[vi].tolist()
            sgt, vi = float(sgts[vi]), vi + 1
        h, w = h // 2, w // 2
        rng_t = torch.arange(t).view(-1, 1)
        expanded = rng_t.expand(-1, h * w)
        if types[i] == VIDEO:
            t_index = (expanded * torch.tensor(sgt) * tps).long().flatten()
        else:
            t_index = expanded.flatten()  # images: temporal interval 1
        h_index = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten()
        w_index = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten()
        out.append(torch.stack([t_index, h_index, w_index]) + st)
        st = int(out[-1].max()) + 1
        i += t * h * w
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("seed", range(40))
def test_sequence_positions_equal_original_rule(seed):
    rng = random.Random(seed)
    types, imgs, vids, sgts = _random_sequence(rng)
    ours = sequence_positions(types, imgs, vids, sgts)
    assert torch.equal(ours, _original_rule(types, imgs, vids, sgts))


def test_video_differs_from_transformers_523_rule():
    # temporal span 4 tokens with interval 4 reaches T = s + 12 > s + max(h, w); the rules must diverge.
    types = torch.tensor([TEXT] * 3 + [VIDEO] * (4 * 2 * 2) + [TEXT] * 2, dtype=torch.int32)
    pos = sequence_positions(types, None, torch.tensor([[4, 4, 4]]), torch.tensor([2.0]))
    assert pos[:, -2].tolist() == [3 + 12 + 1] * 3  # largest used (T=15) + 1


@pytest.mark.parametrize("seed", range(20))
def test_cursor_incremental_equals_full(seed):
    rng = random.Random(1000 + seed)
    types, imgs, vids, sgts = _random_sequence(rng, n_items=rng.randint(1, 6))
    full = sequence_positions(types, imgs, vids, sgts)
    cur, parts, ii, vi = MRopeCursor(), [], 0, 0
    runs, start = [], 0
    for k in range(1, len(types) + 1):
        if k == len(types) or types[k] != types[start]:
            runs.append((int(types[start]), start, k))
            start = k
    for kind, s, e in runs:
        if kind == TEXT:
            # split text runs at random points, as turns arrive in pieces
            cut = rng.randint(s, e)
            parts += [cur.text(cut - s), cur.text(e - cut)]
        elif kind == IMAGE:
            parts.append(cur.vision(imgs[ii], video=False)); ii += 1  # noqa: E702
        else:
            parts.append(cur.vision(vids[vi], video=True, second_per_grid_t=float(sgts[vi]))); vi += 1  # noqa: E702
    assert torch.equal(torch.cat(parts, dim=1), full)


def test_run_length_mismatch_is_a_clear_error():
    types = torch.tensor([TEXT, IMAGE, IMAGE, TEXT], dtype=torch.int32)
    with pytest.raises(ValueError, match="image run at token 1"):
        sequence_positions(types, torch.tensor([[1, 4, 4]]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from videocom_fast.models import build_tiny, load
    return load(build_tiny(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("seed", range(12))
def test_equal_to_transformers_get_rope_index_on_text_and_images(tiny, seed):
    model, _ = tiny
    rng = random.Random(seed)
    B = rng.randint(1, 3)
    seqs = [_random_sequence(rng, videos=False) for _ in range(B)]
    L = max(len(s[0]) for s in seqs)
    types = torch.zeros(B, L, dtype=torch.int32)
    mask = torch.zeros(B, L, dtype=torch.long)
    imgs = []
    for b, (t, g, _, _) in enumerate(seqs):
        types[b, L - len(t):] = t  # left padding, as generate uses
        mask[b, L - len(t):] = 1
        if g is not None:
            imgs.append(g)
    grids = torch.cat(imgs) if imgs else None
    ids = torch.zeros(B, L, dtype=torch.long)
    theirs, d_theirs = model.model.get_rope_index(ids, types, grids, None, None, mask)
    ours, d_ours = rope_index(ids, types, grids, None, None, mask)
    keep = mask.bool()
    assert torch.equal(ours[:, keep], theirs[:, keep])
    assert torch.equal(d_ours.view(-1), d_theirs.view(-1))


def test_install_original_rope_index_changes_video_positions_only(tiny):
    model, _ = tiny
    types = torch.tensor([[TEXT] * 3 + [VIDEO] * 16 + [TEXT] * 2], dtype=torch.int32)
    ids = torch.zeros_like(types, dtype=torch.long)
    grid, sgt = torch.tensor([[4, 4, 4]]), torch.tensor([2.0])
    before, _ = model.model.get_rope_index(ids, types, None, grid, sgt)
    install_original_rope_index(model)
    after, _ = model.model.get_rope_index(ids, types, None, grid, sgt)
    assert not torch.equal(before, after)
    assert torch.equal(after[:, 0], sequence_positions(types[0], None, grid, sgt))
