"""ModelRunner: owns the device, the slot caches and the captured decode graphs.

A slot is a row of the static caches. Rows [0, bucket) run in every decode step; rows that are
not generating point at a spare cache position (`parked`) so their writes touch nothing that is
ever read, and a warm session's history in its row stays intact. All per-row inputs live in
static tensors the graphs read, so the host only edits rows between steps.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from .model import CSM
from .sampler import SamplingTensors, sample

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # prompt rows per captured prefill


def graphs_disabled() -> bool:
    return os.environ.get("CSM_NO_CUDA_GRAPH", "") not in ("", "0")


def captured(fn, warmups: int = 2, pool=None) -> torch.cuda.CUDAGraph:
    """fn as a CUDA graph, after `warmups` plain calls on a side stream (compilation, autotuning,
    the allocator and cuBLAS handles settle outside the graph). The warm-up calls do run."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def compile_requested(default: bool) -> bool:
    v = os.environ.get("CSM_COMPILE")
    return default if v is None else v not in ("", "0")


class ModelRunner:
    def __init__(self, model: CSM, max_batch: int, device: torch.device, dtype: torch.dtype, use_graphs: bool = True,
                 compile: bool = False, prefill_rows: int = 256):
        self.model = model
        self.device, self.dtype = device, dtype
        self.max_batch = max_batch
        self.K = model.args.num_codebooks
        self.max_pos = model.args.backbone.max_seq_len  # usable positions per row
        self.parked = self.max_pos  # the spare position parked rows write to
        # [L, 2, MB + 1, Hkv, S+1, hd]: row MB is the staging row captured prefills run in.
        self.cache = model.backbone_cache(max_batch + 1, dtype, device)
        self.stage = max_batch
        self.dcache = model.decoder_cache(max_batch, dtype, device)
        MB, C = max_batch, self.K + 1
        self.tokens = torch.zeros(MB, C, dtype=torch.long, device=device)
        self.mask = torch.zeros(MB, C, dtype=torch.bool, device=device)
        self.pos = torch.full((MB,), self.parked, dtype=torch.long, device=device)
        self.active = torch.zeros(MB, dtype=torch.bool, device=device)
        self.finished = torch.zeros(MB, dtype=torch.bool, device=device)
        self.sampling = SamplingTensors.allocate(MB, device, self.K, model.args.audio_vocab_size)
        self.out = torch.zeros(MB, self.K, dtype=torch.long, device=device)
        self.audible = torch.zeros(MB, dtype=torch.bool, device=device)  # rows whose frame is speech
        pin = device.type == "cuda"  # step outputs land here without a sync: two, as two steps overlap
        self._host_out = [(torch.zeros(MB, self.K, dtype=torch.long, pin_memory=pin),
                           torch.zeros(MB, dtype=torch.bool, pin_memory=pin)) for _ in range(2)]
        self._host_turn = 0
        self.buckets = tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)
        self.use_graphs = use_graphs and device.type == "cuda" and not graphs_disabled()
        # Prefill pieces up to prefill_rows rows (the scheduler's chunk), padded to these sizes.
        self.prefill_buckets = tuple(b for b in PREFILL_BUCKETS if b < prefill_rows) + (prefill_rows,)
        self.staged_prefill = self.use_graphs  # through the staging row (graphs need one fixed row)
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        P = self.prefill_buckets[-1]
        # The captured prefills' inputs: tokens, mask and positions go up as one copy from a ring
        # of pinned host buffers (an async copy, queued behind the decode step in flight, and the
        # host moves on; a buffer is rewritten only once its copy is done).
        self._p_host = [torch.zeros(3, P, C, dtype=torch.long, pin_memory=device.type == "cuda") for _ in range(16)]
        self._p_sent: list[torch.cuda.Event | None] = [None] * len(self._p_host)
        self._p_turn = 0
        self._p_in = torch.zeros(3, P, C, dtype=torch.long, device=device)
        self.p_tokens = self._p_in[0]
        self.p_mask = torch.zeros(P, C, dtype=torch.bool, device=device)
        self.p_pos = torch.full((P,), self.parked, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.timings: dict[int, dict[str, float]] = {}  # bucket -> replay ms of each variant tried
        self.codebook_ids = torch.arange(self.K, device=device)  # tensors, so compiled code is not specialised per codebook
        self.compiled = None  # (step_backbone, step_depth, sample) compiled, when asked for on cuda
        self.variant: dict[int, str] = {}  # bucket -> one of `variants(bucket)`, whichever replayed fastest
        self.fused = None  # (backbone, depth, sample) on our Triton kernels (kernels/); the layers for small buckets
        if device.type == "cuda":
            from . import kernels

            if kernels.available():
                from .kernels import sampler as fused_sampler
                from .kernels.steps import FusedBackbone, FusedDepth

                self.fused = (FusedBackbone(model), FusedDepth(model), fused_sampler.sample)
        if compile_requested(compile) and device.type == "cuda":
            # Fuse the thousands of tiny elementwise kernels of a frame. Pieces, not the unrolled frame:
            # a whole-frame compile took minutes per batch size. Automatic dynamic shapes: the first
            # call compiles static, the next batch size recompiles with only the batch dim symbolic.
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            opts = dict(fullgraph=True)
            self.compiled = (torch.compile(model.step_backbone, **opts), torch.compile(model.step_depth, **opts),
                             torch.compile(sample, **opts))

    # ---- rows ------------------------------------------------------------------------------
    def bucket_for(self, rows_needed: int) -> int:
        return next(b for b in self.buckets if b >= rows_needed)

    @torch.inference_mode()
    def start_row(self, slot: int, last_row: Tensor, last_mask: Tensor, pos: int, temperature: float,
                  topk: int, top_p: float, seed: int, repetition_penalty: float = 1.0) -> None:
        """Make `slot` generate: its next input is the prompt's last row, at position `pos`."""
        self.tokens[slot].copy_(last_row)
        self.mask[slot].copy_(last_mask)
        self.pos[slot] = pos
        self.active[slot] = True
        self.finished[slot] = False
        s = self.sampling
        s.temperature[slot], s.topk[slot], s.top_p[slot] = temperature, topk, top_p
        s.seed[slot], s.step[slot] = seed, 0
        s.rep_penalty[slot] = repetition_penalty
        s.reset_row(slot, self.model.args.audio_vocab_size)

    @torch.inference_mode()
    def close_row(self, slot: int) -> None:
        """Feed the all-zero EOS frame next and stop advancing: used when a row hits its length limit."""
        self.tokens[slot].zero_()
        self.mask[slot, : self.K] = True
        self.mask[slot, self.K] = False
        self.finished[slot] = True

    @torch.inference_mode()
    def park_row(self, slot: int) -> None:
        self.active[slot] = False
        self.pos[slot] = self.parked

    # ---- KV --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, tokens: Tensor, mask: Tensor, start: int) -> None:
        """Write the KV of rows tokens/mask [T, K+1] at positions [start, start+T) of `slot`."""
        T = tokens.shape[0]
        assert start + T <= self.max_pos, "caller must enforce the context window"
        if self.staged_prefill and T <= self.prefill_buckets[-1]:
            self._staged_prefill(slot, tokens, mask, start)
            return
        pos = torch.arange(start, start + T, device=self.device)[None]
        self.model.prefill(tokens[None].to(self.device), mask[None].to(self.device), pos,
                           self.cache[:, :, slot : slot + 1])

    def _staged_prefill(self, slot: int, tokens: Tensor, mask: Tensor, start: int) -> None:
        """The same KV, computed in the staging row by the captured prefill of the next bucket size.

        An eager prefill is ~400 small kernels, each a trip through Python for the engine thread,
        which shares the GIL with the event loop and the watermark workers: under load it took
        25-30 ms for 30 rows (measured). Here it is a handful of copies and one replay. The slot's
        rows before `start` are copied into the staging row (attention reads them), the prompt is
        padded with rows at the parked position (their KV lands there, never read), and the new
        rows are copied back.
        """
        T = tokens.shape[0]
        bucket = next(b for b in self.prefill_buckets if b >= T)
        if start:
            self.cache[:, :, self.stage, :, :start].copy_(self.cache[:, :, slot, :, :start])
        j = self._p_turn
        self._p_turn = (j + 1) % len(self._p_host)
        if self._p_sent[j] is not None:
            self._p_sent[j].synchronize()
        host = self._p_host[j][:, :bucket]
        host.zero_()
        host[0, :T], host[1, :T] = tokens, mask
        host[2, :, 0] = self.parked
        host[2, :T, 0] = torch.arange(start, start + T)
        cuda = self.device.type == "cuda"
        self._p_in[:, :bucket].copy_(host, non_blocking=cuda)  # same stream: after the last prefill read it
        if cuda:
            self._p_sent[j] = torch.cuda.Event()
            self._p_sent[j].record()
        self.p_mask[:bucket].copy_(self._p_in[1, :bucket])
        self.p_pos[:bucket].copy_(self._p_in[2, :bucket, 0])
        if self.use_graphs:
            graph = self.prefill_graphs.get(bucket) or self._capture_prefill(bucket)
            graph.replay()
        else:
            self._prefill_stage(bucket)
        self.cache[:, :, slot, :, start : start + T].copy_(self.cache[:, :, self.stage, :, start : start + T])

    def _prefill_stage(self, bucket: int) -> None:
        self.model.prefill(self.p_tokens[None, :bucket], self.p_mask[None, :bucket], self.p_pos[None, :bucket],
                           self.cache[:, :, self.stage : self.stage + 1])

    def _capture_prefill(self, bucket: int) -> torch.cuda.CUDAGraph:
        """Capture the staging-row prefill of `bucket` rows (it only ever writes the staging row)."""
        graph = self.prefill_graphs[bucket] = captured(lambda: self._prefill_stage(bucket), 1, self._pool())
        return graph

    @torch.inference_mode()
    def read_kv(self, slot: int, length: int) -> Tensor:
        return self.cache[:, :, slot, :, :length].clone()  # [L, 2, Hkv, P, hd]

    @torch.inference_mode()
    def write_kv(self, slot: int, kv: Tensor) -> None:
        self.cache[:, :, slot, :, : kv.shape[-2]].copy_(kv)

    # ---- the decode step -------------------------------------------------------------------
    def variants(self, bucket: int) -> list[str]:
        """Ways to run this bucket's step, named backbone/depth decoder/sampler, each piece "plain"
        PyTorch, "compiled" (torch.compile) or "triton" (kernels/; the layers only for <= 16 rows)."""
        out = ["plain/plain/plain"]
        comp = "compiled" if self.compiled is not None else "plain"
        if self.compiled is not None:
            out.append(f"{comp}/{comp}/{comp}")
        if self.fused is not None:
            out.append(f"{comp}/{comp}/triton")
            if bucket <= self.fused[1].max_rows:
                out += [f"{comp}/triton/{comp}", f"{comp}/triton/triton", "triton/triton/triton"]
        return out

    def _pieces(self, B: int, variant: str):
        m = self.model
        names = variant.split("/")
        plain = (m.step_backbone, m.step_depth, sample)
        compiled = self.compiled or plain
        if B > 1:
            # Measured on an H200: the compiled backbone is good only where it was compiled static
            # (batch 1); with the batch dim symbolic it took 13 ms at batch 8 against 2.7 ms plain.
            compiled = (m.step_backbone, *compiled[1:])
        triton = self.fused or (None, None, None)
        return tuple({"plain": plain, "compiled": compiled, "triton": triton}[n][i] for i, n in enumerate(names))

    def _step(self, B: int, variant: str = "plain/plain/plain") -> None:
        K = self.K
        p = self.sampling.rows(B)
        ids = self.codebook_ids
        backbone, depth, fn = self._pieces(B, variant)
        codes = self.model.frame(
            self.tokens[:B], self.mask[:B], self.pos[:B], self.cache[:, :, :B], self.dcache[:, :, :B],
            lambda logits, i: fn(logits, p, ids[i]), steps=(backbone, depth),
        )
        active, was_finished = self.active[:B], self.finished[:B]
        adv = active & ~was_finished
        eos = (codes == 0).all(-1)
        self.out[:B].copy_(codes)
        self.audible[:B].copy_(adv & ~eos)
        # Feed each advancing row its own frame next; a finished row keeps re-feeding the EOS
        # frame at the same position, which rewrites identical KV (idempotent) until parked.
        self.tokens[:B, :K].copy_(torch.where(adv[:, None], codes, self.tokens[:B, :K]))
        self.tokens[:B, K].masked_fill_(adv, 0)
        self.mask[:B, :K] |= adv[:, None]
        self.mask[:B, K] &= ~adv
        self.pos[:B] += adv.long()
        p.step.add_(adv.long())
        self.finished[:B] |= adv & eos

    @torch.inference_mode()
    def step(self, bucket: int) -> tuple[Tensor, Tensor]:
        """Run one frame for rows [0, bucket). Returns device views (codes [B, K], audible [B])."""
        if self.use_graphs:
            graph = self.graphs.get(bucket) or self._capture(bucket)
            graph.replay()
        else:
            self._step(bucket, "compiled/compiled/compiled" if self.compiled is not None else "plain/plain/plain")
        self.audible[bucket:] = False
        return self.out[:bucket], self.audible[:bucket]

    @torch.inference_mode()
    def launch(self, bucket: int) -> tuple[Tensor, Tensor, torch.cuda.Event | None]:
        """Queue one step and the copy of its outputs to the host; returns (codes [B, K], audible [B])
        on the host, valid once the event has completed (None: already), until the launch after next."""
        codes, audible = self.step(bucket)
        hc, ha = self._host_out[self._host_turn]
        self._host_turn ^= 1
        cuda = self.device.type == "cuda"
        hc[:bucket].copy_(codes, non_blocking=cuda)
        ha[:bucket].copy_(audible, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return hc[:bucket], ha[:bucket], event

    _MUTATED = ("tokens", "mask", "pos", "finished")

    def _snapshot(self) -> list[Tensor]:
        return [getattr(self, n).clone() for n in self._MUTATED] + [self.sampling.step.clone()]

    def _restore(self, saved: list[Tensor]) -> None:
        for t, v in zip([getattr(self, n) for n in self._MUTATED] + [self.sampling.step], saved):
            t.copy_(v)

    def _capture(self, bucket: int) -> torch.cuda.CUDAGraph:
        """Capture this bucket's step in every variant (see `variants`) and keep the fastest replay.

        Capturing runs the step on whatever the rows hold: every mutated buffer is restored after.
        Live rows get garbage KV at and after their next position: harmless, since each position is
        rewritten by the real step before anything attends to it.
        """
        saved = self._snapshot()
        best: tuple[float, str, torch.cuda.CUDAGraph] | None = None
        timings = {}
        for v in self.variants(bucket):
            graph = self._capture_variant(bucket, v)
            ms = timings[v] = self._replay_ms(graph)
            self._restore(saved)
            if best is None or ms < best[0]:
                best = (ms, v, graph)
        torch.cuda.synchronize()
        self.graphs[bucket], self.variant[bucket] = best[2], best[1]
        self.timings[bucket] = timings
        log.info("captured decode graph for batch %d: %s; kept %s", bucket,
                 ", ".join(f"{v} {ms:.2f} ms" for v, ms in timings.items()), best[1])
        return best[2]

    def _capture_variant(self, bucket: int, variant: str) -> torch.cuda.CUDAGraph:
        return captured(lambda: self._step(bucket, variant), 2, self._pool())

    @staticmethod
    def _replay_ms(graph: torch.cuda.CUDAGraph, n: int = 5) -> float:
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    def _pool(self):
        if not hasattr(self, "_graph_pool"):
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every bucket up front (at start-up, while no row is live) so no request pays for it."""
        if self.use_graphs:
            for b in self.buckets:
                if b not in self.graphs:
                    self._capture(b)
            with torch.inference_mode():
                for b in self.prefill_buckets:
                    if b not in self.prefill_graphs:
                        self._capture_prefill(b)
