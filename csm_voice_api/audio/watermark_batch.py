"""SilentCipher's encode for many pieces at once, and the thread that batches response pieces.

Under load the server watermarks hundreds of small pieces a second (every stream's pieces of one
engine chunk up to one message period). silentcipher's `encode_wav` takes one piece per call and
spends most of its ~7 ms in Python, host<->device copies and launches, not in its convolutions, so
per-piece calls on a few threads saturated long before the GPU did (BENCHMARKS.md, third session).

`encode_batch` runs the same computation as `encode_wav` (message_sdr 36 dB, no SDR) over a list
of pieces with one set of launches per piece length class:
- resampling 24 <-> 44.1 kHz for all pieces in one padded call each way (zero padding on the
  right does not change a piece's samples: torchaudio pads with zeros itself);
- pieces whose 44.1 kHz length pads to the same STFT size share a batch, and only such pieces:
  their carriers then have the same frame count, so nothing is padded inside the networks;
- silentcipher's networks run in training mode as shipped, so BatchNorm normalises each piece
  with its own statistics; batched, each piece's channels become channels of their own
  (`_per_piece_batch_norm`), which keeps every piece independent of its batch partners.
The result equals `Watermarker.apply` up to float rounding (tests/audio/test_watermark_batch.py).

A batch waits for the device once, for its result. Each wait inside it (a pageable upload, the
envelope check of `torch.istft`, the sinc kernel torchaudio's `resample` builds per call: three
per length class, found with CUDA's sync debug mode) let this stream's queue run dry, and the
thread launched the rest only once the GPU, busy with the engine's higher-priority steps, got
back to it. Under load a piece took 115-470 ms to mark against 45-90 ms alone (H200,
BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.transforms as AT

from csm_voice_api.audio.watermark import MESSAGE_SDR_DB, WATERMARK_SR, Watermarker, to_device
from csm_voice_api.engine.types import SAMPLE_RATE


# Frames (STFT columns, 46 ms of 44.1 kHz audio each) one batch may hold: the networks' largest
# activations are ~0.8 MB per channel group per frame, so this bounds a batch near 2 GB.
DEFAULT_MAX_FRAMES = 384


def padded_length(n44: int, win: int) -> int:
    """silentcipher's STFT input length for n44 samples: padded up to a multiple of the window,
    by a whole window when already a multiple (STFT.transform)."""
    return n44 + win - n44 % win


def resampled_length(n: int, src_sr: int, dst_sr: int) -> int:
    g = math.gcd(src_sr, dst_sr)
    return -(-n * (dst_sr // g) // (src_sr // g))  # ceil, as torchaudio's resample


def frames_of(n24: int, win: int, hop: int) -> int:
    """STFT frames silentcipher's encode of a 24 kHz piece of n24 samples runs its networks over."""
    return padded_length(resampled_length(n24, SAMPLE_RATE, WATERMARK_SR), win) // hop + 1


@torch.no_grad()
def encode_batch(wm: Watermarker, pcms: list[np.ndarray], message_sdr: float) -> list[np.ndarray]:
    """Watermarks each mono float32 24 kHz piece (same lengths out), as `wm.apply` would."""
    outs: list[np.ndarray | None] = [None] * len(pcms)
    live = []
    for i, pcm in enumerate(pcms):
        if pcm.size == 0 or not pcm.any():
            outs[i] = pcm.astype(np.float32, copy=True)  # silence passes through, as in apply()
        else:
            live.append(i)
    if not live:
        return outs  # type: ignore[return-value]
    sizes = [pcms[i].size for i in live]
    back = _encode_on_device(wm, [pcms[i] for i in live], message_sdr).cpu().numpy()  # the batch's one wait
    for row, i in enumerate(live):
        out = back[row, : sizes[row]]
        outs[i] = out if out.size == sizes[row] else np.pad(out, (0, sizes[row] - out.size))
    return outs  # type: ignore[return-value]


@torch.no_grad()
def _encode_on_device(wm: Watermarker, pcms: list[np.ndarray], message_sdr: float) -> torch.Tensor:
    """The marked pieces [N, max length] at 24 kHz, on the device, queued without waiting for it."""
    model, cfg = wm.model, wm.model.config
    device = torch.device(model.device)
    sizes = [pcm.size for pcm in pcms]
    x = torch.zeros(len(pcms), max(sizes), dtype=torch.float32, pin_memory=device.type == "cuda")
    for row, pcm in enumerate(pcms):
        x[row, : sizes[row]] = torch.from_numpy(np.asarray(pcm, dtype=np.float32))
    y44 = _resampler(SAMPLE_RATE, WATERMARK_SR, device)(x.to(device, non_blocking=True))
    n44 = [resampled_length(n, SAMPLE_RATE, WATERMARK_SR) for n in sizes]

    win = cfg.N_FFT
    marked = torch.zeros_like(y44)
    groups: dict[int, list[int]] = {}
    for row, n in enumerate(n44):
        groups.setdefault(padded_length(n, win), []).append(row)
    for length, rows in groups.items():
        idx, lens = to_device(torch.tensor([rows, [n44[r] for r in rows]]), device)
        # Resampling leaks a filter tail past each piece's end: the mask cuts it, as encode_wav
        # resamples the piece alone and pads it with zeros.
        mask = torch.arange(length, device=device) < lens[:, None]
        y = _fit(y44.index_select(0, idx), length) * mask
        power = (y * y).sum(1, keepdim=True) / lens[:, None]  # over the piece, not its padding
        out = _encode_group(wm, y * torch.sqrt(model.average_energy_VCTK / power), message_sdr)
        out = out * torch.sqrt(power / model.average_energy_VCTK) * mask
        marked.index_copy_(0, idx, _fit(out, marked.shape[1]))
    return _resampler(WATERMARK_SR, SAMPLE_RATE, device)(marked)


_RESAMPLERS: dict[tuple[int, int, str], AT.Resample] = {}


def _resampler(src: int, dst: int, device: torch.device) -> AT.Resample:
    """torchaudio's resample with its sinc kernel built once (`AF.resample` builds it per call,
    and on a GPU that costs a wait); the same filter, so the same samples."""
    key = (src, dst, str(device))
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = AT.Resample(src, dst).to(device)
    return _RESAMPLERS[key]


def _encode_group(wm: Watermarker, y: torch.Tensor, message_sdr: float) -> torch.Tensor:
    """encode_wav's networks and STFT for pieces [N, L] already padded to one STFT length
    (normalised to VCTK energy); returns the marked pieces [N, L] (only the unpadded part counts)."""
    model, cfg = wm.model, wm.model.config
    win, hop = cfg.N_FFT, cfg.HOP_LENGTH
    window = wm.window_on(y.device)
    spec = torch.stft(y, win, hop, win, window=window, return_complex=True)
    squared = spec.real**2 + spec.imag**2
    eps = (squared == 0).float() * 1e-24  # silentcipher's guard of sqrt(0)'s gradient, kept for equality
    carrier = (torch.sqrt(squared + eps) - torch.sqrt(eps))[:, None]  # [N, 1, F, T]
    phase = torch.atan2(spec.imag, spec.real)
    n = carrier.shape[0]

    msg = wm.message_for(carrier.shape[3], y.device)  # [1, 1, F, T]
    carrier_enc = _run_layers(model.enc_c.main, carrier)
    merged = torch.cat((carrier_enc, carrier.expand(-1, 32, -1, -1), msg.expand(n, 32, -1, -1)), dim=1)
    h = _run_layers(model.dec_c.main, merged)
    if cfg.ensure_negative_message:
        h = torch.abs(h)
    h[:, :, model.dec_c.message_band_size :, :] = 0
    if not cfg.no_normalization:
        h = h / torch.mean(h**2, dim=2, keepdim=True) ** 0.5 / (10 ** (message_sdr / 20))
    if cfg.frame_level_normalization:
        h = h * torch.mean(carrier**2, dim=2, keepdim=True) ** 0.5
    elif cfg.utterance_level_normalization:
        h = h * torch.mean(carrier**2, dim=(2, 3), keepdim=True) ** 0.5
    if cfg.ensure_negative_message:
        reconst = F.relu(carrier - h)
    elif cfg.ensure_constrained_message:
        h = torch.minimum(torch.maximum(h, -carrier), carrier)
        reconst = h + carrier
    else:
        reconst = torch.abs(h + carrier)
    mag = reconst[:, 0]
    return istft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)), win, hop, window)


def istft(spec: torch.Tensor, win: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """torch.istft(spec, win, hop, win, window) (center, one-sided, no length): spec [N, F, T] ->
    [N, (T - 1) * hop], without its check that the window envelope is non-zero, a host sync
    (`.item()`) per call; silentcipher's Hann window at 1/4 hop never comes near zero."""
    T = spec.shape[-1]
    frames = torch.fft.irfft(spec, n=win, dim=-2) * window[:, None]  # [N, win, T]
    size = (1, win + hop * (T - 1))
    y = F.fold(frames, size, (1, win), stride=(1, hop)).flatten(1)
    envelope = F.fold((window * window)[None, :, None].expand(1, win, T), size, (1, win), stride=(1, hop)).flatten(1)
    cut = slice(win // 2, size[1] - win // 2)
    return y[:, cut] / envelope[:, cut]


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    """x [N, L] cut or zero-padded on the right to [N, length]."""
    return x[:, :length] if x.shape[1] >= length else F.pad(x, (0, length - x.shape[1]))


def _run_layers(layers: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = _per_piece_batch_norm(layer.bn, layer.conv(x) * torch.sigmoid(layer.gate(x)))
    return x


def _per_piece_batch_norm(bn: torch.nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
    """bn(h) as if each piece of the batch ran alone: in training mode BatchNorm uses the batch's
    statistics, so the batch is folded into the channels. Running statistics are not updated
    (silentcipher updates them, but nothing reads them)."""
    if not bn.training:
        return bn(h)
    n, c, f, t = h.shape
    weight = None if bn.weight is None else bn.weight.repeat(n)
    bias = None if bn.bias is None else bn.bias.repeat(n)
    out = F.batch_norm(h.reshape(1, n * c, f, t), None, None, weight, bias, training=True, eps=bn.eps)
    return out.view(n, c, f, t)


class BatchEncoder:
    """One thread that watermarks the pieces submitted from any thread in batches.

    `apply(pcm)` blocks its caller (a watermark worker) until the piece is marked. While a batch
    runs, new pieces gather; the next batch takes all of them (up to max_frames STFT frames), so
    the batch grows with the load and one piece alone waits for nothing but its own encode.

    `apply_first` is for a stream's first piece, which its listener's first audio waits on: such
    pieces run in batches of their own, before any waiting later pieces (those only delay audio
    already buffered ahead of the listener), so time to first audio does not grow with the
    batches of everyone else's long pieces.
    """

    def __init__(self, wm: Watermarker, message_sdr: float = MESSAGE_SDR_DB, max_frames: int = DEFAULT_MAX_FRAMES):
        self.wm = wm
        self.message_sdr = message_sdr
        self.max_frames = max_frames
        cfg = wm.model.config
        self._win, self._hop = cfg.N_FFT, cfg.HOP_LENGTH
        self._pending: deque[tuple[np.ndarray, Future]] = deque()
        self._first: deque[tuple[np.ndarray, Future]] = deque()  # streams' first pieces: run first
        self._cv = threading.Condition()
        self._closed = False
        self.batches = 0
        self.pieces = 0
        self.busy_s = 0.0
        device = torch.device(wm.model.device)
        # Its own CUDA stream: batches do not queue behind the engine's work on the default stream.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(device))
        self._thread = threading.Thread(target=self._run, name="csm-watermark-batch", daemon=True)
        self._thread.start()

    def apply(self, pcm: np.ndarray, *, first: bool = False) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"apply() takes mono PCM [T], got shape {pcm.shape}")
        if pcm.size == 0 or not np.any(pcm):
            return pcm.copy()
        return self.submit(pcm, first=first).result()

    def apply_first(self, pcm: np.ndarray) -> np.ndarray:
        return self.apply(pcm, first=True)

    def submit(self, pcm: np.ndarray, *, first: bool = False) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the watermark encoder is shut down")
            (self._first if first else self._pending).append((pcm, fut))
            self._cv.notify()
        return fut

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "pieces": self.pieces, "busy_seconds": self.busy_s}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _take(self) -> list[tuple[np.ndarray, Future]]:
        with self._cv:
            while not self._first and not self._pending and not self._closed:
                self._cv.wait()
            queue = self._first or self._pending
            batch, frames = [], 0
            while queue:
                cost = frames_of(queue[0][0].size, self._win, self._hop)
                if batch and frames + cost > self.max_frames:
                    break
                batch.append(queue.popleft())
                frames += cost
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:  # closed and drained
                return
            live = [(pcm, fut) for pcm, fut in batch if fut.set_running_or_notify_cancel()]
            started = time.perf_counter()
            try:
                with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                    outs = encode_batch(self.wm, [pcm for pcm, _ in live], self.message_sdr)
            except BaseException as exc:  # noqa: BLE001 - every waiter gets the error, the thread lives on
                for _, fut in live:
                    fut.set_exception(exc)
            else:
                for (_, fut), out in zip(live, outs):
                    fut.set_result(out)
            self.busy_s += time.perf_counter() - started
            self.batches += 1
            self.pieces += len(live)
