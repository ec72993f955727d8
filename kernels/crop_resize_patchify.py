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
Launch: one launch per item (items live in different tensors); grid = the item's pixel_values rows.
On a CPU tensor this runs only under TRITON_INTERPRET=1, set before this module is imported.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PATCH = 14
BLOCK = 16  # 14 padded to a power of two


@triton.jit
def _crop_resize_patchify_kernel(
    src_ptr, lut_ptr, out_ptr,
    fv_ptr, sv_ptr, wv_ptr, fh_ptr, sh_ptr, wh_ptr,
    row0, gh, gw, num_frames, frame_stride, row_stride, crop_offset,
    kv, kh, prec_v, prec_h, vfirst,
    PATCH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    # merge-window order: row -> (temporal patch p, patch (py, px))
    per_t = gh * gw
    p = row // per_t
    r = row % per_t
    win = r // 4
    py = 2 * (win // (gw // 2)) + (r % 4) // 2
    px = 2 * (win % (gw // 2)) + r % 2
    ys = tl.arange(0, BLOCK)[:, None]
    xs = tl.arange(0, BLOCK)[None, :]
    mask = (ys < PATCH) & (xs < PATCH)
    oy = py * PATCH + ys
    ox = px * PATCH + xs
    fv = tl.load(fv_ptr + oy, mask=ys < PATCH, other=0)
    sv = tl.load(sv_ptr + oy, mask=ys < PATCH, other=0)
    fh = tl.load(fh_ptr + ox, mask=xs < PATCH, other=0)
    sh = tl.load(sh_ptr + ox, mask=xs < PATCH, other=0)
    half_v = 1 << (prec_v - 1)
    half_h = 1 << (prec_h - 1)
    out_row = out_ptr + (row0 + row).to(tl.int64) * (3 * 2 * PATCH * PATCH)
    for t in range(2):
        f = tl.minimum(2 * p + t, num_frames - 1)  # image: its frame twice; odd video: last frame repeated
        frame = src_ptr + crop_offset + f.to(tl.int64) * frame_stride
        for c in range(3):
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.int32)
            if vfirst:  # Pillow >= 13, height shrinking faster: vertical sums inside
                acc += half_h
                for jh in range(0, kh):
                    wh = tl.load(wh_ptr + ox * kh + jh, mask=xs < PATCH, other=0)
                    inner = tl.zeros([BLOCK, BLOCK], dtype=tl.int32) + half_v
                    for jv in range(0, kv):
                        wv = tl.load(wv_ptr + oy * kv + jv, mask=ys < PATCH, other=0)
                        m = mask & (jv < sv) & (jh < sh)
                        pix = tl.load(frame + (fv + jv).to(tl.int64) * row_stride + (fh + jh) * 3 + c, mask=m, other=0)
                        inner += wv * pix.to(tl.int32)
                    acc += wh * tl.minimum(tl.maximum(inner >> prec_v, 0), 255)
                val = tl.minimum(tl.maximum(acc >> prec_h, 0), 255)
            else:  # horizontal pass first (ATen always, Pillow usually)
                acc += half_v
                for jv in range(0, kv):
                    wv = tl.load(wv_ptr + oy * kv + jv, mask=ys < PATCH, other=0)
                    inner = tl.zeros([BLOCK, BLOCK], dtype=tl.int32) + half_h
                    for jh in range(0, kh):
                        wh = tl.load(wh_ptr + ox * kh + jh, mask=xs < PATCH, other=0)
                        m = mask & (jv < sv) & (jh < sh)
                        pix = tl.load(frame + (fv + jv).to(tl.int64) * row_stride + (fh + jh) * 3 + c, mask=m, other=0)
                        inner += wh * pix.to(tl.int32)
                    acc += wv * tl.minimum(tl.maximum(inner >> prec_h, 0), 255)
                val = tl.minimum(tl.maximum(acc >> prec_v, 0), 255)
            y = tl.load(lut_ptr + c * 256 + val, mask=mask, other=0)
            tl.store(out_row + ((c * 2 + t) * PATCH + ys) * PATCH + xs, y, mask=mask)


def crop_resize_patchify_triton(items, lut: torch.Tensor, out: torch.Tensor) -> None:
    """Launcher: `items` are videocom_fast.preprocess._Item (frames (T, H, W, 3) uint8, box, out size, mode);
    `lut` (3, 256) and `out` (rows, 1176) in the output dtype, on the frames' device."""
    from videocom_fast.preprocess import axis_plan, vertical_first

    device = out.device
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
        _crop_resize_patchify_kernel[(it.rows,)](
            frames, lut, out,
            as_dev(fv), as_dev(sv), as_dev(wv), as_dev(fh), as_dev(sh), as_dev(wh),
            row0, gh, gw, frames.shape[0], frames.stride(0), frames.stride(1), y1 * frames.stride(1) + x1 * 3,
            wv.shape[1], wh.shape[1], pv, ph,
            int(in_w != it.out_w and in_h != it.out_h and vertical_first(it.mode, in_h, in_w, it.out_h, it.out_w)),
            PATCH=PATCH, BLOCK=BLOCK,
        )
        row0 += it.rows
