"""SilentCipher audio watermark (the one Sesame asks CSM-1B deployments to keep).

Every audio the server returns goes through `Watermarker.apply` (whole responses) or a
`StreamWatermarker` (streamed responses). `verify`/`verify_file` answer whether a file carries
the key's watermark. The silentcipher package is used as shipped (its own networks, loader,
encode_wav/decode_wav); only the 24 kHz <-> 44.1 kHz resampling and the stream chunking are ours.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
import torchaudio.functional as AF

from csm_voice_api.engine.types import SAMPLE_RATE

if TYPE_CHECKING:
    from silentcipher.server import Model as SilentCipherModel

# Public key from Sesame's csm repo: anyone can check for it, so it proves origin, not secrecy.
CSM_1B_PUBLIC_KEY: tuple[int, ...] = (212, 211, 146, 56, 201)
KEY_BYTES = 5  # silentcipher's 44.1k model carries 40 bits: five bytes
WATERMARK_SR = 44_100
# A decoded message of another key counts as a watermark only with this agreement between its
# repetitions (random audio agrees far less; uncalibrated without the real weights).
OTHER_KEY_CONFIDENCE = 0.9
MESSAGE_SDR_DB = 36.0  # Sesame's setting: stronger than the model's 47 dB default, still inaudible
HF_REPO = "sony/silentcipher"
CKPT_SUBDIR = "44_1_khz/73999_iteration"
CKPT_FILES = ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")  # opt.ckpt not needed

# hparams.yaml of sony/silentcipher 44_1_khz/73999_iteration, for networks built without it.
HPARAMS_44K: dict[str, Any] = {
    "model_type": "44.1k",
    "SR": 44_100,
    "N_FFT": 4096,
    "HOP_LENGTH": 2048,
    "message_band_size": 1024,
    "message_dim": 5,
    "message_len": 21,
    "message_sdr": 47,
    "n_messages": 1,
    "enc_n_layers": 3,
    "dec_c_n_layers": 4,
    "ensure_negative_message": True,
    "ensure_constrained_message": False,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
    "no_normalization": False,
}
# One message repetition is message_len STFT hops at 44.1 kHz: 21 * 2048 / 44100 = 0.975 s.
MESSAGE_PERIOD_S = HPARAMS_44K["message_len"] * HPARAMS_44K["HOP_LENGTH"] / WATERMARK_SR

# silentcipher's STFT is a process-wide singleton whose encode passes num_samples from
# transform() to inverse() through an attribute, so two encodes on one model would corrupt each
# other. Each thread encodes through its own view of the model instead (_ThreadEncoder): the
# networks are shared, read-only at inference, and the STFT is its own. Decoding only calls
# transform(), which keeps no state, so a long verify never holds up generated audio; verifies
# queue among themselves to bound their memory.
_DECODE_LOCK = threading.Lock()
PHASE_STEP = 10  # silentcipher's own phase-search step, in 44.1 kHz samples
CPU_PHASE_STEP = 40
CPU_PHASE_SEARCH_S = 1.05  # one message period (0.975 s) and a hop: the least verify decodes


@dataclass(frozen=True)
class WatermarkResult:
    """present: silentcipher decoded some message; key_matches: it is the configured key."""

    present: bool
    key_matches: bool
    confidence: float | None  # silentcipher's agreement of the message repetitions, 0..1
    message: tuple[int, ...] | None = None  # the decoded bytes, when present

    @property
    def watermarked(self) -> bool:
        """The key's watermark, or a confidently decoded well-formed message of another key.

        silentcipher decodes *some* message from most audio, so `present` alone means little;
        a 40-bit key match is the real proof. The confidence bar for other keys is a heuristic.
        """
        if self.key_matches:
            return True
        if not self.present or self.message is None or self.confidence is None:
            return False
        well_formed = len(self.message) == KEY_BYTES and all(0 <= b <= 255 for b in self.message)
        return well_formed and self.confidence >= OTHER_KEY_CONFIDENCE


def parse_key(text: str | None) -> tuple[int, ...]:
    """'212,211,146,56,201' (brackets and spaces allowed) -> key; empty or None -> public key."""
    if text is None or not text.strip():
        return CSM_1B_PUBLIC_KEY
    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    try:
        key = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"watermark key {text!r} is not {KEY_BYTES} comma-separated integers, e.g. '1,2,3,4,5'"
        ) from None
    check_key(key)
    return key


def check_key(key: tuple[int, ...]) -> None:
    if len(key) != KEY_BYTES or any(not 0 <= b <= 255 for b in key):
        raise ValueError(f"watermark key {list(key)} must be {KEY_BYTES} integers in 0..255")


def _import_silentcipher() -> Any:
    # pydub (imported by silentcipher.server) warns at import time when ffmpeg is missing; we
    # never let silentcipher read files, so that warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import silentcipher
        import silentcipher.server
    return silentcipher


def resolve_weights(weights_dir: Path | None = None) -> Path:
    """The 44.1k checkpoint folder: under weights_dir, else from the HF cache or the hub."""
    if weights_dir is not None:
        for cand in (Path(weights_dir) / CKPT_SUBDIR, Path(weights_dir)):
            if all((cand / f).is_file() for f in CKPT_FILES):
                return cand
        raise FileNotFoundError(
            f"no silentcipher 44.1k checkpoint ({', '.join(CKPT_FILES)}) in {weights_dir} "
            f"or {Path(weights_dir) / CKPT_SUBDIR}"
        )
    from huggingface_hub import snapshot_download

    patterns = [f"{CKPT_SUBDIR}/{f}" for f in CKPT_FILES]
    errors: list[str] = []
    for local_only in (True, False):
        try:
            root = snapshot_download(HF_REPO, allow_patterns=patterns, local_files_only=local_only)
        except Exception as e:  # noqa: BLE001 - offline or missing: try the next way, then report
            errors.append(f"{type(e).__name__}: {e}")
            continue
        cand = Path(root) / CKPT_SUBDIR
        if all((cand / f).is_file() for f in CKPT_FILES):
            return cand
    raise FileNotFoundError(
        f"silentcipher weights ({HF_REPO}) are neither in the Hugging Face cache nor "
        f"downloadable; download them once or point the watermark weights setting at a copy "
        f"({'; '.join(errors)})"
    )


class Watermarker:
    """Applies and checks one key's watermark with a silentcipher 44.1k model. Thread-safe."""

    def __init__(self, model: SilentCipherModel, key: tuple[int, ...] = CSM_1B_PUBLIC_KEY):
        check_key(tuple(key))
        stft = model.stft
        if stft.filter_length != model.config.N_FFT:
            raise RuntimeError(
                "silentcipher's STFT singleton was built for another model (n_fft "
                f"{stft.filter_length} != {model.config.N_FFT}): use only the 44.1k model"
            )
        self.model = model
        self.key = tuple(int(b) for b in key)
        self._local = threading.local()  # .encoder: this thread's _ThreadEncoder
        self._messages: dict[tuple[int, str], torch.Tensor] = {}  # (frames, device) -> message_for
        self._windows: dict[str, torch.Tensor] = {}  # device -> window_on

    @classmethod
    def load(
        cls,
        key: tuple[int, ...] = CSM_1B_PUBLIC_KEY,
        device: str | torch.device = "cpu",
        weights_dir: Path | None = None,
    ) -> Watermarker:
        """The real model, through silentcipher's own loader (get_model)."""
        check_key(tuple(key))
        ckpt = resolve_weights(weights_dir)
        sc = _import_silentcipher()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)  # get_model leaves its yaml open
            model = sc.get_model(
                model_type="44.1k",
                ckpt_path=str(ckpt),
                config_path=str(ckpt / "hparams.yaml"),
                device=str(device),
            )
        return cls(model, key)

    @classmethod
    def random(
        cls,
        key: tuple[int, ...] = CSM_1B_PUBLIC_KEY,
        device: str | torch.device = "cpu",
        seed: int = 0,
        decoder_channels: int = 128,
        decoder_layers: int = 10,
        encoder_layers: int = 3,
        carrier_decoder_layers: int = 4,
    ) -> Watermarker:
        """silentcipher's real networks, randomly initialised: for tests and the demo model.

        decoder_channels/decoder_layers shrink the message decoder (used by verify only) so that
        tests can afford the phase-shift search on CPU; encoder_layers/carrier_decoder_layers
        shrink what apply() runs. The defaults are the real sizes.
        """
        sc = _import_silentcipher()
        from silentcipher.model import MsgDecoder

        class _RandomModel(sc.server.Model):
            def load_models(self, ckpt_dir: str) -> None:
                pass  # keep the random initialisation

        layers = {"enc_n_layers": encoder_layers, "dec_c_n_layers": carrier_decoder_layers}
        config = _namespace({**HPARAMS_44K, **layers, "load_ckpt": None})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _RandomModel(config, str(device))
            if (decoder_channels, decoder_layers) != (128, 10):
                model.dec_m = [
                    MsgDecoder(
                        message_dim=config.message_dim,
                        message_band_size=config.message_band_size,
                        channel_dim=decoder_channels,
                        num_layers=decoder_layers,
                    ).to(str(device))
                    for _ in range(config.n_messages)
                ]
        return cls(model, key)

    def apply(self, pcm: np.ndarray) -> np.ndarray:
        """Watermarks mono float32 24 kHz PCM; same length and rate out. Silence passes through."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"apply() takes mono PCM [T], got shape {pcm.shape}")
        if pcm.size == 0 or not np.any(pcm):
            return pcm.copy()  # silentcipher skips silence too (and would print about it)
        y44 = _resample(pcm, SAMPLE_RATE, WATERMARK_SR)
        encoded = self._encoder().encode(y44, self.key)
        out = _resample(np.asarray(encoded, dtype=np.float32), WATERMARK_SR, SAMPLE_RATE)
        return _fit(out, pcm.size)

    def verify(
        self,
        pcm: np.ndarray,
        sample_rate: int,
        *,
        phase_search_s: float | None = 3.0,
        phase_step: int = PHASE_STEP,
    ) -> WatermarkResult:
        """Decodes the watermark of mono PCM at any rate and compares it with the key.

        silentcipher first searches the STFT phase offset (205 decodes). phase_search_s bounds
        that search to the opening seconds, which votes over as many messages as it holds (one
        per 0.975 s) and keeps long files affordable; None searches the whole audio
        (silentcipher's decode_wav as shipped), 0 skips the search (offset 0: right for audio
        straight from apply(), not for audio cut or re-encoded since). phase_step > 10 tries
        fewer offsets (silentcipher tries every 10th sample of a hop): for CPUs, where each try
        of the real decoder costs about a second.
        """
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim != 1:
            raise ValueError(f"verify() takes mono PCM [T], got shape {pcm.shape}")
        # decode_wav needs one whole message (message_len frames), and power > 0.
        if pcm.size * WATERMARK_SR < self.min_verify_samples * sample_rate or not np.any(pcm):
            return WatermarkResult(present=False, key_matches=False, confidence=None)
        y44 = _resample(pcm, sample_rate, WATERMARK_SR) if sample_rate != WATERMARK_SR else pcm
        with _DECODE_LOCK, torch.no_grad():
            if phase_search_s is None:
                res = self.model.decode_wav(y44, WATERMARK_SR, phase_shift_decoding=True)
            else:
                shift = self._phase_shift(y44, phase_search_s, phase_step)
                res = self.model.decode_wav(y44[shift:], WATERMARK_SR, phase_shift_decoding=False)
        return self._result(res)

    def apply_batch(self, pcms: list[np.ndarray]) -> list[np.ndarray]:
        """apply() of every piece, computed together (audio/watermark_batch.py): equal to
        apply() up to float rounding, whatever the batch holds."""
        from csm_voice_api.audio.watermark_batch import encode_batch

        return encode_batch(self, [np.asarray(p, dtype=np.float32).reshape(-1) for p in pcms], MESSAGE_SDR_DB)

    def message_for(self, frames: int, device: torch.device) -> torch.Tensor:
        """The key's message as encode_wav feeds it to the carrier decoder for `frames` STFT
        frames ([1, 1, n_fft // 2 + 1, frames]); the same for every piece of that size."""
        cached = self._messages.get((frames, str(device)))
        if cached is None:
            bits = "".join(f"{b:08b}" for b in self.key)  # encode_wav's binary_encode: 2-bit symbols
            symbols = [int(bits[i : i + 2], 2) for i in range(0, len(bits), 2)]
            msgs, _ = self.model.letters_encoding(frames, [symbols])
            with torch.no_grad():
                msg = to_device(torch.from_numpy(msgs[None]).float(), device)
                cached = self.model.enc_c.transform_message(msg)
            self._messages[(frames, str(device))] = cached
        return cached

    def window_on(self, device: torch.device) -> torch.Tensor:
        """silentcipher's STFT window on `device`: its STFT keeps it on the host and copies it on
        every call; batched encodes take it from here, copied once."""
        window = self._windows.get(str(device))
        if window is None:
            window = self._windows[str(device)] = self.model.stft.window.to(device)
        return window

    def stream(
        self,
        min_chunk_s: float | None = None,
        growth: float = 1.0,
        apply: Callable[[np.ndarray], np.ndarray] | None = None,
        apply_first: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> StreamWatermarker:
        """A StreamWatermarker for one response (see there for min_chunk_s and growth); `apply`
        and `apply_first` (first pieces) mark its pieces instead of self.apply (a BatchEncoder's,
        in the server)."""
        return StreamWatermarker(self, min_chunk_s, growth, apply, apply_first)

    def _encoder(self) -> _ThreadEncoder:
        enc = getattr(self._local, "encoder", None)
        if enc is None:
            enc = self._local.encoder = _ThreadEncoder(self.model)
        return enc

    @property
    def key_kind(self) -> str:
        return "public" if self.key == CSM_1B_PUBLIC_KEY else "private"

    @property
    def min_verify_samples(self) -> int:
        # decode_wav votes over whole messages (message_len STFT frames): shorter audio, even
        # after the phase search drops up to a hop, has none.
        cfg = self.model.config
        return int(cfg.message_len * cfg.HOP_LENGTH)

    def _phase_shift(self, y44: np.ndarray, search_s: float, step: int = PHASE_STEP) -> int:
        if search_s <= 0:
            return 0
        n = max(int(search_s * WATERMARK_SR), self.min_verify_samples)
        y = y44[:n].astype(np.float64)
        y = y * np.sqrt(self.model.average_energy_VCTK / np.mean(y**2))  # as decode_wav does
        if step == PHASE_STEP:
            return int(self.model.get_best_ps(y))
        return self._coarse_phase_shift(y, step)

    def _coarse_phase_shift(self, y: np.ndarray, step: int) -> int:
        # get_best_ps's criterion (mean agreement of the message repetitions) on fewer offsets.
        m, cfg = self.model, self.model.config
        x = torch.tensor(y, dtype=torch.float32, device=m.device)[None]
        best, best_acc = 0, -1.0
        for ps in range(0, cfg.HOP_LENGTH, step):
            carrier, _ = m.stft.transform(x[:, ps:])
            pred = torch.argmax(m.dec_m[0](carrier[:, None])[0, 0], dim=0).cpu().numpy()
            rows = pred[: pred.size // cfg.message_len * cfg.message_len].reshape(-1, cfg.message_len)
            acc = 0.0
            for col in rows.T:  # summed in get_best_ps's order: the same floats, the same ties
                acc += np.bincount(col).max() / rows.shape[0]
            acc /= rows.shape[1]
            if acc > best_acc:
                best, best_acc = ps, acc
        return best

    def _result(self, res: dict[str, Any]) -> WatermarkResult:
        if not res.get("status") or not res.get("messages"):
            return WatermarkResult(present=False, key_matches=False, confidence=None)
        message = tuple(int(b) for b in res["messages"][0])
        conf = res.get("confidences") or [None]
        return WatermarkResult(
            present=True,
            key_matches=message == self.key,
            confidence=None if conf[0] is None else float(conf[0]),
            message=message,
        )


class _ThreadEncoder:
    """One thread's way into silentcipher's encode_wav: a shallow copy of the model (the same
    networks) with an STFT of its own, and on CUDA a stream of its own, so encodes of several
    threads neither share num_samples nor queue behind the engine's work on the default stream.

    The networks run as silentcipher ships them, in training mode: BatchNorm normalises with the
    statistics of the piece itself (so the output does not depend on other calls) and updates its
    running statistics, which nothing reads; concurrent updates of those are harmless.
    """

    def __init__(self, model: SilentCipherModel):
        from silentcipher.stft import STFT

        cfg = model.config
        stft = STFT.__new__(STFT)  # not STFT(...): its metaclass hands out the one shared instance
        STFT.__init__(stft, cfg.N_FFT, cfg.HOP_LENGTH)
        device = torch.device(model.device)
        # The window is a plain attribute that transform()/inverse() copy to the input's device
        # on every call: keep it there once (the same values, so the same output).
        stft.window = stft.window.to(device)
        self.model = copy.copy(model)
        self.model.stft = stft
        self.stream: torch.cuda.Stream | None = None
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))  # weights loaded on the default stream

    def encode(self, y44: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
        # encode_wav ends with a copy to the host, which waits for this stream's work.
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            encoded, _ = self.model.encode_wav(
                y44, WATERMARK_SR, list(key), message_sdr=MESSAGE_SDR_DB, calc_sdr=False
            )
        return encoded


_DEMO_LOCK = threading.Lock()
_DEMO_MODELS: dict[str, Any] = {}


def demo_watermarker(key: tuple[int, ...] = CSM_1B_PUBLIC_KEY, device: str = "cpu") -> Watermarker:
    """The demo model's watermarker: silentcipher's real code on small random networks (seed 0;
    apply about 4x and verify about 50x cheaper than full size, so the demo and its tests stay
    quick on CPU). Built once per device and shared. Its message does not decode as the key."""
    with _DEMO_LOCK:
        model = _DEMO_MODELS.get(str(device))
        if model is None:
            model = Watermarker.random(
                device=device,
                decoder_channels=4,
                decoder_layers=3,
                encoder_layers=2,
                carrier_decoder_layers=2,
            ).model
            _DEMO_MODELS[str(device)] = model
    return Watermarker(model, key)


def load_watermarker(
    key_text: str | None, device: str | torch.device, *, demo: bool | str, weights_dir: Path | None = None
) -> Watermarker:
    """The server's watermarker: the real silentcipher model, or the demo's random networks
    (demo="full-random": random networks of the real size, for benchmarks of the random model).

    Raises with what to do when the key is malformed or the weights cannot be had: a server
    that should watermark must not start without it.
    """
    try:
        key = parse_key(key_text)
    except ValueError as e:
        raise ValueError(f"CSM_WATERMARK_KEY: {e}") from None
    if demo == "full-random":
        return Watermarker.random(key, device=device)
    if demo:
        return demo_watermarker(key, str(device))
    try:
        return Watermarker.load(key, device, weights_dir)
    except (ImportError, OSError) as e:
        raise RuntimeError(
            f"cannot load the SilentCipher watermark ({e}). Install silentcipher (see README), "
            "make sony/silentcipher reachable or set CSM_WATERMARK_WEIGHTS, or set "
            "CSM_WATERMARK=false to serve without the watermark."
        ) from e


def search_bounds(device: str | torch.device) -> tuple[float, int]:
    """(phase_search_s, phase_step) for verify on this device: silentcipher's full-resolution
    search over 3 s on a GPU; on a CPU, where one decoder pass over a second of audio takes about
    a second, one message period (plus a hop) every 40th sample, about 50 passes."""
    if torch.device(device).type == "cuda":
        return 3.0, PHASE_STEP
    return CPU_PHASE_SEARCH_S, CPU_PHASE_STEP


class StreamWatermarker:
    """Watermarks a stream of 24 kHz PCM chunk by chunk: write(pcm) -> ready PCM, flush() -> rest.

    Each chunk is watermarked on its own, so chunk edges sit on whole message periods (0.975 s
    at 44.1 kHz, rounded to 24 kHz samples without drift): the message then repeats on one grid
    across the whole stream, as in an offline encode, and the decoder's vote over repetitions
    still agrees. min_chunk_s below one period trades compute for latency: each chunk is then
    encoded together with the audio since the last period edge (look-behind) and only its new
    part is emitted, keeping the grid. Output length always equals input length.

    growth > 1 makes each piece that much longer than the last, up to one whole period, after
    which pieces end on period edges and need no look-behind: the first audio still waits for only
    one small piece, while a long stream costs about one encode per period instead of one per
    chunk. Streams that generate faster than real time by at least `growth` never wait on it.

    `restart()` starts the growth over at the next sample (a new utterance on the same stream, as
    on a WebSocket): the utterance's first audio then waits for one small piece, not for the rest
    of a message period, and the message grid still runs on.
    """

    def __init__(
        self,
        wm: Watermarker,
        min_chunk_s: float | None = None,
        growth: float = 1.0,
        apply: Callable[[np.ndarray], np.ndarray] | None = None,
        apply_first: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.wm = wm
        self.apply = wm.apply if apply is None else apply
        # The first piece after a (re)start: what the listener's first audio waits on.
        self.apply_first = self.apply if apply_first is None else apply_first
        self.period = MESSAGE_PERIOD_S * SAMPLE_RATE  # 23405.71 samples at 24 kHz
        if min_chunk_s is None:
            min_chunk_s = MESSAGE_PERIOD_S
        if min_chunk_s <= 0:
            raise ValueError("min_chunk_s must be > 0")
        if growth < 1:
            raise ValueError("growth must be >= 1")
        self.step = min_chunk_s * SAMPLE_RATE
        self.growth = growth
        self._edges = [0]  # piece edges from the last restart on, absolute samples
        self._buf = np.zeros(0, dtype=np.float32)  # raw PCM from _buf_start on
        self._buf_start = 0  # absolute sample index of _buf[0] (a period edge)
        self._emitted = 0  # absolute samples already returned
        self._chunks = 0
        self._lock = threading.Lock()  # a cancelled caller's write may still run in its thread

    def edge(self, j: int) -> int:
        """Absolute end sample of chunk j-1 (start of chunk j)."""
        if self.growth == 1:
            return self._edges[0] + round(j * self.step)
        while len(self._edges) <= j:
            last = self._edges[-1]
            size = self.step * self.growth ** (len(self._edges) - 1)
            if size < self.period:
                self._edges.append(round(last + size))
            else:  # grown to a period: end on the period grid, so the next window needs no look-behind
                self._edges.append(self.period_start(round(last + self.period)))
        return self._edges[j]

    def period_start(self, a: int) -> int:
        """The last message-period edge at or before absolute sample a."""
        k = math.floor(a / self.period)
        while round(k * self.period) > a:
            k -= 1
        while round((k + 1) * self.period) <= a:
            k += 1
        return round(k * self.period)

    def write(self, pcm: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._write(pcm)

    def _write(self, pcm: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf, np.asarray(pcm, dtype=np.float32).reshape(-1)])
        out = []
        while self._buf_start + self._buf.size >= self.edge(self._chunks + 1):
            out.append(self._emit(self.edge(self._chunks + 1)))
            self._chunks += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def buffer(self, pcm: np.ndarray) -> bool:
        """Takes `pcm` without marking anything, if it completes no piece: True when it did. False:
        it completes one (or a write still runs in a worker), and `write` must take it, off the event
        loop. Most chunks of a grown stream only add to its current piece, so they skip a thread hop."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._buf_start + self._buf.size + np.size(pcm) >= self.edge(self._chunks + 1):
                return False
            self._write(pcm)  # ends no piece: it only appends
            return True
        finally:
            self._lock.release()

    def flush(self) -> np.ndarray:
        with self._lock:
            return self._flush()

    def _flush(self) -> np.ndarray:
        end = self._buf_start + self._buf.size
        if end <= self._emitted:
            return np.zeros(0, dtype=np.float32)
        return self._emit(end)

    def restart(self) -> None:
        """Pieces grow from one step again, starting at the first sample not yet returned."""
        with self._lock:
            self._edges = [self._emitted]
            self._chunks = 0

    def discard(self) -> None:
        """Drops written audio not yet returned (its response was cut): the stream, and its
        message grid, go on from the last audio actually returned."""
        with self._lock:
            self._buf = self._buf[: self._emitted - self._buf_start]

    @property
    def pending(self) -> int:
        """Samples written but not returned yet."""
        return self._buf_start + self._buf.size - self._emitted

    def _emit(self, b: int) -> np.ndarray:
        a = self._emitted
        p = self.period_start(a)
        window = self._buf[p - self._buf_start : b - self._buf_start]
        out = (self.apply_first if self._chunks == 0 else self.apply)(window)[a - p :]
        self._emitted = b
        keep_from = self.period_start(b)  # the next window starts no earlier than this
        self._buf = self._buf[keep_from - self._buf_start :]
        self._buf_start = keep_from
        return out


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`; on CUDA through pinned memory, so the copy is queued and does not
    wait for the work already on the device (a pageable copy waits for all of it)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def verify_file(
    source: str | Path | BinaryIO,
    watermarker: Watermarker,
    *,
    phase_search_s: float | None = 3.0,
    phase_step: int = PHASE_STEP,
) -> WatermarkResult:
    """Reads any audio PyAV decodes (mixed to mono) and checks it for the watermarker's key."""
    pcm, sr = read_mono(source)
    return watermarker.verify(pcm, sr, phase_search_s=phase_search_s, phase_step=phase_step)


def read_mono(source: str | Path | BinaryIO) -> tuple[np.ndarray, int]:
    """Decodes a whole audio file to mono float32 at its own sample rate."""
    import av

    from csm_voice_api.errors import UnsupportedMedia

    src = str(source) if isinstance(source, Path) else source
    try:
        with av.open(src) as container:
            stream = next(s for s in container.streams if s.type == "audio")
            sr = int(stream.rate or stream.codec_context.sample_rate)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
            parts = [
                out.to_ndarray().reshape(-1)
                for frame in container.decode(stream)
                for out in resampler.resample(frame)
            ]
            parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except (av.FFmpegError, StopIteration, ValueError) as e:
        raise UnsupportedMedia(f"could not decode the audio file: {e}", param="file") from e
    pcm = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return pcm, sr


def _resample(pcm: np.ndarray, src_sr: int, dst_sr: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(pcm, dtype=np.float32))
    return AF.resample(x, src_sr, dst_sr).numpy()


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    if x.size >= n:
        return x[:n]
    return np.pad(x, (0, n - x.size))


def _namespace(d: dict[str, Any]) -> Any:
    import argparse

    return argparse.Namespace(**d)
