"""Mimi (Kyutai's neural audio codec) through the `moshi` package: offline encode/decode and a
batched streaming decoder whose rows are independent streams.

Every tensor stays on the codec's device; only `encode`/`decode` (offline, for uploads and
tests) move data to and from the host.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization.core_vq import EuclideanCodebook

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 12.5 Hz frames
NUM_CODEBOOKS = 32
CARDINALITY = 2048

# Same structure as moshi's `_mimi_config`, narrowed everywhere except where it would change the
# external contract: the SEANet ratios (hop 960 -> 25 Hz, then /2 -> 12.5 Hz), 32 x 2048 codes.
_TINY_CONFIG: dict = {
    "sample_rate": SAMPLE_RATE,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        **loaders._seanet_kwargs,
        "dimension": 32,
        "n_filters": 4,
    },
    "quantizer": {
        **loaders._quantizer_kwargs,
        "dimension": 16,
        "input_dimension": 32,
        "output_dimension": 32,
    },
    "transformer": {
        **loaders._transformer_kwargs,
        "d_model": 32,
        "num_heads": 2,
        "num_layers": 1,
        "dim_feedforward": 64,
        "context": 16,  # 8 frames at 25 Hz: short streams already exercise the ring KV wrap
        "input_dimension": 32,
        "output_dimensions": [32],
    },
}


class MimiCodec:
    """Mimi at 24 kHz, 12.5 Hz frames of 1920 samples, `num_codebooks` codebooks of 2048 entries."""

    def __init__(self, model: MimiModel):
        assert model.sample_rate == SAMPLE_RATE and model.frame_size == FRAME_SAMPLES
        self.model = model.eval().requires_grad_(False)
        for m in model.modules():
            if isinstance(m, EuclideanCodebook):
                m.embedding  # noqa: B018 - caches the table now, so streaming copies share it
        self.device = next(model.parameters()).device
        self.num_codebooks: int = model.num_codebooks
        self.sample_rate = SAMPLE_RATE
        self.frame_samples = FRAME_SAMPLES

    @classmethod
    def load(
        cls,
        weights: Path | None,
        device: torch.device | str = "cpu",
        num_codebooks: int = NUM_CODEBOOKS,
        tiny: bool = False,
        seed: int = 0,
    ) -> MimiCodec:
        """Real weights from `weights` (safetensors or a moshi checkpoint), else random weights.

        `tiny=True` (random weights only) keeps Mimi's rates and code shapes with ~1000x
        fewer parameters, for CPU tests and the demo model.
        """
        if weights is not None:
            if tiny:
                raise ValueError("tiny=True builds random weights: pass weights=None with it")
            if not Path(weights).is_file():
                raise FileNotFoundError(f"Mimi weights not found at {weights}: check the path")
            model = loaders.get_mimi(Path(weights), device=device, num_codebooks=num_codebooks)
        else:
            config = _TINY_CONFIG if tiny else None
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = loaders.get_mimi(
                    None, config, device="cpu", num_codebooks=num_codebooks
                )
                _randomize_codebooks(model)
            model = model.to(device)
        return cls(model)

    @torch.no_grad()
    def encode(self, pcm: np.ndarray) -> torch.Tensor:
        """float32 mono 24 kHz samples -> codes [K, T] int64 on the CPU; T = ceil(len / 1920)."""
        x = torch.as_tensor(np.ascontiguousarray(pcm, dtype=np.float32), device=self.device)
        if x.ndim != 1 or x.numel() == 0:
            raise ValueError(f"encode expects non-empty mono samples, got shape {tuple(x.shape)}")
        codes = self.model.encode(x.view(1, 1, -1))  # [1, K, T]
        return codes[0].to("cpu", torch.int64)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """codes [K, T] -> float32 mono samples, T * 1920 of them."""
        self._check_codes(codes, 2)
        pcm = self.model.decode(_mimi_ids(codes, self.device)[None])  # [1, 1, T * 1920]
        return pcm[0, 0].float().cpu().numpy()

    @contextmanager
    def streaming(self, batch_size: int) -> Iterator[StreamingDecoder]:
        """A streaming decoder with `batch_size` independent rows, all starting fresh.

        Each context gets its own module tree sharing this codec's weights, so offline
        `encode`/`decode` and other streaming contexts stay usable while it is open.
        """
        shell = _share_weights_copy(self.model)
        with shell.streaming(batch_size):
            yield StreamingDecoder(shell, batch_size, self.num_codebooks, self.device)

    def _check_codes(self, codes: torch.Tensor, ndim: int) -> None:
        if codes.ndim != ndim or codes.shape[-2 if ndim == 2 else 1] != self.num_codebooks:
            raise ValueError(
                f"codes must be {'[K, T]' if ndim == 2 else '[B, K]'} with K="
                f"{self.num_codebooks}, got {tuple(codes.shape)}"
            )


class StreamingDecoder:
    """One Mimi frame per row per `step`; rows advance only where `active`.

    After `capture()` (CUDA only) a step is one CUDA graph replay. moshi graphs only its decoder
    transformer and SEANet decoder; the RVQ decode before them (32 table lookups and adds), the
    upsampling and the exec-mask writes stay eager: ~100 small kernels and their Python, once per
    frame on the engine thread. The streaming state is updated in place, so the graph stays valid
    across steps and resets.
    """

    def __init__(self, model: MimiModel, batch_size: int, num_codebooks: int, device: torch.device):
        self._model = model
        self.batch_size = batch_size
        self.num_codebooks = num_codebooks
        self.device = device
        self._graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = None  # with reset? -> graph, pcm
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # codes, active, reset

    @torch.no_grad()
    def step(self, codes: torch.Tensor, active: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, K] int64, active [B] bool -> pcm [B, 1920] float32 on the codec's device.

        Rows with `active` False keep their state untouched and return zeros. Rows with `reset`
        True forget their past first (as `reset` would), in the same graph as the step.
        """
        B, K = codes.shape
        if B != self.batch_size or K != self.num_codebooks:
            raise ValueError(
                f"codes must be [{self.batch_size}, {self.num_codebooks}], got {tuple(codes.shape)}"
            )
        if self._graphs is None:
            if reset is not None:
                self.reset(reset)
            return self._step(codes, active)
        codes_in, active_in, reset_in = self._inputs
        codes_in.copy_(codes)
        active_in.copy_(active)
        if reset is not None:
            reset_in.copy_(reset)
        graph, pcm = self._graphs[reset is not None]
        graph.replay()
        return pcm.clone()  # the graph's buffer is rewritten by the next step

    def _step(self, codes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        active = active.to(self.device, torch.bool)
        self._model.set_exec_mask(active)
        pcm = self._model.decode(_mimi_ids(codes, self.device)[:, :, None])  # [B, 1, 1920]
        pcm = pcm[:, 0].float()
        return torch.where(active[:, None], pcm, torch.zeros_like(pcm))

    def _reset_then_step(self, codes: torch.Tensor, active: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        self._model.reset_streaming(reset)
        return self._step(codes, active)

    @property
    def captured(self) -> bool:
        return self._graphs is not None

    @torch.no_grad()
    def capture(self) -> None:
        """Make every later `step` one CUDA graph replay (CUDA only; a fresh or reset decoder).

        Two graphs: the step, and a reset of some rows followed by the step (so a new stream's
        reset costs the engine thread one copy, not a hundred small kernels). The warm-up and the
        captures run with no row active or reset, which leaves every row's state as it was; all
        rows are reset after, as if just opened.
        """
        from moshi.utils.compile import no_cuda_graph

        if self.device.type != "cuda" or self._graphs is not None:
            return
        codes = torch.zeros(self.batch_size, self.num_codebooks, dtype=torch.long, device=self.device)
        active = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        reset = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        graphs = {}
        # moshi's own partial graphs run plain inside ours. thread_local: the engine's neighbours
        # (watermark workers) may use the device while this is captured.
        with no_cuda_graph():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._reset_then_step(codes, active, reset)  # warm-up: cuDNN algorithms, allocator
            torch.cuda.current_stream(self.device).wait_stream(side)
            for with_reset in (False, True):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    pcm = self._reset_then_step(codes, active, reset) if with_reset else self._step(codes, active)
                graphs[with_reset] = (graph, pcm)
        self._graphs, self._inputs = graphs, (codes, active, reset)
        self.reset(torch.ones(self.batch_size, dtype=torch.bool, device=self.device))

    @torch.no_grad()
    def reset(self, rows: torch.Tensor) -> None:
        """Forget everything rows[b] == True have decoded: their next frame starts a new stream."""
        self._model.reset_streaming(rows.to(self.device, torch.bool))


def _mimi_ids(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    # CSM's audio vocab (2051) has ids past Mimi's 2048 entries; trained weights never emit them
    # in speech, random ones do. Clamped here, for every decode path alike; the model keeps its own.
    return codes.to(device, torch.int64).clamp(max=CARDINALITY - 1)


def _randomize_codebooks(model: MimiModel) -> None:
    # Untrained codebooks are all zeros, which would make every code decode alike and
    # hide indexing bugs; random tables make distinct codes sound distinct.
    for m in model.modules():
        if isinstance(m, EuclideanCodebook):
            m.embedding_sum.normal_()
            m.cluster_usage.fill_(1.0)
            m._initialized.fill_(1.0)
            m._embedding = None


def _share_weights_copy(model: MimiModel) -> MimiModel:
    # deepcopy with parameters and buffers pre-seeded in the memo: new module objects (so new
    # streaming state) around the very same weight tensors.
    memo: dict[int, object] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)
