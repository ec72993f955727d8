# Type stub of videocom_fast._C (the torch-free C++ core). Each component owns one `# --- name ---` section.
from __future__ import annotations

with_cuda: bool
with_openmp: bool

# --- protocol ---
# csrc/protocol/ (twin: videocom_fast/protocol/reference.py; wrapped by videocom_fast/protocol/cpp.py).
# Bad arguments raise ValueError naming the argument (and index); the text functions never raise.
# protocol_parse_actions returns (kind, values, description, start, end) with character offsets; values are
# list[int] (segment, frame), list[tuple[int, int, int, int]] (zoom) or the answer letter (str).

def protocol_parse_actions(text: object) -> list[tuple[str, list[int] | list[tuple[int, int, int, int]] | str, str, int, int]]: ...
def protocol_mentioned_tool(text: object) -> str | None: ...
def protocol_num_segments(total_frames: int, fps: float, min_seconds: float = 10.0, max_seconds: float = 30.0) -> int: ...
def protocol_segment_ranges(total_frames: int, fps: float) -> list[tuple[int, int]]: ...
def protocol_smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136,
                          max_pixels: int = 100352) -> tuple[int, int]: ...
def protocol_smart_nframes(nframes: int, total: int, fps: float, min_frames: int = 4, max_frames: int = 32) -> int: ...
def protocol_sample_frame_indices(total_frames: int, fps: float, nframes: int, time_ranges: object = None,
                                  frame_list: object = None) -> list[int]: ...
def protocol_linspace_round(end: int, steps: int) -> list[int]: ...

# --- scheduler ---
# csrc/scheduler/ (twin: videocom_fast/rollout/scheduler.py). Bad arguments raise ValueError; a broken
# invariant at the end of schedule() raises RuntimeError.

class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    block_size: int
    num_blocks: int
    max_prefill_chunk: int
    def __init__(self, max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, block_size: int = 16,
                 num_blocks: int = 4096, max_prefill_chunk: int = 512) -> None: ...

class ScheduledSeq(tuple):  # a PyStructSequence: named fields, also a tuple
    @property
    def seq_id(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def is_prefill(self) -> bool: ...
    @property
    def block_ids(self) -> list[int]: ...
    @property
    def samples(self) -> bool: ...

class SchedulerOutput:
    @property
    def scheduled(self) -> list[ScheduledSeq]: ...
    @property
    def preempted(self) -> list[int]: ...
    @property
    def finished(self) -> list[int]: ...
    @property
    def num_batched_tokens(self) -> int: ...

class Fork:
    @property
    def child(self) -> int: ...
    @property
    def block_ids(self) -> list[int]: ...
    @property
    def copy_src(self) -> int: ...
    @property
    def copy_dst(self) -> int: ...
    @property
    def copy_rows(self) -> int: ...

class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None: ...
    @property
    def config(self) -> SchedulerConfig: ...
    def add_group(self, group_id: int, prompt_len: int, num_seqs: int) -> list[int]: ...
    def schedule(self) -> SchedulerOutput: ...
    def update(self, seq_id: int, num_computed: int) -> None: ...
    def fork_ready(self, group_id: int) -> list[Fork]: ...
    def append_tokens(self, seq_id: int, n: int) -> None: ...
    def append_one_each(self, seq_ids: list[int]) -> None: ...
    def await_observation(self, seq_id: int) -> None: ...
    def finish(self, seq_id: int) -> None: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def num_running(self) -> int: ...
    def seq_state(self, seq_id: int) -> str: ...
    def finish_reason(self, seq_id: int) -> str | None: ...
    def num_tokens(self, seq_id: int) -> int: ...
    def num_computed_tokens(self, seq_id: int) -> int: ...
    def block_table(self, seq_id: int) -> list[int]: ...
    def block_ref_count(self, block_id: int) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def _corrupt_for_test(self, kind: str) -> None: ...

# --- kernels ---
# csrc/cpu/crop_resize_patchify.cpp (+ csrc/cuda/, math in csrc/include/crop_resize_patchify.h); wrapped by
# videocom_fast/preprocess.py. mode 0 = PIL bicubic (images), 1 = ATen antialiased bicubic on uint8 (videos).
# Buffers are numpy arrays (zero-copy views of torch tensors); bad buffers raise ValueError naming the
# argument and index. bf16/fp16 outputs are passed as int16 views (bit patterns).
import numpy as np

def crop_resize_patchify(frames: list[np.ndarray], boxes: list[tuple[int, int, int, int]],
                         sizes: list[tuple[int, int]], modes: list[int], lut: np.ndarray, out: np.ndarray,
                         norm: tuple[int, float, list[float], list[float]] | None = None) -> None:
    """frames[i] uint8 (T, H, W, 3) with RGB-contiguous pixels; boxes (x1, y1, x2, y2) exclusive ends;
    sizes (out_h, out_w) multiples of 28; lut (3, 256) and out (rows, 1176) of one dtype (float32 or 16-bit).
    norm = (kind, scale, mean, std): the processor's normalisation formula, computed in SIMD when it
    reproduces `lut` bit for bit (checked per call), else table lookups."""
def cpu_store_kind(lut: np.ndarray, norm: tuple[int, float, list[float], list[float]] | None = None) -> str:
    """'f32' | 'bf16' | 'f16' (computed store) or 'table' (lookups): what the kernel will use for this lut."""
def resize_uint8(image: np.ndarray, out_h: int, out_w: int, mode: int) -> np.ndarray: ...
def set_cpu_simd(enabled: bool) -> bool:
    """Hand-written SIMD loops (True, default: AVX-512 when the CPU has AVX-512BW, else AVX2 when it has it;
    capped by VIDEOCOM_CPU_ISA as cpu_isa) or the portable ones; returns the previous setting. Outputs are
    identical either way."""
def cpu_simd_isa() -> str:
    """'avx512_vbmi', 'avx512', 'avx2' or 'portable': the loops the next CPU kernel call runs."""
def resample_axis(mode: int, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(first, size, weights (out, taps) int32, precision) of one axis."""
def paged_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, out: np.ndarray, q_start: np.ndarray,
                    q_len: np.ndarray, ctx_len: np.ndarray, table_off: np.ndarray, tables: np.ndarray,
                    scale: float) -> None:
    """csrc/cpu/paged_attention.cpp: causal attention of packed query chunks (q (L, Hq, D), strided rows/heads)
    over paged K/V pools: k_pool (num_blocks, Hkv, D, BS) (K transposed within blocks), v_pool (num_blocks, BS,
    Hkv, D); float32 or float64; int64 chunk metadata, int32 tables. Writes the chunks' rows of out (L, Hq, D)."""
def paged_attention_rowdot(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, out: np.ndarray,
                           q_start: np.ndarray, q_len: np.ndarray, ctx_len: np.ndarray, table_off: np.ndarray,
                           tables: np.ndarray, scale: float) -> None:
    """The previous kernel (both pools (num_blocks, BS, Hkv, D)), kept as bench_attention.py's baseline."""
def paged_kv_write(k_pool: np.ndarray, v_pool: np.ndarray, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """Write rows k, v (L, Hkv, D) at flat slots (block * BS + row) of the pools (layouts as paged_attention)."""
def sample_logits(logits: np.ndarray, u: np.ndarray, top_k: int, top_p: float, out: np.ndarray) -> None:
    """csrc/cpu/sampling.cpp: one inverse-CDF draw per row of float32 logits (N, V) after top-k (ties kept, 0: off)
    then top-p, with the row's uniform u (N,) float64 in [0, 1); token ids into out (N,) int64."""
def sample_rows(logits: np.ndarray, temperature: float, suppress: np.ndarray, u: np.ndarray, forced: np.ndarray,
                top_k: int, top_p: float, greedy: bool, tokens: np.ndarray, logprobs: np.ndarray) -> None:
    """csrc/cpu/sampling.cpp: rollout/sampling.py's `sample` in one call for float32 logits (N, V): per row
    log_softmax(logits / T) at the token (before suppression and truncation) into logprobs (N,) float32, the
    suppressed ids (S,) int64 excluded, then the argmax (greedy; u may be empty) or sample_logits' draw with u (N,)
    float64, a forced id (N,) int64 >= 0 replacing it; ids into tokens (N,) int64."""
def causal_softmax_(s: np.ndarray, r0: int, scale: float) -> None:
    """csrc/cpu/causal_softmax.cpp, in place on scores s (M, R, C) float32 / float64: softmax(scale * s) over
    the keys row i may see (j <= r0 + i), 0 past them (training/causal_attention.py's forward)."""
def causal_softmax_backward_(p: np.ndarray, dp: np.ndarray, r0: int, scale: float) -> None:
    """In place on dp (M, R, C): scale * p * (dp - sum_j p dp) over the keys row i may see, 0 past them."""
def crop_resize_patchify_cuda(frames: list[tuple[int, int, int, int, int, int]], boxes: list[tuple[int, int, int, int]],
                              sizes: list[tuple[int, int]], modes: list[int], lut: int, out: int, rows: int,
                              elem_size: int, stream: int) -> None:
    """Only when built with CUDA (with_cuda): device pointers; frames[i] = (ptr, T, H, W, frame_stride, row_stride)."""
def hand_off(who: np.ndarray, toks: np.ndarray, lps: np.ndarray, may_end: np.ndarray, max_new: int, sid: np.ndarray,
             pend: np.ndarray, rl: np.ndarray, npos: np.ndarray, ntok: np.ndarray, known: np.ndarray,
             last: np.ndarray, rt_tok: np.ndarray, rt_lp: np.ndarray, rt_gen: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """csrc/scheduler/hand_off.cpp: the engine step's token hand-off (rollout/engine_step.py `_on_tokens`):
    each token (W,) at slot who[k] that cannot end its round (may_end[tok] == 0, int8 table; round length <
    max_new - 1) is appended to its slot's round arrays (engine._SeqState); returns (end: the indices of the
    other tokens, in order; sids: the appended tokens' scheduler ids)."""


def gather_uniforms(who: np.ndarray, key: np.ndarray, ntok: np.ndarray, out: np.ndarray) -> None:
    """csrc/scheduler/hand_off.cpp: out (W,) float64 [k] = rollout/sampling.py's counter_uniforms(key[who[k]],
    ntok[who[k]]) bit for bit (key uint64, ntok int64: engine._SeqState's slot arrays)."""
