"""The stand-in accelerator itself (videocom_fast/testing/standin.py): values equal plain CPU execution (an
MLP + AdamW step, the tiny Qwen2.5-VL forward with an image), a host tensor meeting a device tensor raises
as on CUDA, every kind of host read is counted with its code line, and views / in-place / out= / Parameter
aliasing holds."""
import copy

import pytest
import torch

from videocom_fast.testing.standin import StandIn, StandInError


def _mlp_steps(model, x, y, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.detach()


def test_mlp_adamw_equals_cpu():
    torch.manual_seed(torch.seed() % 1000)
    ref = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.GELU(), torch.nn.Linear(13, 3))
    x, y = torch.randn(5, 7), torch.randn(5, 3)
    model = copy.deepcopy(ref)
    want = _mlp_steps(ref, x, y)
    with StandIn() as dev:
        model = dev.put(model)
        assert all(p.device.type == "meta" for p in model.parameters())
        got = _mlp_steps(model, *dev.put((x, y)))
        assert got.device.type == "meta" and dev.num_syncs() == 0, dev.report()
    assert torch.equal(dev.value(got), want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(dev.value(p), q.detach()), name


def test_tiny_qwen_forward_equals_cpu(tmp_path):
    from videocom_fast.models import build_tiny, load
    model, proc = load(build_tiny(tmp_path))
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    img = proc.image_processor(images=[torch.randint(0, 256, (3, 57, 85), dtype=torch.uint8, generator=g)],
                               min_pixels=28 * 28, max_pixels=56 * 84, return_tensors="pt")
    n_img = int(img["image_grid_thw"].prod()) // 4
    ids = torch.cat([torch.randint(100, 600, (5,), generator=g), torch.tensor([cfg.vision_start_token_id]),
                     torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                     torch.randint(100, 600, (7,), generator=g)])[None]
    types = (ids == cfg.image_token_id).long()
    inputs = dict(input_ids=ids, mm_token_type_ids=types, pixel_values=img["pixel_values"],
                  image_grid_thw=img["image_grid_thw"])
    with torch.no_grad():
        want = model(**inputs).logits
        with StandIn() as dev:
            stand = dev.put(copy.deepcopy(model))
            got = stand(**dev.put(inputs)).logits
    assert got.device.type == "meta"
    torch.testing.assert_close(dev.value(got), want, rtol=0, atol=1e-5)
    # transformers reads grid_thw on the host (.tolist()) to build rotary positions: counted, with its line
    assert dev.num_syncs() > 0 and any("modeling_qwen2_5_vl" in e.where for e in dev.syncs()), dev.report()


@pytest.mark.parametrize("op", ["add", "matmul", "index_select", "cat", "embedding"])
def test_host_tensor_meeting_device_tensor_raises(op):
    with StandIn() as dev:
        d = dev.put(torch.randn(4, 4))
        h = torch.randn(4, 4)
        f = {"add": lambda: d + h, "matmul": lambda: d @ h, "index_select": lambda: d.index_select(0, h[0].long().abs() % 4),
             "cat": lambda: torch.cat([d, h]), "embedding": lambda: torch.nn.functional.embedding(h.long().abs() % 4, d)}[op]
        with pytest.raises(RuntimeError, match="device"):
            f()
        # CUDA accepts 0-dim host tensors and host indices for advanced indexing; so does the stand-in
        assert dev.value(d * torch.tensor(2.0)).equal(dev.value(d) * 2)
        assert dev.value(d[torch.tensor([3, 0])]).equal(dev.value(d)[[3, 0]])
        assert dev.num_syncs() == 0, dev.report()


def test_each_kind_of_sync_is_counted_with_its_line():
    with StandIn() as dev:
        t = dev.put(torch.tensor([3, 0, 2, 2, 5]))
        reads = [
            ("item", lambda: t[0].item(), 3), ("item", lambda: float(t.sum()), 5.0 + 7),
            ("item", lambda: bool(t.any()), True), ("d2h", lambda: t.tolist(), [3, 0, 2, 2, 5]),
            ("d2h", lambda: t.cpu().tolist(), [3, 0, 2, 2, 5]), ("d2h", lambda: t.to("cpu")[1].item(), 0),
            ("shape", lambda: t.nonzero().flatten().tolist(), [0, 2, 3, 4]),
            ("shape", lambda: t.masked_select(t > 2).shape[0], 2),
            ("shape", lambda: t[t > 2].shape[0], 2),
            ("shape", lambda: torch.repeat_interleave(t).shape[0], 12),
            ("shape", lambda: torch.unique_consecutive(t).shape[0], 4),
            ("read", lambda: torch.equal(t, t), True),
        ]
        for kind, read, want in reads:
            dev.reset()
            got = read()
            assert got == want, (kind, got)
            assert dev.num_syncs(kind) >= 1, (kind, dev.report())
            assert all(":" in e.where and "test_standin.py" in e.where for e in dev.syncs()), dev.report()
        dev.reset()
        host = torch.zeros(5, dtype=torch.long)
        host.copy_(t)                                      # a copy into a host tensor is a d2h sync too
        assert host.tolist() == [3, 0, 2, 2, 5] and dev.num_syncs("d2h") == 1
        dev.reset()
        t.repeat_interleave(2)                              # known output size: no sync
        torch.repeat_interleave(t, t, output_size=12)
        t.argmax(), t.topk(2), t.cumsum(0)
        assert dev.num_syncs() == 0, dev.report()


def test_views_inplace_out_parameter_aliasing():
    with StandIn() as dev:
        base = dev.put(torch.arange(12.0).reshape(3, 4))
        base[1:, ::2].mul_(10)                              # in-place through a strided view lands in the base
        base.t()[0].add_(1)                                 # ... and through a transpose
        torch.add(base[0], 100, out=base[2])                # out= into a view
        p = torch.nn.Parameter(base)                        # a Parameter aliases its data
        with torch.no_grad():
            p[0, 0] = -1
        flat = base.view(torch.int32)                       # dtype views share the bytes
        want = torch.arange(12.0).reshape(3, 4)
        want[1:, ::2] *= 10
        want.t()[0] += 1
        torch.add(want[0], 100, out=want[2])
        want[0, 0] = -1
        assert torch.equal(dev.value(base), want) and torch.equal(dev.value(p), want)
        assert torch.equal(dev.value(flat), want.view(torch.int32))
        # torch.tensor(..., device=meta) bypasses dispatch; the stand-in builds on the host and copies
        before = dev.num_events("h2d")
        assert dev.value(torch.tensor([1.5, 2], device=dev.device)).tolist() == [1.5, 2.0]
        assert dev.num_events("h2d") == before + 1 and dev.num_syncs() == 0
    outside = torch.empty(2, device="meta")              # made before the stand-in: it has no values
    with pytest.raises(StandInError, match="no shadow"):
        with StandIn():
            outside.add(1)
