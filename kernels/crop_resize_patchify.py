"""Triton kernel: fused crop -> resize -> normalize -> patchify, one program per 14x14 output patch.

What is fused: each program computes the 3 x 2 x 14 x 14 values of one `pixel_values` row directly from the
uint8 source frames: both separable resize passes (the uint8 rounding between them kept, so the result is
PIL's / ATen's bit for bit), the normalisation (a 3 x 256 lookup table already in the output dtype, so no
float -> bf16 conversion happens in the kernel) and the merge-window scatter (the program id *is* the output
row). Bytes moved: the source pixels under the patch's filter footprint (L1/L2-cached across neighbouring
programs) and 1176 * sizeof(out) written once; the unfused processors write and re-read a resized uint8
image, a float32 normalised copy and a permuted copy (about 5x the bytes, 4 passes).
Arithmetic: out(y, x) = clip8(sum_v wv[y, v] * clip8(sum_h wh[x, h] * src[fv[y] + v, fh[x] + h])) in int32
fixed point (half added, arithmetic shift, clamp); Pillow >= 13 nests the sums the other way round when it
resizes vertically first (`vertical_first` in the C++ header). The per-axis taps come from
`videocom_fast.preprocess.axis_plan`, the Python twin of csrc/include/crop_resize_patchify.h.
Identity axes need no special case: their single weight is exactly 1.0 in fixed point.
Launch: one launch per item (items live in different tensors); grid = the item's pixel_values rows / ROWS\n(ROWS patches per program: 1 on a GPU, 32 under the interpreter, whose cost is per program).
On a CPU tensor this runs only under TRITON_INTERPRET=1, set before this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PATCH = 14
BLOCK = 16  # 14 padded to a power of two


@triton.jit
def _resample_channel(frame, c, row_stride, fv, sv, fh, sh, oy, ox, lane_ok, wv_ptr, wh_ptr,
                      kv, kh, prec_v, prec_h, vfirst, KV: tl.constexpr, KH: tl.constexpr):
    """Resized uint8 value (as int32) of channel c at the lanes' output pixels (oy, ox); taps are a tile dim."""
    half_v = 1 << (prec_v - 1)
    half_h = 1 << (prec_h - 1)
    if vfirst:  # Pillow >= 13 with the height shrinking faster: vertical sums inside
        tv = tl.arange(0, KV)[None, :]
        mv = lane_ok[:, None] & (tv < sv[:, None])
        wv = tl.load(wv_ptr + oy[:, None] * kv + tv, mask=mv, other=0)  # (L, KV), loaded once
        acc = tl.zeros_like(fv) + half_h
        for jh in range(0, kh):
            wh = tl.load(wh_ptr + ox * kh + jh, mask=lane_ok, other=0)
            m = mv & (jh < sh)[:, None]
            pix = tl.load(frame[:, None] + (fv[:, None] + tv).to(tl.int64) * row_stride + (fh[:, None] + jh) * 3 + c,
                          mask=m, other=0)
            inner = tl.sum(pix.to(tl.int32) * wv, axis=1) + half_v
            acc += wh * tl.minimum(tl.maximum(inner >> prec_v, 0), 255)
        res = tl.minimum(tl.maximum(acc >> prec_h, 0), 255)
    else:  # horizontal pass first (ATen always, Pillow usually)
        th = tl.arange(0, KH)[None, :]
        mh = lane_ok[:, None] & (th < sh[:, None])
        wh = tl.load(wh_ptr + ox[:, None] * kh + th, mask=mh, other=0)  # (L, KH), loaded once
        acc = tl.zeros_like(fv) + half_v
        for jv in range(0, kv):
            wv = tl.load(wv_ptr + oy * kv + jv, mask=lane_ok, other=0)
            m = mh & (jv < sv)[:, None]
            pix = tl.load(frame[:, None] + (fv[:, None] + jv).to(tl.int64) * row_stride + (fh[:, None] + th) * 3 + c,
                          mask=m, other=0)
            inner = tl.sum(pix.to(tl.int32) * wh, axis=1) + half_h
            acc += wv * tl.minimum(tl.maximum(inner >> prec_h, 0), 255)
        res = tl.minimum(tl.maximum(acc >> prec_v, 0), 255)
    return res  # one exit: the compiler (unlike the interpreter) dislikes returns inside branches


@triton.jit
def _crop_resize_patchify_kernel(
    src_ptr, lut_ptr, out_ptr,
    fv_ptr, sv_ptr, wv_ptr, fh_ptr, sh_ptr, wh_ptr,
    row0, num_rows, gh, gw, num_frames, frame_stride, row_stride, crop_offset,
    kv, kh, prec_v, prec_h, vfirst,
    PATCH: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, KV: tl.constexpr, KH: tl.constexpr,
):
    # ROWS pixel_values rows (patches) per program; lane = (row, y, x) over padded 16 x 16 patches
    lane = tl.arange(0, ROWS * BLOCK * BLOCK)
    row = tl.program_id(0) * ROWS + lane // (BLOCK * BLOCK)
    ys = (lane // BLOCK) % BLOCK
    xs = lane % BLOCK
    lane_ok = (ys < PATCH) & (xs < PATCH) & (row < num_rows)
    row = tl.where(lane_ok, row, 0)
    # merge-window order: row -> (temporal patch p, patch (py, px))
    per_t = gh * gw
    p = row // per_t
    r = row % per_t
    win = r // 4
    py = 2 * (win // (gw // 2)) + (r % 4) // 2
    px = 2 * (win % (gw // 2)) + r % 2
    oy = py * PATCH + tl.where(lane_ok, ys, 0)
    ox = px * PATCH + tl.where(lane_ok, xs, 0)
    fv = tl.load(fv_ptr + oy)
    sv = tl.load(sv_ptr + oy)
    fh = tl.load(fh_ptr + ox)
    sh = tl.load(sh_ptr + ox)
    out_lane = out_ptr + (row0 + row).to(tl.int64) * (3 * 2 * PATCH * PATCH) + ys * PATCH + xs
    f0 = tl.minimum(2 * p, num_frames - 1)
    f1 = tl.minimum(2 * p + 1, num_frames - 1)  # image: its frame twice; odd video: last frame repeated
    base0 = src_ptr + crop_offset + f0.to(tl.int64) * frame_stride
    base1 = src_ptr + crop_offset + f1.to(tl.int64) * frame_stride
    for c in range(3):
        v0 = _resample_channel(base0, c, row_stride, fv, sv, fh, sh, oy, ox, lane_ok, wv_ptr, wh_ptr,
                               kv, kh, prec_v, prec_h, vfirst, KV, KH)
        v1 = v0
        if num_frames > 1:
            v1 = _resample_channel(base1, c, row_stride, fv, sv, fh, sh, oy, ox, lane_ok, wv_ptr, wh_ptr,
                                   kv, kh, prec_v, prec_h, vfirst, KV, KH)
        y0 = tl.load(lut_ptr + c * 256 + v0, mask=lane_ok, other=0)
        y1 = tl.load(lut_ptr + c * 256 + v1, mask=lane_ok, other=0)
        tl.store(out_lane + (c * 2 + 0) * PATCH * PATCH, y0, mask=lane_ok)
        tl.store(out_lane + (c * 2 + 1) * PATCH * PATCH, y1, mask=lane_ok)


def crop_resize_patchify_triton(items, lut: torch.Tensor, out: torch.Tensor) -> None:
    """Launcher: `items` are videocom_fast.preprocess._Item (frames (T, H, W, 3) uint8, box, out size, mode);
    `lut` (3, 256) and `out` (rows, 1176) in the output dtype, on the frames' device."""
    from videocom_fast.preprocess import axis_plan, vertical_first

    device = out.device
    # the interpreter's cost is per program, a GPU's per lane: big programs there, one patch each here
    rows_per_program = 32 if device.type == "cpu" else 1
    row0 = 0
    for it in items:
        frames = it.frames_THWC
        if frames.device != device or lut.device != device:
            raise ValueError(f"crop_resize_patchify_triton: frames on {frames.device}, out on {device}")
        x1, y1, x2, y2 = it.box
        in_h, in_w = y2 - y1, x2 - x1
        fv, sv, wv, pv = axis_plan(it.mode, in_h, it.out_h)
        fh, sh, wh, ph = axis_plan(it.mode, in_w, it.out_w)
        as_dev = lambda a: torch.from_numpy(a).contiguous().to(device)  # noqa: E731
        _, gh, gw = it.grid
        _crop_resize_patchify_kernel[(triton.cdiv(it.rows, rows_per_program),)](
            frames, lut, out,
            as_dev(fv), as_dev(sv), as_dev(wv), as_dev(fh), as_dev(sh), as_dev(wh),
            row0, it.rows, gh, gw, frames.shape[0], frames.stride(0), frames.stride(1), y1 * frames.stride(1) + x1 * 3,
            wv.shape[1], wh.shape[1], pv, ph,
            int(in_w != it.out_w and in_h != it.out_h and vertical_first(it.mode, in_h, in_w, it.out_h, it.out_w)),
            PATCH=PATCH, BLOCK=BLOCK, ROWS=rows_per_program, KV=triton.next_power_of_2(wv.shape[1]), KH=triton.next_power_of_2(wh.shape[1]),
        )
        row0 += it.rows
