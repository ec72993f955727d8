"""One engine step of RolloutEngine (issue 16), split from engine.py at the step seam: `EngineStep` is the
engine's step half (a mixin; the engine supplies the state: model, pool, scheduler, sequences, stats).

Per step: `_chunk_rows` turns the scheduled chunks into host lists (ids, KV slots, positions, block tables,
media rows); `_step` (the lean step) does all host bookkeeping first, then ONE upload, `_forward` (embeddings,
the packed or transformers text forward, lm_head on the sampling rows), the sampler on the device and ONE
download; `_step_unfused` is the previous step, kept as bench/bench_engine_step.py's baseline and running the
same `_forward`. Tokens go back to the engine through `_on_token`.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import modeling
from . import attention as attn
from . import packed_forward
from .kv_cache import StepCache
from .sampling import counter_uniforms, sample
from .stopping import has_line_break


class EngineStep:
    # The lean step (issue 16): all host bookkeeping first (scheduler updates, forks, who samples, their uniforms
    # and scripted tokens), then ONE upload of the step's metadata from a staging buffer (pinned when CUDA is
    # available; non-blocking), the attention backend's included (PagedBatch.stage / bind: cu_seqlens, block
    # tables), the forward with no host reads of device values (packed_forward.py: 10 kernels per layer), the
    # sampler on the device, and ONE download of the sampled ids with their log-probs (tests/test_standin_generate.py
    # counts both over a whole generate).
    # `step_impl = "unfused"` runs the previous step (op by op, per-tensor uploads): bench_engine_step's baseline.
    step_impl = "lean"
    # CUDA graphs for decode-only steps: OFF until `make gpu-check` has validated capture on a GPU (see
    # `decode_bucket`); nothing reads it yet. PAD_DECODES (the shapes a capture needs, testable without a GPU):
    # a decode-only step of n sequences runs decode_bucket(n) rows; the padded rows are decodes of token 0 at
    # position 0 whose K/V go to a SCRATCH block (one block past the scheduler's, allocated only then) and
    # whose attention reads only that block; no padded row is sampled. Off by default: on the CPU padding is
    # pure extra work.
    CUDA_GRAPHS = False
    PAD_DECODES = False
    DECODE_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)

    @classmethod
    def decode_bucket(cls, n: int) -> int:
        """The padded batch size of a decode-only step of n sequences (the shape a captured graph would have)."""
        for b in cls.DECODE_BUCKETS:
            if n <= b:
                return b
        return n

    def _pad_decodes(self, rows) -> None:
        """Pad a decode-only step's host lists (`_chunk_rows`' tuple, in place) up to its decode bucket."""
        ids, slots, q_starts, q_lens, ctx, tables, _, dec_rows, dec_pos, pre = rows
        n = len(ids)
        if pre or n != len(q_starts):
            return
        k, scratch = self.decode_bucket(n) - n, self._scratch_block
        ids += [0] * k
        slots += [scratch * self.pool.block_size] * k   # every padded row writes the scratch block's row 0
        q_starts += range(n, n + k)
        q_lens += [1] * k
        ctx += [1] * k                                  # ... and attends to that one row
        tables += [[scratch]] * k
        dec_rows += range(n, n + k)
        dec_pos += [0] * k

    def _chunk_rows(self, chunks):
        """Host lists of a step: token ids, KV slots, per-chunk query starts / lengths / context lengths / block
        tables, media rows (row, n, embeds, first embed row), decode rows and positions, prefill position views."""
        bs = self.pool.block_size
        ids, slots, q_starts, q_lens, ctx, tables, media_rows = [], [], [], [], [], [], []
        dec_rows, dec_pos, pre = [], [], []   # decodes: (row, text position); prefills: (row, (3, n) view)
        seqs = self.seqs
        for c in chunks:
            s = seqs[c.seq_id]
            a, n = c.start, c.num_tokens
            row = len(ids)
            q_starts.append(row)
            t = c.block_ids
            if not c.is_prefill:   # one text token: the one sampled last step
                ids.append(s.tokens[a])
                dec_rows.append(row)
                dec_pos.append(s.text_position(a))
                slots.append(t[a // bs] * bs + a % bs)
            else:
                b = a + n
                s.flush_pos()
                ids.extend(s.tokens[a:b])
                pre.append((row, s._pos_np[:, a:b]))
                slots.extend(t[p // bs] * bs + p % bs for p in range(a, b))
                for blk in s.blocks:
                    lo, hi = max(a, blk.offset), min(b, blk.offset + blk.embeds.shape[0])
                    if lo < hi:
                        media_rows.append((row + lo - a, hi - lo, blk.embeds, lo - blk.offset))
            q_lens.append(n)
            ctx.append(a + n)
            tables.append(t)
        self.stats["decode_tokens"] += len(dec_rows)
        self.stats["prefill_tokens"] += len(ids) - len(dec_rows)
        return ids, slots, q_starts, q_lens, ctx, tables, media_rows, dec_rows, dec_pos, pre

    def _step(self, out) -> None:
        if self.step_impl == "unfused":
            return self._step_unfused(out)
        chunks = out.scheduled
        rows = self._chunk_rows(chunks)
        if self.PAD_DECODES:
            self._pad_decodes(rows)
        ids, slots, q_starts, q_lens, ctx, tables, media_rows, dec_rows, dec_pos, pre = rows
        sampling = [(c, q_starts[i] + c.num_tokens - 1) for i, c in enumerate(chunks) if c.samples]
        meta = attn.PagedBatch(self.pool, q_starts, q_lens, ctx, tables, backend=self.attn_backend)
        # NOTE: read the block tables now, before the scheduler's updates and forks below
        n_attn = meta.staged_size()
        if meta.cpp_chunks:
            meta.cpp_meta()
        for c in chunks:
            self.sched.update(c.seq_id, c.num_tokens)
        who, who_rows, copies = self._forks(sampling)
        L, N, W = len(ids), len(sampling), len(who)
        forced = self._forced_tokens(who) if self.forced_rounds is not None and W else None
        greedy = self.params.greedy

        # host staging: [ids L | positions 3L | slots L | head rows N | logit rows W | forced W | uniforms W |
        # attention metadata A (flash / SDPA backends: cu_seqlens, block tables, ...)]
        o_pos, o_slot, o_rows, o_who, o_forced, o_u = L, 4 * L, 5 * L, 5 * L + N, 5 * L + N + W, 5 * L + N + 2 * W
        o_attn = o_u + W
        end = o_attn + n_attn
        host_t, buf = self._staging(end)
        buf[:L] = ids
        pos = buf[o_pos:o_slot].reshape(3, L)
        if dec_rows:
            pos[:, dec_rows] = dec_pos
        for row, p in pre:
            pos[:, row:row + p.shape[1]] = p
        buf[o_slot:o_rows] = slots
        buf[o_rows:o_who] = [r for _, r in sampling]
        buf[o_who:o_forced] = who_rows
        buf[o_forced:o_u] = forced if forced is not None else -1
        if W and not greedy:   # counter-based: the draw of token i of a rollout is a function of (key, i)
            buf[o_u:o_u + W].view(np.float64)[:] = counter_uniforms(
                np.fromiter((s.key for s in who), dtype=np.uint64, count=W),
                np.fromiter((len(s.tokens) for s in who), dtype=np.uint64, count=W))
        meta.stage(buf[o_attn:end])
        dev = self._upload(host_t, end)
        meta.bind(dev[o_attn:end])

        logits_NV = self._forward(dev[:L], dev[o_pos:o_slot].view(3, L), dev[o_slot:o_rows], meta, media_rows,
                                  dev[o_rows:o_who] if N else None)
        for src, dst, rows in copies:   # forks' partial blocks, after the forward wrote the leader's rows
            self.pool.copy_rows(src, dst, rows)
        if not W:
            return
        logits = logits_NV if W == N else logits_NV.index_select(0, dev[o_who:o_forced])
        tokens, lps = sample(logits, self.params, suppress_ids=self.suppress_ids,
                             uniforms=None if greedy else dev[o_u:o_u + W].view(torch.float64),
                             forced=dev[o_forced:o_u] if forced is not None else None)
        # the step's one download (and its one sync): ids as float64 (exact below 2^53) beside their log-probs
        tok_f, lp_f = torch.stack((tokens.to(torch.float64), lps.to(torch.float64))).cpu().tolist()
        self.stats["generated_tokens"] += W
        self._on_tokens(who, tok_f, lp_f)

    def _on_tokens(self, who, toks, lps) -> None:
        """Hand each sampled token to its sequence. Most tokens end nothing: they are appended here (what
        `_on_token` does for them) and the scheduler learns of them in one call; a token that may end its round
        (<|im_end|>, a line break, the round's last allowed token) goes through `_on_token`."""
        may_end, last = self._may_end, self.max_new_tokens - 1
        plain = []
        for s, tok, lp in zip(who, toks, lps):
            tok = int(tok)
            end = may_end.get(tok)
            if end is None:
                end = may_end[tok] = tok == self.chat.im_end or has_line_break(self._piece(tok))
            if end or s.round_len >= last:
                self._on_token(s, tok, lp)
            else:
                s.append_text(tok, True, lp)
                s.round_len += 1
                s.known += 1
                plain.append(s.sid)
        if plain:
            self.sched.append_one_each(plain)

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

    def _forks(self, sampling):
        """Who samples this step (host bookkeeping only): the sampling sequences, then the followers a leader's
        last prompt logits fork (prefix sharing). Returns (sequences, their logit rows, partial-block copies)."""
        who, rows, copies = [], [], []
        for k, (c, _) in enumerate(sampling):
            s = self.seqs[c.seq_id]
            who.append(s)
            rows.append(k)
            g = s.group
            if s.rollout_index == 0 and not g.forked and c.start + c.num_tokens == len(s.tokens) == s.round_start:
                g.forked = True
                for f in self.sched.fork_ready(g.gid):
                    if f.copy_src >= 0:
                        copies.append((f.copy_src, f.copy_dst, f.copy_rows))
                    child = self.seqs[f.child]
                    self.stats["prefix_tokens_shared"] += len(child.tokens)
                    who.append(child)
                    rows.append(k)
        return who, rows, copies

    def _forced_tokens(self, who) -> list[int] | None:
        """Scripted tokens (test/bench hook) per sampling row, -1 where the row samples; None when none is."""
        out, any_forced = [], False
        for s in who:
            script = self.forced_rounds(s.group.sample_index, s.rollout_index, len(s.traj.rounds))
            if script is not None and s.round_len < len(script):
                out.append(int(script[s.round_len]))
                any_forced = True
            else:
                out.append(-1)
        return out if any_forced else None

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

    def _step_unfused(self, out) -> None:
        """The previous step (bench_engine_step.py's baseline): op-by-op forward, per-tensor uploads."""
        chunks = out.scheduled
        ids, slots, q_starts, q_lens, ctx, tables, media_rows, dec_rows, dec_pos, pre = self._chunk_rows(chunks)
        pos_3L = np.empty((3, len(ids)), dtype=np.int64)
        if dec_rows:
            pos_3L[:, dec_rows] = dec_pos
        for row, p in pre:
            pos_3L[:, row:row + p.shape[1]] = p
        if self.packed is not None and self.packed.fused:
            self.packed = packed_forward.PackedForward(self.model, fused=False)
        meta = attn.PagedBatch(self.pool, q_starts, q_lens, ctx, tables, backend=self.attn_backend)
        sampling = [(c, q_starts[i] + c.num_tokens - 1) for i, c in enumerate(chunks) if c.samples]
        logits_NV = self._forward(torch.tensor(ids, device=self.device), torch.from_numpy(pos_3L).to(self.device),
                                  torch.tensor(slots, device=self.device), meta, media_rows,
                                  torch.tensor([r for _, r in sampling], device=self.device) if sampling else None)
        for c in chunks:
            self.sched.update(c.seq_id, c.num_tokens)
        who, rows, copies = self._forks(sampling)
        for src, dst, n in copies:
            self.pool.copy_rows(src, dst, n)
        if not who:
            return
        logits = logits_NV if len(who) == len(sampling) else logits_NV[torch.tensor(rows, device=logits_NV.device)]
        u = None
        if not self.params.greedy:
            u = counter_uniforms(np.fromiter((s.key for s in who), dtype=np.uint64, count=len(who)),
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

