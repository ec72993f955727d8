"""Counting kernel-launching ops: a TorchDispatchMode plus counting wrappers on the C++ kernels (issue 16).

What counts as a kernel: every aten op that reaches the dispatcher except views and metadata-only ops
(`OpOverload.is_view`: view, t, transpose, slice, select, as_strided, detach, ...), and allocations without a
fill (`empty*`: no kernel runs on a GPU). `aten._local_scalar_dense` (`.item()`, `.tolist()`) counts: on a GPU
it is a device-to-host copy and a sync. The C++ CPU kernels are called through numpy buffers, which no
dispatch mode sees, so the counter also wraps each kernel of `videocom_fast._C` (module attributes, looked
up at call time by their callers) and counts its calls.

Per decoder layer: `PackedForward._layer` and `_layer_cpu` calls are wrapped too, so `layer_ops / layer_calls` is the number
of kernels one layer issued, exactly, on the real step; `total` counts everything (step metadata, embedding,
the final norm, the head, sampling).
"""
from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

_NOT_KERNELS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
                "_reshape_alias", "_unsafe_view", "resize_"}
# the CPU kernels of videocom_fast._C that the engine step may call (each call is one kernel)
CPP_KERNELS = ("paged_attention", "paged_kv_write", "sample_logits", "sample_rows", "fused_add_rms_norm",
               "fused_rotary", "fused_silu_mul")


def is_kernel(func) -> bool:
    if func.is_view:
        return False
    return func.overloadpacket.__name__ not in _NOT_KERNELS


class KernelOpCounter(TorchDispatchMode):
    """with KernelOpCounter() as c: ...  ->  c.total, c.by_op (Counter of names), c.layer_ops, c.layer_calls."""

    def __init__(self, attention_as_one: bool = False):
        super().__init__()
        # attention_as_one: `attention.attend` counts as ONE kernel whatever it runs inside (the CUDA path's
        # attention is flash-attn's paged kernel; its SDPA fallback is another engineer's, issue 14)
        self.attention_as_one, self._in_attend, self._in_dispatch = attention_as_one, 0, 0
        self.total, self.layer_ops, self.layer_calls, self._in_layer = 0, 0, 0, 0
        self.by_op, self.layer_by_op = Counter(), Counter()
        self._undo = []

    def _count(self, name: str) -> None:
        if self._in_attend:
            return
        self.total += 1
        self.by_op[name] += 1
        if self._in_layer:
            self.layer_ops += 1
            self.layer_by_op[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_kernel(func):
            self._count(str(func.overloadpacket.__name__))
        self._in_dispatch += 1   # C++ kernels an op's own implementation calls are part of that op
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self._in_dispatch -= 1

    def __enter__(self):
        from videocom_fast import _C
        from videocom_fast.rollout import packed_forward as pf
        for name in CPP_KERNELS:
            fn = getattr(_C, name, None)
            if fn is not None:
                self._patch(_C, name, self._counting(f"_C.{name}", fn))
        if self.attention_as_one:
            from videocom_fast.rollout import attention
            attend = attention.attend

            def one_attend(*a, **k):
                self._count("attend")
                self._in_attend += 1
                try:
                    return attend(*a, **k)
                finally:
                    self._in_attend -= 1
            self._patch(attention, "attend", one_attend)
        for name in ("_layer", "_layer_cpu"):   # the generic layer and the CPU one (packed_forward._layers_cpu)
            layer = pf.PackedForward.__dict__.get(name)
            if layer is not None:
                self._patch(pf.PackedForward, name, self._counting_layer(layer))
        return super().__enter__()

    def _counting_layer(self, layer):
        def counted_layer(fwd, *a, **k):
            self.layer_calls += 1
            self._in_layer += 1
            try:
                return layer(fwd, *a, **k)
            finally:
                self._in_layer -= 1
        return counted_layer

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for obj, name, old in reversed(self._undo):
                setattr(obj, name, old)
            self._undo.clear()

    def _patch(self, obj, name, new) -> None:
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, new)

    def _counting(self, name, fn):
        def wrapper(*a, **k):
            if not self._in_dispatch:
                self._count(name)
            return fn(*a, **k)
        return wrapper

    @property
    def per_layer(self) -> float:
        return self.layer_ops / max(self.layer_calls, 1)
