"""RolloutEngine: multi-turn Video-CoM rollouts with paged KV, shared group prefixes and packed steps.

Legend: L packed tokens of one step, D hidden, V vocabulary, G rollouts per prompt, n tokens of a chunk.

What one `generate(samples)` does (the reference's costs it removes are spec section 8):
- Each sample becomes a GROUP of G rollouts. Its prompt (system + main video + question) is prepared on a
  worker thread (env + decode + preprocess), its video goes through the vision tower once, and the prompt
  is prefilled ONCE by the group's leader; the scheduler then forks the other G-1 rollouts from the
  leader's KV blocks (shared by reference count, last partial block copied). Each follower samples its
  first token from the leader's last logits with its own generator.
- Every engine step: the scheduler picks decodes and prefill chunks under a token and a KV-block budget
  (`schedule_arrays()`: flat arrays); all their tokens are concatenated into ONE forward (B = 1) with explicit
  (3, L) M-RoPE positions (a decode's token and position come from the per-sequence arrays, `_SeqState`, a
  prefill chunk's from its sequence's lists and `MRopeCursor`): packed_forward.py (the decoder as plain
  tensor ops over the model's own weights) when the model allows it, else `modeling.text_forward`
  (transformers' modules, e.g. with PEFT adapters) with the registered paged attention. Either way the
  step's K/V rows go into the paged pool (kv_cache.py) and `attention.attend` reads each sequence's rows
  through its block table.
- Sampling: `sampling.sample` (C++ top-k/top-p draw) with counter-based uniforms keyed by (seed, sample,
  rollout) and the token's index, so a rollout's draws never depend on who shares its step.
- A round ends per stopping.py. Then `env.step(text)`, preprocessing (once per group and media key) and
  the observation's token ids and M-RoPE positions run on a worker thread while the other sequences keep
  decoding; the vision tower (vision_forward.py when the model allows it, else transformers') runs between
  steps on the main thread, batched over everything that arrived, with outputs cached per group by
  `MediaItem.key` (the same segment, frame or crop asked by several rollouts is encoded once). The
  observation (newline + user turn + assistant header, videocom_fast.chat) is appended and prefilled on
  top of the KV already there: no token is ever prefilled twice unless the scheduler preempted its
  sequence (then it is recomputed from its own tokens, media embeddings kept).
- No dummy rounds after the answer (defect 10); positions by the original M-RoPE rule, incrementally
  (defect 1); token in / token out (defect 8); fp32 log-probs (defect 9).

Positions: the three M-RoPE rows of a generated token are equal, so a round's text tokens keep only their
first position (`_Seq.pending_pos`) and are written to the (3, n) table in one slice when something reads
a range of it (a prefill chunk, the observation that follows, the finished Trajectory).
`text_forward="transformers"` runs transformers' modules for the vision tower too.

Choice on stopped rounds: a round the engine ends itself (completed action line, per-round token
limit) gets an injected, not generated, <|im_end|> before the observation (Trajectory docstring).
Finish reasons: "answer", "max_rounds", "max_new_tokens" (the last round hit the per-round limit),
"kv_budget" (the sequence cannot fit the KV pool even alone), and "error: <Type>: <message>" when the
sample's own work failed on a worker (an unreadable video, a failed preprocessing): that sample's episodes
end there (empty ones when the prompt itself failed) and every other sample's run on; `failed(t)` tells
them apart and training/evaluation skip them (stats["failed_episodes"] counts them).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import envs, modeling, vision_forward
from ..chat import ChatTokens, num_media_tokens
from ..mrope import MRopeCursor
from ..protocol import parse_action
from . import attention as attn
from . import packed_forward
from .engine_step import EngineStep
from .kv_cache import PagedKVPool
from .media_inputs import preprocess_items
from .sampling import SamplingParams, rollout_key
from .scheduler import SchedulerConfig, make_scheduler
from .stopping import action_line_done, has_answer, has_line_break
from .trajectory import Trajectory

ERROR_PREFIX = "error: "   # finish_reason of an episode whose sample's media or preprocessing failed


def failed(traj) -> bool:
    """True for an episode ended by an error of its own sample (see the finish reasons above)."""
    return traj.finish_reason.startswith(ERROR_PREFIX)


class _Inline:
    """`num_workers=0`: an executor that runs each job as it is submitted and returns its finished Future."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args) -> Future:
        f = Future()
        try:
            f.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - _collect reads it from the Future, as from a worker's
            f.set_exception(e)
        return f


# --- per-sequence and per-group state --------------------------------------------------------------------


@dataclass
class _Block:
    """One vision block of a sequence: its item, the token index of its first pad, encoder outputs."""
    item: object
    offset: int
    embeds: torch.Tensor
    pixel_values: torch.Tensor
    grid: torch.Tensor


@dataclass
class _Group:
    gid: int
    sample_index: int
    seqs: list = field(default_factory=list)
    vision: dict = field(default_factory=dict)   # MediaItem.key -> (pixel_values, grid, embeds)
    prep: dict = field(default_factory=dict)     # MediaItem.key -> (pixel_values, grid), filled by workers
    lock: threading.Lock = field(default_factory=threading.Lock)
    forked: bool = False
    live: int = 0


class _SeqState:
    """What an engine step reads and writes for every sequence at once, as arrays indexed by a sequence's
    SLOT (`_Seq.slot`; slots are reused after a sequence finishes): its scheduler id, the round's tokens not
    yet moved to the `_Seq`'s lists (`pend` of them in rt_tok / rt_lp / rt_gen), its round length, the
    tokens the scheduler knows, its last token, the position of its next text token, its token count, its
    sampling key and (test hook) the round's scripted tokens, -1 where it samples. A decode step gathers its
    rows from these and appends its sampled tokens with a few numpy calls (engine_step.py); the Python paths
    go through `_Seq`, whose properties read and write the same arrays."""

    INTS = ("sid", "pend", "rl", "known", "last", "npos", "ntok")

    def __init__(self, width: int, cap: int = 64):
        self.width, self.cap, self.free = width, 0, []
        self._grow(cap)

    def _grow(self, cap: int) -> None:
        def grown(old, shape, dtype, fill=0):
            new = np.full(shape, fill, dtype=dtype)
            if old is not None:
                new[:len(old)] = old
            return new
        for f in self.INTS:
            setattr(self, f, grown(getattr(self, f, None), cap, np.int64))
        self.key = grown(getattr(self, "key", None), cap, np.uint64)
        W = self.width
        self.rt_tok = grown(getattr(self, "rt_tok", None), (cap, W), np.int64)
        self.rt_lp = grown(getattr(self, "rt_lp", None), (cap, W), np.float64)
        self.rt_gen = grown(getattr(self, "rt_gen", None), (cap, W), bool)
        self.forced = grown(getattr(self, "forced", None), (cap, W), np.int64, -1)
        self.free += range(cap - 1, self.cap - 1, -1)   # pop() hands out the lowest slot first
        self.cap = cap

    def alloc(self) -> int:
        if not self.free:
            self._grow(2 * self.cap)
        return self.free.pop()

    def release(self, r: int) -> None:
        self.pend[r] = 0
        self.free.append(r)


class _Seq:
    def __init__(self, sid, group, rollout_index, env, key, prompt_ids, prompt_pos, cursor, blocks, traj,
                 state: _SeqState):
        self.sid, self.group, self.rollout_index, self.env = sid, group, rollout_index, env
        self.A, self.slot = state, state.alloc()
        A, r = state, self.slot
        A.sid[r], A.pend[r], A.rl[r], A.known[r] = sid, 0, 0, len(prompt_ids)
        A.last[r], A.ntok[r], A.key[r] = prompt_ids[-1], len(prompt_ids), key
        self._tokens = list(prompt_ids)
        self._mask = [False] * len(prompt_ids)
        self._logprobs = [0.0] * len(prompt_ids)
        self.pos = torch.empty(3, max(256, 2 * len(prompt_ids)), dtype=torch.long)
        self.pos[:, :len(prompt_ids)] = prompt_pos
        self._pos_np = self.pos.numpy()   # same memory: numpy slices cost ~10x less than torch's
        # positions of tokens [0, written) are in `pos`; the text tokens appended since (sampled or injected)
        # are consecutive from `pending_pos`, written in one slice when needed (`flush_pos`), not per token
        self.written, self.pending_pos = len(prompt_ids), 0
        self.cursor = cursor
        self.blocks = list(blocks)
        self.traj = traj
        self.round_start = len(prompt_ids)
        self.truncated = False
        self.done = False
        self.sched_finished = False

    # the round's text tokens wait in the slot's arrays (`pend` of them); reading the lists or the cursor
    # moves them over first, so every Python reader sees the whole sequence
    def _synced(self) -> _Seq:
        if self.A.pend[self.slot]:
            self._flush()
        return self

    tokens = property(lambda self: self._synced()._tokens)
    mask = property(lambda self: self._synced()._mask)
    logprobs = property(lambda self: self._synced()._logprobs)

    @property
    def cursor(self) -> MRopeCursor:
        return self._synced()._cursor

    @cursor.setter
    def cursor(self, c: MRopeCursor) -> None:
        if getattr(self, "_cursor", None) is not None and self.A.pend[self.slot]:
            self._flush()
        self._cursor = c
        self.A.npos[self.slot] = c.next_position

    # round length, and the tokens the scheduler knows about: the slot's values
    round_len = property(lambda self: int(self.A.rl[self.slot]),
                         lambda self, n: self.A.rl.__setitem__(self.slot, n))
    known = property(lambda self: int(self.A.known[self.slot]),
                     lambda self, n: self.A.known.__setitem__(self.slot, n))

    def _flush(self) -> None:
        A, r = self.A, self.slot
        k = int(A.pend[r])
        if self.written == len(self._tokens):
            self.pending_pos = int(A.npos[r]) - k
        self._tokens += A.rt_tok[r, :k].tolist()
        self._mask += A.rt_gen[r, :k].tolist()
        self._logprobs += A.rt_lp[r, :k].tolist()
        A.pend[r] = 0
        self._cursor.next_position = int(A.npos[r])

    def append_text(self, tok: int, generated: bool, logprob: float) -> None:
        """Append one text token (sampled, or an injected <|im_end|>) at the next text position."""
        A, r = self.A, self.slot
        j = A.pend[r]
        A.rt_tok[r, j], A.rt_gen[r, j], A.rt_lp[r, j] = tok, generated, logprob
        A.pend[r] = j + 1
        A.last[r] = tok
        A.npos[r] += 1
        A.ntok[r] += 1

    def flush_pos(self) -> None:
        n, w = len(self.tokens), self.written
        if n > w:
            self._grow(n)
            self._pos_np[:, w:n] = np.arange(self.pending_pos, self.pending_pos + n - w)
            self.written = n

    def append_block(self, ids: list[int], p_3n: torch.Tensor) -> None:
        """Append prefilled (not generated) tokens with their positions (an observation turn)."""
        self.flush_pos()
        n0, k = len(self._tokens), len(ids)
        self._tokens.extend(ids)
        self._mask.extend([False] * k)
        self._logprobs.extend([0.0] * k)
        self._grow(n0 + k)
        self._pos_np[:, n0:n0 + k] = p_3n.numpy()   # numpy's slice copy: ~5x cheaper than torch's here
        self.written = n0 + k
        self.A.last[self.slot] = ids[-1]
        self.A.ntok[self.slot] += k

    def _grow(self, need: int) -> None:
        if need > self.pos.shape[1]:
            new = torch.empty(3, max(need, 2 * self.pos.shape[1]), dtype=torch.long)
            new_np = new.numpy()
            new_np[:, :self.written] = self._pos_np[:, :self.written]   # only the written positions
            self.pos, self._pos_np = new, new_np


def positions_for(cursor: MRopeCursor, ids: list[int], media: list, image_pad: int, video_pad: int) -> torch.Tensor:
    """(3, len(ids)) positions of appended ids; `media` = (kind, grid, second_per_grid_t) per pad run."""
    out, i, n, it = [], 0, len(ids), iter(media)
    while i < n:
        pad = ids[i] in (image_pad, video_pad)
        j = i + 1
        while j < n and (ids[j] in (image_pad, video_pad)) == pad and (not pad or ids[j] == ids[i]):
            j += 1
        if pad:
            kind, grid, sgt = next(it)
            p = cursor.vision(grid, video=kind == "video", second_per_grid_t=sgt)
            if p.shape[1] != j - i:
                raise ValueError(f"positions_for: a {kind} run of {j - i} pads, but its grid needs {p.shape[1]}")
            out.append(p)
        else:
            out.append(cursor.text(j - i))
        i = j
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


# --- the engine -------------------------------------------------------------------------------------------


class RolloutEngine(EngineStep):
    """KV memory: the paged pool is allocated when `generate` starts, sized from `kv_budget_tokens` or, when
    that is None, the byte budget `envs.kv_cache_bytes` read THEN (VIDEOCOM_KV_CACHE_MB; on CUDA 40% of the
    memory free at that moment, so what training freed counts), and dropped when `generate` returns: between
    rollouts (forward, backward, optimizer step) the engine holds no KV memory. `keep_kv_pool=True` keeps it
    for the next call (reused when the next call asks for the same number of blocks). `release_kv_pool()`
    drops a kept pool. The C++ kernel's pool (CPU) is left uninitialized: the kernel never reads a row past a
    sequence's context (tests/test_rollout.py poisons the pool with NaN), so only the pages KV is written to
    are touched; zero-filling the CPU's default 256 MiB cost 240 ms per generate (bench_rollout's small
    workload, 2-core EPYC: 24% -> 20% of the call outside the model, same run). SDPA's decode path reads
    whole blocks under a mask (a NaN survives it) and flash-attn's paged path is not proven here, so their
    pools are zero-filled (a memset on the GPU). Block size: None picks `attention.FLASH_BLOCK_SIZE` (256)
    when flash-attn's paged path will run, else 16.

    Workers: `num_workers` threads run the env, preprocessing and the observations' token ids while the
    other sequences decode; `num_workers=0` runs that work inline, on the calling thread, when a round ends
    (same trajectories). On a 2-core CPU the two run within 4% of each other (bench_rollout's
    rollout_env_inline group, session 17): the workers' Python holds the GIL that every model op wants back
    (video decoding releases it), so what they overlap the forwards lose."""

    def __init__(self, model, processor, *, max_rounds: int = 5, max_new_tokens: int = 512,
                 max_batch_tokens: int = 4096, kv_budget_tokens: int | None = None, block_size: int | None = None,
                 media_config=None, frame_cache=None, dtype=None, attention: str = "auto",
                 max_num_seqs: int = 256, scheduler_impl: str = "auto", num_workers: int = 1,
                 text_forward: str = "auto", env_factory=None, forced_rounds=None, keep_kv_pool: bool = False):
        for name, v, low in (("max_rounds", max_rounds, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("max_batch_tokens", max_batch_tokens, 1), ("block_size", block_size or 1, 1),
                             ("max_num_seqs", max_num_seqs, 1), ("num_workers", num_workers, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"RolloutEngine: {name} must be an int >= {low}, got {v!r}")
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat = ChatTokens(self.tokenizer)
        self.max_rounds, self.max_new_tokens = max_rounds, max_new_tokens
        self.media_config, self.frame_cache = media_config, frame_cache
        self.env_factory = env_factory
        # test-only hook: forced_rounds(sample_index, rollout_index, round_index) -> token ids or None;
        # scripted tokens replace sampling for that round (they still run the whole decode path)
        self.forced_rounds = forced_rounds
        self.scheduler_impl = scheduler_impl
        self.num_workers = num_workers
        m = modeling.inner(model)
        tc = m.language_model.config
        self.device = next(model.parameters()).device
        self.dtype = dtype or next(m.language_model.parameters()).dtype
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        choice = attention if attention != "auto" else envs.attention()
        self.attn_backend = attn.pick_backend(choice, self.device, self.dtype, head_dim, block_size)
        block_size = block_size or (attn.FLASH_BLOCK_SIZE if self.attn_backend == "flash" else 16)
        if kv_budget_tokens is not None and (isinstance(kv_budget_tokens, bool) or not isinstance(kv_budget_tokens, int)
                                             or kv_budget_tokens < block_size):
            raise ValueError(f"RolloutEngine: kv_budget_tokens must be None or an int >= block_size ({block_size}), "
                             f"got {kv_budget_tokens!r}")
        self.kv_budget_tokens, self.keep_kv_pool = kv_budget_tokens, keep_kv_pool
        self.pool: PagedKVPool | None = None     # allocated by generate (see the class docstring)
        # K transposed within blocks is what the C++ kernel reads; SDPA and flash-attn read the standard layout
        self._pool_shape = (tc.num_hidden_layers, block_size, tc.num_key_value_heads, head_dim)
        self._pool_layout = "k_transposed" if self.attn_backend == "cpp" else "standard"
        self.sched_config = SchedulerConfig(max_num_batched_tokens=max_batch_tokens, max_num_seqs=max_num_seqs,
                                            block_size=block_size, num_blocks=1, max_prefill_chunk=max_batch_tokens)
        if text_forward not in ("auto", "packed", "transformers"):
            raise ValueError(f"RolloutEngine: text_forward must be 'auto', 'packed' or 'transformers', "
                             f"got {text_forward!r}")
        self.text_forward = text_forward
        c = self.chat
        self.suppress_ids = torch.tensor([c.vision_start, c.vision_end, c.image_pad, c.video_pad, c.im_start],
                                         device=self.device)
        self._pieces: dict[int, str] = {}
        self._may_end = np.full(1024, -1, dtype=np.int8)   # token id -> may it end a round? 1 / 0, -1: unseen
        self._vision_fwd = None   # vision_forward.VisionForward, kept across generate() calls (grid-plan cache)
        self.stats: dict = {}

    # --- public ---------------------------------------------------------------------------------------

    def generate(self, samples, *, num_generations: int = 8, temperature: float = 0.9, top_k: int = 50,
                 top_p: float = 1.0, greedy: bool = False, seed: int = 0) -> list[list[Trajectory]]:
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(f"generate: num_generations must be an int >= 1, got {num_generations!r}")
        samples = list(samples)
        self.params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        self.G, self.seed = num_generations, seed
        t0 = time.perf_counter()   # the call's wall time includes acquiring the KV pool
        self._acquire_pool()
        try:
            return self._generate(samples, t0)
        finally:
            if not self.keep_kv_pool:
                self.release_kv_pool()

    def _generate(self, samples, t0: float) -> list[list[Trajectory]]:
        num_generations = self.G
        self.sched = make_scheduler(self.sched_config, self.scheduler_impl)
        self.results = [[None] * num_generations for _ in samples]
        self.seqs: dict[int, _Seq] = {}
        self.groups: dict[int, _Group] = {}
        # the step's per-sequence arrays (a round: <= max_new_tokens sampled tokens + an injected <|im_end|>)
        self.seq_state = _SeqState(self.max_new_tokens + 2)
        self._slot_of = np.zeros(64, dtype=np.int64)   # scheduler seq id -> slot in seq_state
        self._seq_at: dict[int, _Seq] = {}              # slot -> its live sequence
        self.stats = dict(generated_tokens=0, prefill_tokens=0, decode_tokens=0, prefill_tokens_saved=0,
                          prefix_tokens_shared=0, kv_reuse_tokens=0, visual_tokens=0, vision_tokens_encoded=0,
                          vision_cache_hits=0, vision_cache_misses=0, wall_s=0.0, model_s=0.0, vision_s=0.0,
                          env_s=0.0, env_wait_s=0.0, steps=0, preemptions=0, kv_budget_finishes=0, rounds=0,
                          attention=attn.LABELS[self.attn_backend], kv_pool_blocks=self.sched_config.num_blocks,
                          kv_pool_bytes=self.pool.nbytes, block_size=self.pool.block_size)
        self.stats["kv_pool_s"] = time.perf_counter() - t0
        self.packed = self._packed_forward()
        self._graphs = self._decode_graphs()
        self.vision = self._vision_forward()
        prev_attn = modeling.inner(self.model).language_model.config._attn_implementation
        self.model.set_attn_implementation({"text_config": attn.register()})
        try:
            pool = ThreadPoolExecutor(self.num_workers) if self.num_workers else _Inline()
            with pool as workers, torch.no_grad():
                self.workers = workers
                self._run(samples)
        finally:
            self.model.set_attn_implementation({"text_config": prev_attn})
            self.workers = None
            # the fused (concatenated) weights are a copy: not held between rollouts (docs/memory_7b.md)
            if self.packed is not None:
                self.packed.release()
            self._graphs = None      # they hold the pool's and the fused weights' addresses
        st = self.stats
        st["wall_s"] = time.perf_counter() - t0
        st["prefill_tokens_saved"] = st["prefix_tokens_shared"] + st["kv_reuse_tokens"]
        st["outside_model_frac"] = 1.0 - (st["model_s"] + st["vision_s"]) / max(st["wall_s"], 1e-9)
        st["scheduler"] = self.sched.stats()
        self.sched = None
        return self.results

    def release_kv_pool(self) -> None:
        """Drop the KV pool (its memory returns to the allocator: on CUDA, to the caching allocator that
        the training step allocates from next)."""
        self.pool = None

    def _acquire_pool(self) -> None:
        """Size the pool for this call (the budget read now, not at construction) and allocate it, or reuse a
        kept pool of the same size."""
        layers, bs, hkv, hd = self._pool_shape
        tokens = self.kv_budget_tokens
        if tokens is None:   # a byte budget turned into tokens for this model; a kept pool counts as free
            per_token = 2 * layers * hkv * hd * self.dtype.itemsize
            held = self.pool.nbytes if self.pool is not None else 0
            tokens = max(bs, envs.kv_cache_bytes(self.device, held_bytes=held) // per_token)
        num_blocks = -(-tokens // bs)
        scratch = int(self.PAD_DECODES or self.CUDA_GRAPHS)   # padded decode rows' block (engine_step)
        if self.pool is None or self.pool.num_blocks != num_blocks + scratch:
            self.pool = None    # NOTE: the old pool is freed before the new one is allocated
            fill = 0.0 if attn.reads_unwritten_rows(self.attn_backend) else None
            self.pool = PagedKVPool(layers, num_blocks + scratch, bs, hkv, hd, dtype=self.dtype, device=self.device,
                                    layout=self._pool_layout, fill=fill)
        self._scratch_block = num_blocks if scratch else None
        self.sched_config = dataclasses.replace(self.sched_config, num_blocks=num_blocks)

    def _packed_forward(self):
        """The packed text forward when the model allows it (checked per call: hooks and adapters come and
        go), else None (transformers' forward with the registered paged attention)."""
        if self.text_forward == "transformers":
            return None
        reason = packed_forward.supports(self.model)
        if reason is None:
            return packed_forward.PackedForward(self.model)
        if self.text_forward == "packed":
            raise ValueError(f"RolloutEngine: text_forward='packed' cannot run this model ({reason})")
        return None

    def _vision_forward(self):
        """(pixel_values on the device, host grids, video) -> embeddings: vision_forward.VisionForward when the
        model allows it (checked per call of generate, like the packed text forward), else transformers' tower."""
        if self.text_forward != "transformers" and vision_forward.supports(self.model) is None:
            if self._vision_fwd is None:
                self._vision_fwd = vision_forward.VisionForward(self.model)
            return lambda pv, grids, video: self._vision_fwd(pv, grids)   # host grids: its plan reads no device value
        return lambda pv, grids, video: modeling.vision_embeds(self.model, pv, grids.to(self.device), video=video,
                                                               patch_matmul=True)

    # --- main loop ------------------------------------------------------------------------------------

    def _run(self, samples) -> None:
        todo = deque(enumerate(samples))
        self.futures: dict = {}    # Future -> ("prompt", sample_index) | ("obs", _Seq)
        self._done: deque = deque()  # futures as they complete (their callbacks append here, on any thread)
        self._prompts_pending = 0
        max_groups = max(2, -(-self.sched_config.max_num_seqs // self.G))
        while todo or self.futures or self.groups:
            while todo and len(self.groups) + self._prompts_pending < max_groups:
                i, s = todo.popleft()
                self._submit(("prompt", i), self._prepare_prompt, s)
            self._collect(block=False)
            out = self.sched.schedule_arrays()
            self.stats["preemptions"] += len(out.preempted)
            for sid in out.finished:
                s = self.seqs[sid]
                s.sched_finished = True
                self.stats["kv_budget_finishes"] += 1
                self._finish(s, "kv_budget")
            if len(out.seq_ids):
                self._step(out)
            elif self.futures:
                self._collect(block=True)
            elif self.groups or todo:
                raise RuntimeError(f"RolloutEngine: no sequence can run and no work is pending "
                                   f"(scheduler stats {self.sched.stats()})")

    def _collect(self, block: bool) -> None:
        """Apply finished background work: new prompts (groups) and observations; one vision call per kind."""
        if not self.futures:
            return
        done = []
        if block and not self._done:
            t = time.perf_counter()
            fin, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
            done = [f for f in self.futures if f in fin]
            self.stats["env_wait_s"] += time.perf_counter() - t
        while self._done:   # NOTE: a callback may append while this drains: it is taken now or next step
            done.append(self._done.popleft())
        if not done:
            return
        ready = []
        for f in done:
            tag = self.futures.pop(f, None)
            if tag is None:   # taken from `wait` before its callback ran
                continue
            kind, who = tag
            self._prompts_pending -= kind == "prompt"
            try:
                ready.append((kind, who, f.result()))
            except Exception as e:  # noqa: BLE001 - one sample's bad media must not lose the whole batch
                self._fail(kind, who, e)
        # vision tower once per kind over every item not cached yet (per group cache by MediaItem.key)
        need: dict = {}
        for kind, who, res in ready:
            group = None if kind == "prompt" else who.group
            if kind == "obs" and who.done:
                continue
            items, prep = res[1], res[2]
            for item, (pv, grid) in zip(items, prep):
                if group is not None and item.key in group.vision:
                    continue
                need.setdefault((id(group), item.key), (item, pv, grid))
        by_kind: dict = {"image": [], "video": []}
        for k, (item, pv, grid) in need.items():
            by_kind[item.kind].append((k, pv, grid))
        computed = {}
        t = time.perf_counter()
        for kind, lst in by_kind.items():
            if not lst:
                continue
            pv = (lst[0][1] if len(lst) == 1 else torch.cat([p for _, p, _ in lst])).to(self.device)
            grids = torch.stack([g for _, _, g in lst])   # (n, 3) on the host (each tower moves what it needs)
            embs = self.vision(pv, grids, kind == "video")
            for (k, p, g), e in zip(lst, embs):
                computed[k] = (p, g, e)
                self.stats["vision_tokens_encoded"] += e.shape[0]
        self.stats["vision_s"] += time.perf_counter() - t
        for kind, who, res in ready:
            if kind == "prompt":
                env, items, prep, dt = res
                self.stats["env_s"] += dt
                self._add_group(who, env, items[0], computed[(id(None), items[0].key)])
            elif not who.done:
                obs, items, prep, dt, turn = res
                self.stats["env_s"] += dt
                enc = []
                for item in items:
                    hit = who.group.vision.get(item.key)
                    if hit is None:
                        hit = who.group.vision[item.key] = computed[(id(who.group), item.key)]
                        self.stats["vision_cache_misses"] += 1
                    else:
                        self.stats["vision_cache_hits"] += 1
                    enc.append(hit)
                self._apply_observation(who, obs, enc, turn)

    def _submit(self, tag, fn, *args) -> None:
        """Run fn(*args) on a worker; `_collect` applies its result once done (tag: what it is for)."""
        f = self.workers.submit(fn, *args)
        self.futures[f] = tag
        self._prompts_pending += tag[0] == "prompt"
        f.add_done_callback(self._done.append)

    def _fail(self, kind: str, who, e: Exception) -> None:
        """End the episodes of the job that raised with finish reason "error: <Type>: <message>"."""
        reason = ERROR_PREFIX + f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
        self.stats["failed_episodes"] = self.stats.get("failed_episodes", 0)
        if kind == "prompt":   # no group was made: G empty episodes carry the reason
            for r in range(self.G):
                self.results[who][r] = Trajectory(sample_index=who, rollout_index=r, finish_reason=reason)
            self.stats["failed_episodes"] += self.G
        elif not who.done:     # the round that asked for the observation keeps its text, no action ran
            who.traj.actions.append(None)
            who.traj.observations.append(None)
            self.stats["failed_episodes"] += 1
            self._finish(who, reason)

    # --- worker-thread jobs (no model calls) -----------------------------------------------------------

    def _make_env(self, sample):
        if self.env_factory is not None:
            return self.env_factory(sample)
        from ..env import ManipulationEnv, MediaConfig
        return ManipulationEnv(sample, cache=self.frame_cache, config=self.media_config or MediaConfig())

    def _prepare_prompt(self, sample):
        # NOTE: the prompt's token ids and positions stay on the step loop (`_add_group`). Built here, on the
        # worker, they lowered the share of time outside the model but not the wall time: session 17 25.1 ->
        # 24.3%, 1.48 -> 1.54 s; session 19 22.1 -> 20.3%, wall within the machine's noise, ~25% more steps
        t = time.perf_counter()
        env = self._make_env(sample)
        item = env.main_video()
        prep = preprocess_items([item], self.processor, self.dtype)
        return env, [item], prep, time.perf_counter() - t

    def _run_env(self, env, group: _Group, text: str, cursor: MRopeCursor):
        """env.step, preprocessing (once per group and media key: the G rollouts of a group often ask for
        the same segment, frame or crop) and the observation's token ids and positions (from `cursor`, a
        copy of the sequence's, taken when its round ended)."""
        t = time.perf_counter()
        obs = env.step(text)
        prep = []
        for item in obs.media:
            with group.lock:
                hit = group.prep.get(item.key)
            if hit is None:
                hit = preprocess_items([item], self.processor, self.dtype)[0]
                with group.lock:
                    hit = group.prep.setdefault(item.key, hit)
            prep.append(hit)
        turn = None
        if not obs.done:
            c = self.chat
            grids = [g for _, g in prep]
            ids = c.observation(obs.text, [(it.kind, num_media_tokens(g)) for it, g in zip(obs.media, grids)])
            media = [(it.kind, g, it.second_per_grid_t) for it, g in zip(obs.media, grids)]
            pos = positions_for(cursor, ids, media, c.image_pad, c.video_pad)
            turn = (ids, pos, cursor, [i for i, x in enumerate(ids) if x == c.vision_start])
        return obs, list(obs.media), prep, time.perf_counter() - t, turn

    # --- groups and observations ----------------------------------------------------------------------

    def _add_group(self, sample_index: int, env, item, enc) -> None:
        pv, grid, emb = enc
        c = self.chat
        ntok = num_media_tokens(grid)
        ids = c.prompt(env.question, [(item.kind, ntok)])
        cursor = MRopeCursor(tokens_per_second=self._tps(), spatial_merge=self._merge())
        pos = positions_for(cursor, ids, [(item.kind, grid, item.second_per_grid_t)], c.image_pad, c.video_pad)
        offset = ids.index(c.video_pad if item.kind == "video" else c.image_pad)
        group = _Group(gid=sample_index, sample_index=sample_index, live=self.G)
        group.vision[item.key] = enc
        sids = self.sched.add_group(sample_index, len(ids), self.G)
        block = _Block(item, offset, emb, pv, grid)
        if max(sids) >= len(self._slot_of):
            self._slot_of = np.concatenate([self._slot_of, np.zeros(max(sids) + 1, dtype=np.int64)])
        for r, sid in enumerate(sids):
            traj = Trajectory(sample_index=sample_index, rollout_index=r)
            s = _Seq(sid, group, r, env.fork(), rollout_key(self.seed, sample_index, r), ids, pos,
                     cursor.copy(), [block], traj, self.seq_state)
            group.seqs.append(s)
            self.seqs[sid] = s
            self._slot_of[sid] = s.slot
            self._seq_at[s.slot] = s
            self._script_round(s)
        self.groups[sample_index] = group

    def _script_round(self, s: _Seq) -> None:
        """Test hook: the scripted tokens of the round `s` starts now (-1: sample), read per token."""
        if self.forced_rounds is None:
            return
        row = self.seq_state.forced[s.slot]
        row[:] = -1
        script = self.forced_rounds(s.group.sample_index, s.rollout_index, len(s.traj.rounds))
        if script is not None:
            k = min(len(script), len(row))
            row[:k] = list(script)[:k]

    def _apply_observation(self, s: _Seq, obs, enc, turn) -> None:
        t = s.traj
        t.actions.append(obs.action)
        t.observations.append(obs)
        if obs.done:
            self._finish(s, "answer")
            return
        ids, pos, s.cursor, starts = turn   # starts: the observation's <|vision_start|> indices
        base = len(s.tokens)
        self.stats["kv_reuse_tokens"] += base
        for item, (pv, g, e), st in zip(obs.media, enc, starts):
            s.blocks.append(_Block(item, base + st + 1, e, pv, g))
        s.append_block(ids, pos)
        s.round_start, s.round_len, s.truncated = len(s.tokens), 0, False
        self._script_round(s)
        self._sync(s)

    def _sync(self, s: _Seq) -> None:
        n = len(s.tokens) - s.known
        if n:
            self.sched.append_tokens(s.sid, n)
            s.known += n

    # --- tokens, rounds, finishing ----------------------------------------------------------------------

    def _piece(self, tok: int) -> str:
        p = self._pieces.get(tok)
        if p is None:
            p = self._pieces[tok] = self.tokenizer.decode([tok])
        return p

    def _on_token(self, s: _Seq, tok: int, lp: float) -> None:
        s.append_text(tok, True, lp)
        s.round_len += 1
        if tok == self.chat.im_end:
            self._end_round(s, sampled_end=True)
        elif has_line_break(self._piece(tok)) and action_line_done(
                text := self.chat.decode(s.tokens[s.round_start:])):
            self._end_round(s, sampled_end=False, text=text)
        elif s.round_len >= self.max_new_tokens:
            s.truncated = True
            self._end_round(s, sampled_end=False)
        else:
            self._sync(s)

    def _end_round(self, s: _Seq, sampled_end: bool, text: str | None = None) -> None:
        """`text`: the round's text when the caller decoded it already (without a sampled <|im_end|>)."""
        end = len(s.tokens)
        if text is None:
            text = self.chat.decode(s.tokens[s.round_start:end - (1 if sampled_end else 0)])
        if not sampled_end:   # injected <|im_end|>: keeps Qwen's turn format, never trained on
            s.append_text(self.chat.im_end, False, 0.0)
        t = s.traj
        t.rounds.append((s.round_start, end))
        t.round_texts.append(text)
        self.stats["rounds"] += 1
        if has_answer(text):
            obs = s.env.step(text)
            t.actions.append(obs.action)
            t.observations.append(obs)
            if obs.done:
                self._finish(s, "answer")
                return
            t.actions.pop()
            t.observations.pop()
        if len(t.rounds) >= self.max_rounds:
            t.actions.append(parse_action(text))
            t.observations.append(None)
            self._finish(s, "max_new_tokens" if s.truncated else "max_rounds")
            return
        self.sched.await_observation(s.sid)
        self._submit(("obs", s), self._run_env, s.env, s.group, text, s.cursor.copy())

    def _finish(self, s: _Seq, reason: str) -> None:
        if s.done:
            return
        s.done = True
        if not s.sched_finished:
            self.sched.finish(s.sid)
        t = s.traj
        if reason == "kv_budget" and s.round_len and (not t.rounds or t.rounds[-1][0] != s.round_start):
            t.rounds.append((s.round_start, len(s.tokens)))   # the partial round it was generating
            t.round_texts.append(self.chat.decode(s.tokens[s.round_start:]))
            t.actions.append(None)
            t.observations.append(None)
        t.finish_reason = reason
        t.token_ids, t.generated_mask, t.logprobs = s.tokens, s.mask, s.logprobs
        s.flush_pos()
        t.position_ids = s.pos[:, :len(s.tokens)].clone()
        t.media = [b.item for b in s.blocks]
        imgs = [b for b in s.blocks if b.item.kind == "image"]
        vids = [b for b in s.blocks if b.item.kind == "video"]
        if imgs:
            t.pixel_values = [b.pixel_values for b in imgs]      # concatenated when read
            t.image_grid_thw = torch.stack([b.grid for b in imgs]).long()
        if vids:
            t.pixel_values_videos = [b.pixel_values for b in vids]
            t.video_grid_thw = torch.stack([b.grid for b in vids]).long()
            t.second_per_grid_ts = torch.tensor([float(b.item.second_per_grid_t) for b in vids])
        self.stats["visual_tokens"] += sum(b.embeds.shape[0] for b in s.blocks)
        g = s.group
        self.results[g.sample_index][s.rollout_index] = t
        del self.seqs[s.sid]
        del self._seq_at[s.slot]
        self.seq_state.release(s.slot)
        env = [s.env]
        s.env = s.blocks = s.A = None   # a late read of a finished sequence fails loudly
        g.live -= 1
        if g.live == 0:
            g.seqs.clear()
            g.vision.clear()
            g.prep.clear()
            del self.groups[g.gid]
            # the group's last env holds the last reference to its video source, and closing a decoder costs
            # 0.4-5 ms (PyAV, 2-core Xeon): a worker drops it, not the step loop
            self.workers.submit(env.clear)

    # --- model facts --------------------------------------------------------------------------------------

    def _tps(self) -> float:
        return modeling.inner(self.model).config.vision_config.tokens_per_second

    def _merge(self) -> int:
        return modeling.inner(self.model).config.vision_config.spatial_merge_size
