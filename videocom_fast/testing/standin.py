"""A stand-in accelerator: run device code without a GPU, with device checks, values and a sync count.

Why: every CPU test runs with every tensor on the CPU, so a host tensor meeting a device tensor (a crash at
the first GPU run) and a host read of a device value (a sync that stalls the GPU) are invisible to CI.

How: the `meta` device plays the accelerator. PyTorch's own kernels raise when a host tensor meets a meta
tensor ("Tensor on device cpu is not on the expected device meta!"), as on CUDA, and meta tensors carry no
values, so `StandIn` (a `TorchDispatchMode`) runs every aten op twice: on the meta tensors (device checks,
shapes) and on CPU *shadows* of them (values). Reads of device values on the host are answered from the
shadows and recorded as syncs, each with the op and the code line that asked:

    kind "item"   aten._local_scalar_dense: .item(), float(t), int(t), bool(t), `if t:`
    kind "d2h"    a copy to the host: .cpu(), .to("cpu"), .tolist(), .numpy() after .cpu(), copy_ into CPU
    kind "shape"  an op whose output shape depends on values: nonzero, masked_select, t[bool_mask],
                  repeat_interleave without output_size, unique(_consecutive), bincount, ...
    kind "read"   an op that returns a Python value computed from device data (torch.equal, allclose)

Host-to-device copies are recorded too (kind "h2d", not a sync) so a test can bound them.

Shadows are keyed by *storage* (an identity map on the meta StorageImpl, dropped when the storage dies), and a
tensor's shadow is the shadow storage seen through that tensor's own size/stride/offset. So views, in-place
ops through views, out= ops, `nn.Parameter(t)`, `.data`, `.grad` and optimizer foreach ops all alias exactly
as on a real device, and autograd runs (its ops are dispatched like any other).

Stricter than meta where CUDA is: a CPU tensor with more than 0 dims handed to any op with a device operand
raises, except where CUDA accepts host tensors (the indices of `t[idx]` / `t[idx] = v`, copies).
`torch.tensor(..., device=...)`/`torch.as_tensor` bypass dispatch modes; inside the mode they are patched to
build on the host and copy (an "h2d" event), as CUDA would.

Usage:

    from videocom_fast.testing.standin import StandIn
    with StandIn() as dev:             # dev.device is torch.device("meta")
        model = dev.put(model)         # modules, tensors, lists/dicts/tuples of them
        loss = step(model, dev.put(batch))
        assert dev.num_syncs() == 1, dev.report()
    dev.value(loss)                    # the CPU value (a copy; not a sync)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import weakref
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

META = torch.device("meta")
CPU = torch.device("cpu")
SYNC_KINDS = ("item", "d2h", "shape", "read")
aten = torch.ops.aten

# Ops whose output shape depends on the values of a device input (a sync on a GPU).
_DATA_DEPENDENT = {"nonzero", "nonzero_numpy", "argwhere", "masked_select", "unique_consecutive", "_unique",
                   "_unique2", "unique_dim", "repeat_interleave", "bincount", "index", "index_put", "index_put_",
                   "_index_put_impl_", "masked_scatter", "masked_scatter_"}
# Ops that accept host tensors next to device tensors on CUDA (besides 0-dim scalars).
_HOST_OPERANDS_OK = {"copy_", "_to_copy", "_copy_from", "_copy_from_and_resize", "index", "index_put",
                     "index_put_", "_index_put_impl_", "set_", "lift_fresh", "lift_fresh_copy"}
_SKIP_FRAMES = (os.path.dirname(torch.__file__), os.path.dirname(contextlib.__file__) + os.sep + "contextlib",
                __file__)


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str   # one of SYNC_KINDS, or "h2d" (a host-to-device copy), "no_meta" (values only, no checks)
    op: str     # the aten op, e.g. "aten._local_scalar_dense.default"
    where: str  # "file.py:123 in fn" of the innermost caller outside torch (then the project caller)

    @property
    def sync(self) -> bool:
        return self.kind in SYNC_KINDS


class StandInError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ shadows
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _view(storage: torch.UntypedStorage, like: torch.Tensor) -> torch.Tensor:
    """The CPU tensor that sees `storage` through `like`'s dtype and geometry."""
    return torch.empty(0, dtype=like.dtype).set_(storage, like.storage_offset(), like.size(), like.stride())


def _where() -> str:
    """Innermost frame outside torch and this file, plus the innermost project frame if it differs."""
    frames, f = [], sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_SKIP_FRAMES):
            frames.append(f)
        f = f.f_back
    if not frames:
        return "?"
    fmt = lambda fr: f"{os.path.basename(fr.f_code.co_filename)}:{fr.f_lineno} in {fr.f_code.co_name}"
    project = next((fr for fr in frames if "site-packages" not in fr.f_code.co_filename), frames[0])
    return fmt(frames[0]) if project is frames[0] else f"{fmt(frames[0])} <- {fmt(project)}"


def _is_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta"


def _swap_device(x: Any) -> Any:
    if isinstance(x, torch.device) and x.type == "meta":
        return CPU
    if isinstance(x, str) and x == "meta":
        return "cpu"
    return x


class StandIn(TorchDispatchMode):
    """The stand-in accelerator. See the module docstring."""

    device = META

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self._shadows: dict[int, torch.UntypedStorage] = {}
        self._depth = 0
        self._saved: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------- public API
    def syncs(self, kind: str | None = None) -> list[Event]:
        return [e for e in self.events if e.sync and (kind is None or e.kind == kind)]

    def num_syncs(self, kind: str | None = None) -> int:
        return len(self.syncs(kind))

    def num_events(self, kind: str) -> int:
        return sum(e.kind == kind for e in self.events)

    def reset(self) -> None:
        self.events.clear()

    def report(self) -> str:
        """One line per distinct (kind, op, where), with its count: what a failing sync assertion prints."""
        counts = Counter((e.kind, e.op, e.where) for e in self.events)
        lines = [f"{n:4d} x {k:7s} {op:40s} {w}" for (k, op, w), n in counts.most_common()]
        return f"stand-in events ({len(self.syncs())} syncs):\n" + "\n".join(lines)

    def put(self, obj: Any) -> Any:
        """Move a module (in place; returned), a tensor, or a list/tuple/dict of them onto the stand-in."""
        with self._active():
            if isinstance(obj, torch.nn.Module):
                return obj.to(META)
            return tree_map(lambda x: x.to(META) if isinstance(x, torch.Tensor) else x, obj)

    def value(self, obj: Any) -> Any:
        """CPU copies of stand-in tensors (tensors, lists/dicts of them) for assertions; not counted as syncs."""
        def one(x):
            if isinstance(x, torch.nn.Module):
                raise TypeError("value() takes tensors; use {n: dev.value(p) for n, p in m.named_parameters()}")
            return self._shadow(x).clone() if _is_meta(x) else x
        return tree_map(one, obj)

    # ----------------------------------------------------------------------------------- mode plumbing
    def __enter__(self):
        if self._depth == 0:
            self._saved = {"tensor": torch.tensor, "as_tensor": torch.as_tensor}
            torch.tensor, torch.as_tensor = self._host_then_copy(torch.tensor), self._host_then_copy(torch.as_tensor)
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            torch.tensor, torch.as_tensor = self._saved["tensor"], self._saved["as_tensor"]
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def _active(self):
        if self._depth:
            yield
        else:
            with self:
                yield

    def _host_then_copy(self, build):
        def wrapped(data, *args, device=None, **kwargs):
            if _is_meta(data):  # torch.tensor(device_tensor): a device copy (as_tensor: the tensor itself)
                dtype = kwargs.get("dtype", args[0] if args else None)
                out = data.to(dtype=dtype) if build is self._saved["as_tensor"] else data.detach().clone()
                return out.to(dtype=dtype, device=device)
            if isinstance(data, (list, tuple)):  # device scalars in a list are read one by one (syncs)
                data = tree_map(lambda x: x.item() if _is_meta(x) else x, data)
            if device is not None and torch.device(device).type == "meta":
                return build(data, *args, **kwargs).to(META)
            return build(data, *args, device=device, **kwargs)
        return wrapped

    def _shadow(self, t: torch.Tensor) -> torch.Tensor:
        storage = self._shadows.get(_storage_key(t))
        if storage is None:
            raise StandInError(
                f"a meta tensor {tuple(t.shape)} {t.dtype} has no shadow: it was made outside the stand-in "
                "(torch.empty(..., device='meta') before entering, or a C++ path that bypasses dispatch); "
                "build it on the host and .to() it inside `with StandIn()`")
        return _view(storage, t)

    def _adopt(self, meta: torch.Tensor, shadow: torch.Tensor, taken: set[int]) -> None:
        """Make `shadow`'s values the values of `meta` (a fresh output, or an alias of a known storage)."""
        key = _storage_key(meta)
        known = self._shadows.get(key)
        if known is not None:  # in-place / out= / view output: the shadow op must have written the same storage
            if shadow.untyped_storage()._cdata != known._cdata or shadow.stride() != meta.stride() \
                    or shadow.storage_offset() != meta.storage_offset():
                _view(known, meta).copy_(shadow)
            return
        same_layout = (shadow.stride() == meta.stride() and shadow.storage_offset() == meta.storage_offset()
                       and shadow.untyped_storage().nbytes() >= meta.untyped_storage().nbytes())
        if same_layout and shadow.untyped_storage()._cdata not in taken:
            storage = shadow.untyped_storage()
        else:  # the CPU kernel aliased an input or chose another layout: copy into meta's layout
            storage = torch.empty(meta.untyped_storage().nbytes(), dtype=torch.uint8).untyped_storage()
            _view(storage, meta).copy_(shadow)
        self._shadows[key] = storage
        taken.add(storage._cdata)
        weakref.finalize(meta.untyped_storage(), self._shadows.pop, key, None)

    # ------------------------------------------------------------------------------------ the dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        name = func._schema.name.split("::")[-1]
        has_meta = any(_is_meta(x) for x in tensors)
        to_meta = any(_swap_device(x) is not x for x in flat)
        if not has_meta and not to_meta:
            return func(*args, **kwargs)
        if has_meta and name not in _HOST_OPERANDS_OK:
            for x in tensors:
                if x.device.type != "meta" and x.dim() > 0:
                    raise RuntimeError(f"{func}: a {x.device} tensor of shape {tuple(x.shape)} meets a device "
                                       "tensor (CUDA accepts only 0-dim host tensors here)")
        taken = {_storage_key(x) for x in tensors if not _is_meta(x)}
        shadow_flat = []
        for x in flat:
            if _is_meta(x):
                s = self._shadow(x)
                taken.add(s.untyped_storage()._cdata)
                shadow_flat.append(s)
            else:
                shadow_flat.append(_swap_device(x))
        shadow_args, shadow_kwargs = tree_unflatten(shadow_flat, spec)

        if has_meta and not to_meta and self._to_host(func, name, args, kwargs):
            kind = "item" if name == "_local_scalar_dense" else "d2h"
            self.events.append(Event(kind, str(func), _where()))
            if name == "copy_":
                return args[0].copy_(shadow_args[1], *shadow_args[2:], **shadow_kwargs)
            return func(*shadow_args, **shadow_kwargs)
        if (name == "_to_copy" and not has_meta) or (name == "copy_" and not _is_meta(args[1])):
            self.events.append(Event("h2d", str(func), _where()))

        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:
            if not isinstance(e, NotImplementedError) and "meta" not in str(e).lower():
                raise  # a real error (device mismatch, shape): exactly what CUDA would raise
            return self._values_only(func, name, args, kwargs, shadow_args, shadow_kwargs, taken, str(e))
        shadow_out = func(*shadow_args, **shadow_kwargs)
        for m, s in zip(tree_flatten(out)[0], tree_flatten(shadow_out)[0]):
            if _is_meta(m):
                self._adopt(m, s, taken)
        return out

    def _to_host(self, func, name, args, kwargs) -> bool:
        if name == "_local_scalar_dense":
            return True
        if name == "_to_copy":
            return kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if name == "copy_":
            return args[0].device.type == "cpu"
        return False

    def _values_only(self, func, name, args, kwargs, shadow_args, shadow_kwargs, taken, why):
        """An op meta cannot run (data-dependent shape, no meta kernel): compute on the shadows."""
        shadow_out = func(*shadow_args, **shadow_kwargs)
        flat_s, spec = tree_flatten(shadow_out)
        if not any(isinstance(s, torch.Tensor) for s in flat_s):
            kind = "read"
        elif name in _DATA_DEPENDENT or "nonzero" in why or "output_size" in why:
            kind = "shape"
        else:
            kind = "no_meta"
        self.events.append(Event(kind, str(func), _where()))
        # Outputs that alias an argument (in-place, out=) are that argument; fresh ones get a meta twin.
        schema = func._schema
        values = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(schema.arguments)]
        aliased = {i: v for i, ret in enumerate(schema.returns) if ret.alias_info is not None
                   for a, v in zip(schema.arguments, values)
                   if a.alias_info is not None and a.alias_info.before_set == ret.alias_info.before_set}
        outs = []
        for i, s in enumerate(flat_s):
            if not isinstance(s, torch.Tensor):
                outs.append(s)
                continue
            m = aliased.get(i)
            if m is None:
                m = torch.empty_strided(s.size(), s.stride(), dtype=s.dtype, device=META)
            self._adopt(m, s, taken)
            outs.append(m)
        return tree_unflatten(outs, spec)
