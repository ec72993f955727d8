"""One engine step of RolloutEngine (issue 16), split from engine.py at the step seam: `EngineStep` is the
engine's step half (a mixin; the engine supplies the state: model, pool, scheduler, sequences, stats).

Per step: the scheduler's flat arrays (`schedule_arrays`: no Python object per chunk) -> `_chunk_rows`: ids,
positions, KV slots, per-chunk metadata and media rows, the decodes gathered at once from the per-sequence
arrays (engine._SeqState: last token, next position, ...), prefill chunks from their sequence's lists;
`_step` (the lean step) does all host bookkeeping first, then ONE upload, `_forward` (embeddings, the packed
or transformers text forward, lm_head on the sampling rows), the sampler on the device and ONE download;
`_on_tokens` appends the tokens that end nothing to their slots' round arrays at once (one C++ call,
`_C.hand_off`), the others go through the engine's `_on_token`. `_step_unfused` is the previous step
(per-tensor uploads, per-token hand-off), kept as bench/bench_engine_step.py's baseline and running the same
`_forward`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import modeling
from . import attention as attn
from . import fused_step as fused
from . import packed_forward
from .decode_graphs import DecodeGraphs
from .kv_cache import StepCache
from .sampling import counter_uniforms, sample
from .stopping import has_line_break

try:   # the C++ token hand-off and uniforms (csrc/scheduler/hand_off.cpp); numpy when the extension is not built
    from videocom_fast._C import gather_uniforms as _gather_uniforms, hand_off as _hand_off
except ImportError:
    _gather_uniforms = _hand_off = None


class EngineStep:
    # The lean step (issue 16): all host bookkeeping first (scheduler updates, forks, who samples, their uniforms
    # and scripted tokens), then ONE upload of the step's metadata from a staging buffer (pinned when CUDA is
    # available; non-blocking), the attention backend's included (PagedBatch.stage / bind: cu_seqlens, block
    # tables), the forward with no host reads of device values (packed_forward.py: 10 kernels per layer), the
    # sampler on the device, and ONE download of the sampled ids with their log-probs (tests/test_standin_generate.py
    # counts both over a whole generate).
    # `step_impl = "unfused"` runs the previous step (op by op, per-tensor uploads): bench_engine_step's baseline.
    step_impl = "lean"
    # CUDA graphs for decode-only steps (decode_graphs.py): OFF until `make gpu-check` has validated capture
    # on a GPU (its "engine_graphs" row: host and GPU ms per step with and without graphs). They need the
    # packed forward and the Triton attention (no host value in the forward) and pad decodes whatever
    # PAD_DECODES says; `GRAPH_CAPTURE` None captures CUDA graphs (decode_graphs.cuda_capture), tests set
    # record_capture.
    # PAD_DECODES (the shapes a capture needs, testable without a GPU):
    # a decode-only step of n sequences runs decode_bucket(n) rows; the padded rows are decodes of token 0 at
    # position 0 whose K/V go to a SCRATCH block (one block past the scheduler's, allocated only then) and
    # whose attention reads only that block; no padded row is sampled. Off by default: on the CPU padding is
    # pure extra work.
    CUDA_GRAPHS = False
    GRAPH_CAPTURE = None     # a staticmethod when set
    PAD_DECODES = False
    _graphs = None
    DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)

    @classmethod
    def decode_bucket(cls, n: int) -> int:
        """The padded batch size of a decode-only step of n sequences (the shape a captured graph would have)."""
        for b in cls.DECODE_BUCKETS:
            if n <= b:
                return b
        return n

    def _pad_decodes(self, rows, decode_only: bool):
        """A decode-only step's rows (`_chunk_rows`' tuple) padded up to its decode bucket (a new tuple)."""
        ids, pos, slots, q_starts, q_lens, ctx, media_rows, (t_off, t_ids) = rows
        n = len(ids)
        k = self.decode_bucket(n) - n
        if not decode_only or not k:
            return rows
        scratch = self._scratch_block
        def pad(a, v):
            return np.concatenate([a, np.full(a.shape[:-1] + (k,), v, dtype=a.dtype)], axis=-1)
        # every padded row writes the scratch block's row 0 and attends to that one row
        return (pad(ids, 0), pad(pos, 0), pad(slots, scratch * self.pool.block_size),
                np.concatenate([q_starts, np.arange(n, n + k)]), pad(q_lens, 1), pad(ctx, 1), media_rows,
                (np.concatenate([t_off, t_off[-1] + np.arange(1, k + 1)]), pad(t_ids, scratch)))

    def _chunk_rows(self, a):
        """A step's rows from the scheduler's flat arrays `a` (ScheduleArrays): token ids (L,), positions
        (3, L), KV slots (L,), per-chunk query starts / lengths / context lengths (C,), media rows (row, n,
        embeds, first embed row) and the block tables (table_off, table_ids). Decodes (one sampled token
        each) are gathered from the per-sequence arrays at once; prefill chunks read their sequence's
        lists."""
        bs, A = self.pool.block_size, self.seq_state
        q_lens, starts = a.num_tokens, a.starts
        C = len(q_lens)
        q_starts = np.zeros(C, dtype=np.int64)
        np.cumsum(q_lens[:-1], out=q_starts[1:])
        L = int(q_starts[-1] + q_lens[-1])
        ids, slots, pos = (np.empty(shape, dtype=np.int64) for shape in (L, L, (3, L)))
        dec = ~a.is_prefill
        rows, d_start, r = q_starts[dec], starts[dec], self._slot_of[a.seq_ids[dec]]
        ids[rows] = A.last[r]            # the token sampled last step, at the position after the previous one
        pos[:, rows] = A.npos[r] - 1
        slots[rows] = a.table_ids[a.table_off[:-1][dec] + d_start // bs] * bs + d_start % bs
        media_rows = []
        for i in np.flatnonzero(a.is_prefill).tolist():
            s = self.seqs[int(a.seq_ids[i])]
            st, n, row = int(starts[i]), int(q_lens[i]), int(q_starts[i])
            b = st + n
            s.flush_pos()
            ids[row:row + n] = s.tokens[st:b]
            pos[:, row:row + n] = s._pos_np[:, st:b]
            p = np.arange(st, b)
            slots[row:row + n] = a.table_ids[a.table_off[i] + p // bs] * bs + p % bs
            for blk in s.blocks:
                lo, hi = max(st, blk.offset), min(b, blk.offset + blk.embeds.shape[0])
                if lo < hi:
                    media_rows.append((row + lo - st, hi - lo, blk.embeds, lo - blk.offset))
        self.stats["decode_tokens"] += len(rows)
        self.stats["prefill_tokens"] += L - len(rows)
        return ids, pos, slots, q_starts, q_lens, starts + q_lens, media_rows, (a.table_off, a.table_ids)

    def _step(self, a) -> None:
        if self.step_impl == "unfused":
            return self._step_unfused(a)
        rows = self._chunk_rows(a)
        decode_only = False     # read only when padding (graphs pad too): a per-step array scan otherwise
        if self.PAD_DECODES or self.CUDA_GRAPHS:
            decode_only = not a.is_prefill.any()
            rows = self._pad_decodes(rows, decode_only)
        ids, pos, slots, q_starts, q_lens, ctx, media_rows, tables = rows
        smp = np.flatnonzero(a.samples)                       # the sampling chunks, in chunk order
        head_rows = q_starts[smp] + q_lens[smp] - 1
        meta = attn.PagedBatch(self.pool, q_starts, q_lens, ctx, backend=self.attn_backend, csr=tables)
        # NOTE: read the block tables now, before the scheduler's updates and forks below
        n_attn = meta.staged_size()
        if meta.cpp_chunks:
            meta.cpp_meta()
        self.sched.update_many(a.seq_ids, a.num_tokens)
        who, who_rows, copies = self._forks(a, smp)
        A = self.seq_state
        L, N, W = len(ids), len(smp), len(who)
        forced = None
        if self.forced_rounds is not None and W:
            forced = A.forced[who, A.rl[who]]
            if not (forced >= 0).any():
                forced = None
        greedy = self.params.greedy

        # host staging: [ids L | positions 3L | slots L | head rows N | logit rows W | forced W | uniforms W |
        # attention metadata A (flash / SDPA backends: cu_seqlens, block tables, ...)]
        o_pos, o_slot, o_rows, o_who, o_forced, o_u = L, 4 * L, 5 * L, 5 * L + N, 5 * L + N + W, 5 * L + N + 2 * W
        o_attn = o_u + W
        end = o_attn + n_attn
        host_t, buf = self._staging(end)
        buf[:L] = ids
        buf[o_pos:o_slot] = pos.reshape(-1)
        buf[o_slot:o_rows] = slots
        buf[o_rows:o_who] = head_rows
        buf[o_who:o_forced] = who_rows
        buf[o_forced:o_u] = forced if forced is not None else -1
        if W and not greedy:   # counter-based: the draw of token i of a rollout is a function of (key, i)
            u = buf[o_u:o_u + W].view(np.float64)
            if _gather_uniforms is not None:
                _gather_uniforms(who, A.key, A.ntok, u)
            else:
                u[:] = counter_uniforms(A.key[who], A.ntok[who])
        meta.stage(buf[o_attn:end])
        dev = self._upload(host_t, end)
        meta.bind(dev[o_attn:end])

        if self._graphs is not None and decode_only and N and L in self.DECODE_BUCKETS:
            logits_NV = self._graph_forward(dev[:L], dev[o_pos:o_slot].view(3, L), dev[o_slot:o_rows], meta,
                                            dev[o_rows:o_who])
        else:
            logits_NV = self._forward(dev[:L], dev[o_pos:o_slot].view(3, L), dev[o_slot:o_rows], meta,
                                      media_rows, dev[o_rows:o_who] if N else None)
        for src, dst, n in copies:   # forks' partial blocks, after the forward wrote the leader's rows
            self.pool.copy_rows(src, dst, n)
        if not W:
            return
        logits = logits_NV if W == N else logits_NV.index_select(0, dev[o_who:o_forced])
        tokens, lps = sample(logits, self.params, suppress_ids=self.suppress_ids,
                             uniforms=None if greedy else dev[o_u:o_u + W].view(torch.float64),
                             forced=dev[o_forced:o_u] if forced is not None else None)
        self.stats["generated_tokens"] += W
        if tokens.device.type == "cpu":   # the CPU sampler's own output buffers: nothing to download
            return self._on_tokens(who, tokens.numpy(), lps.numpy())
        # the step's one download (and its one sync): ids as float64 (exact below 2^53) beside their log-probs
        tok_lp = torch.stack((tokens.to(torch.float64), lps.to(torch.float64))).cpu().numpy()
        self._on_tokens(who, tok_lp[0].astype(np.int64), tok_lp[1])

    def _on_tokens(self, who, toks, lps) -> None:
        """Hand the sampled tokens (W,) to their sequences (slots `who`). Most tokens end nothing: they are
        appended to their slot's round arrays at once and the scheduler learns of them in one call; a token
        that may end its round (<|im_end|>, a line break, the round's last allowed token) goes through
        `_on_token`. The C++ hand-off (`_C.hand_off`) when built, else numpy (the same writes)."""
        A = self.seq_state
        if _hand_off is not None:   # a token not classified yet takes the per-token path, then is classified
            end, sids = _hand_off(who, toks, lps, self._may_end, self.max_new_tokens, A.sid, A.pend, A.rl,
                                  A.npos, A.ntok, A.known, A.last, A.rt_tok, A.rt_lp, A.rt_gen)
            if len(sids):
                self.sched.append_one_each(sids)
            if len(end):
                self._classify(toks[end])
        else:
            self._classify(toks)
            ends = self._may_end[toks].view(bool) | (A.rl[who] >= self.max_new_tokens - 1)
            end, plain = np.flatnonzero(ends), ~ends
            if plain.any():
                r, t = who[plain], toks[plain]
                j = A.pend[r]
                A.rt_tok[r, j], A.rt_lp[r, j], A.rt_gen[r, j] = t, lps[plain], True
                A.last[r] = t
                for f in (A.pend, A.rl, A.npos, A.ntok, A.known):
                    f[r] += 1
                self.sched.append_one_each(A.sid[r])
        for k in end.tolist():
            self._on_token(self._seq_at[int(who[k])], int(toks[k]), float(lps[k]))

    def _classify(self, toks: np.ndarray) -> None:
        """Make `self._may_end` (a vocabulary table: 1 / 0, -1 not seen yet) cover `toks`: may each end its
        round (<|im_end|>, or its text holds a line break)? Filled as tokens are first seen."""
        tab, top = self._may_end, int(toks.max(initial=0))
        if top >= len(tab):
            old, tab = tab, np.full(max(top + 1, 2 * len(tab)), -1, dtype=np.int8)
            tab[:len(old)] = old
            self._may_end = tab
        m = tab[toks]
        if m.min(initial=0) < 0:
            for t in np.unique(toks[m < 0]).tolist():
                tab[t] = t == self.chat.im_end or has_line_break(self._piece(t))

    def _forward(self, ids_L, pos_3L, slots_L, meta, media_rows, head_rows):
        """The step's model work, shared by both step implementations: embeddings (media rows scattered in), the
        text forward (the packed one when the model allows it, else transformers' modules with the paged
        attention hook), and the float32 logits of `head_rows` (None when no row samples)."""
        t0 = time.perf_counter()
        x_LD = modeling.inner(self.model).get_input_embeddings()(ids_L)
        for row, n, emb, src in media_rows:
            x_LD[row:row + n] = emb[src:src + n].to(x_LD.dtype)
        if self.packed is not None:
            hidden_LD = self.packed(x_LD, pos_3L, slots_L, meta)
        else:
            hidden_LD = modeling.text_forward(self.model, x_LD[None], pos_3L[:, None, :],
                                              past_key_values=StepCache(self.pool, slots_L),
                                              attention_mask={"full_attention": None, "sliding_attention": None},
                                              paged=meta)[0]
        logits_NV = None
        if head_rows is not None:
            logits_NV = modeling.lm_head(self.model)(hidden_LD.index_select(0, head_rows)).float()
        self.stats["model_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        return logits_NV

    def _decode_graphs(self):
        """A DecodeGraphs for this generate when CUDA_GRAPHS is on and the step can be captured, else None;
        the reason it cannot goes to stats["cuda_graphs"]."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        why = ("off" if not self.CUDA_GRAPHS else
               "needs the packed text forward" if self.packed is None or not self.packed.fused else
               f"needs the triton attention (this engine's: {self.attn_backend})"
               if self.attn_backend != "triton" else
               "needs a CUDA device or a GRAPH_CAPTURE"
               if self.device.type != "cuda" and not self.GRAPH_CAPTURE else
               "the CPU's direct C++ kernels are invisible to a capture (fused_step.force_impl('torch'))"
               if fused.use_cpp(probe) else None)
        self.stats["cuda_graphs"] = why or "on"
        if why:
            return None
        return DecodeGraphs(self._static_forward, self.pool, capture=self.GRAPH_CAPTURE)

    def _static_forward(self, ids_B, pos_3B, slots_B, meta):
        """What a decode graph captures: embeddings and the packed forward of all B rows: hidden (B, D). The
        lm_head runs outside, on the sampled rows only: a graph's (B, V) logits would stay allocated (156 MB
        in float32 at B = 256 for Qwen2.5-VL's vocabulary) per captured bucket."""
        x_BD = modeling.inner(self.model).get_input_embeddings()(ids_B)
        return self.packed(x_BD, pos_3B, slots_B, meta)

    def _graph_forward(self, ids_B, pos_3B, slots_B, meta, head_rows):
        """`_forward` of a padded decode-only step through its captured graph: the sampled rows' logits."""
        t0 = time.perf_counter()
        hidden_ND = self._graphs.run(ids_B, pos_3B, slots_B, meta).index_select(0, head_rows)
        logits_NV = modeling.lm_head(self.model)(hidden_ND).float()
        self.stats["model_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        self.stats["graph_steps"] = self._graphs.replays
        self.stats["graph_captures"] = self._graphs.captures
        return logits_NV

    def _forks(self, a, smp):
        """Who samples this step (host bookkeeping only): the sampling chunks' sequences (slots), then the
        followers a leader's last prompt logits fork (prefix sharing; only a prefill completes a prompt).
        Returns (slots (W,), their logit rows (W,), partial-block copies)."""
        who, rows, copies = self._slot_of[a.seq_ids[smp]], np.arange(len(smp)), []
        more, more_rows = [], []
        for k in np.flatnonzero(a.is_prefill[smp]).tolist():
            i = smp[k]
            s = self.seqs[int(a.seq_ids[i])]
            g = s.group
            done = a.starts[i] + a.num_tokens[i] == len(s.tokens) == s.round_start   # the prompt is in the KV
            if s.rollout_index == 0 and not g.forked and done:
                g.forked = True
                for f in self.sched.fork_ready(g.gid):
                    if f.copy_src >= 0:
                        copies.append((f.copy_src, f.copy_dst, f.copy_rows))
                    child = self.seqs[f.child]
                    self.stats["prefix_tokens_shared"] += len(child.tokens)
                    more.append(child.slot)
                    more_rows.append(k)
        if more:
            who, rows = np.concatenate([who, more]), np.concatenate([rows, more_rows])
        return who, rows, copies

    def _staging(self, n: int):
        """(host tensor, its int64 numpy view) holding >= n values: two buffers used in turn, pinned when CUDA is
        available (the non-blocking upload of one step may still be reading the other's)."""
        st = getattr(self, "_stage", None)
        if st is None or st["cap"] < n:
            cap = max(n, 2 * (st["cap"] if st else 4096))
            pin = torch.cuda.is_available()
            bufs = [torch.empty(cap, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
            st = self._stage = dict(cap=cap, bufs=bufs, events=[None, None], turn=0)
        st["turn"] ^= 1
        ev = st["events"][st["turn"]]
        if ev is not None:
            ev.synchronize()   # the upload that last read this buffer (two steps ago) has finished: no wait
        host_t = st["bufs"][st["turn"]]
        return host_t, host_t.numpy()

    def _upload(self, host_t: torch.Tensor, n: int) -> torch.Tensor:
        """The step's one host-to-device copy (non-blocking from pinned memory); on the CPU the buffer itself."""
        if self.device.type == "cpu":
            return host_t[:n]
        dev = host_t[:n].to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            ev = torch.cuda.Event()
            ev.record()
            self._stage["events"][self._stage["turn"]] = ev
        return dev

    def _step_unfused(self, a) -> None:
        """The previous step (bench_engine_step.py's baseline): op-by-op forward, per-tensor uploads,
        per-token hand-off and scripted tokens."""
        ids, pos_3L, slots, q_starts, q_lens, ctx, media_rows, tables = self._chunk_rows(a)
        if self.packed is not None and self.packed.fused:
            self.packed = packed_forward.PackedForward(self.model, fused=False)
        meta = attn.PagedBatch(self.pool, q_starts.tolist(), q_lens.tolist(), ctx.tolist(),
                               backend=self.attn_backend, csr=tables)
        smp = np.flatnonzero(a.samples)
        head = (q_starts[smp] + q_lens[smp] - 1).tolist()
        dev = self.device
        logits_NV = self._forward(torch.tensor(ids.tolist(), device=dev), torch.from_numpy(pos_3L).to(dev),
                                  torch.tensor(slots.tolist(), device=dev), meta, media_rows,
                                  torch.tensor(head, device=dev) if head else None)
        for sid, n in zip(a.seq_ids.tolist(), a.num_tokens.tolist()):
            self.sched.update(sid, n)
        slots_W, rows, copies = self._forks(a, smp)
        for src, dst, n in copies:
            self.pool.copy_rows(src, dst, n)
        who = [self._seq_at[r] for r in slots_W.tolist()]
        if not who:
            return
        logits = logits_NV if len(who) == len(smp) else logits_NV[torch.tensor(rows.tolist(), device=dev)]
        u = None
        if not self.params.greedy:
            u = counter_uniforms(np.fromiter((s.A.key[s.slot] for s in who), dtype=np.uint64, count=len(who)),
                                 np.fromiter((len(s.tokens) for s in who), dtype=np.uint64, count=len(who)))
        tokens, lps = sample(logits, self.params, suppress_ids=self.suppress_ids, uniforms=u)
        tokens, lps = tokens.tolist(), lps.tolist()
        if self.forced_rounds is not None:
            forced = []
            for k, s in enumerate(who):
                script = self.forced_rounds(s.group.sample_index, s.rollout_index, len(s.traj.rounds))
                if script is not None and s.round_len < len(script):
                    tokens[k] = int(script[s.round_len])
                    forced.append(k)
            if forced:   # one log-softmax and one gather for all scripted rows
                logp = (logits.to(torch.promote_types(logits.dtype, torch.float32))
                        / self.params.temperature).log_softmax(-1)
                ks = torch.tensor(forced)
                for k, lp in zip(forced, logp[ks, torch.tensor([tokens[k] for k in forced])].tolist()):
                    lps[k] = lp
        self.stats["generated_tokens"] += len(who)
        for s, tok, lp in zip(who, tokens, lps):
            self._on_token(s, tok, lp)
