"""Load test: many concurrent WebSocket sessions and speech streams against any server URL.

Each client loops for --duration seconds: a WebSocket client speaks one phrase per turn on its
session; an HTTP client streams POST /v1/audio/speech (pcm). For every utterance it records time to
first audio (TTFA), total time, and how far audio fell behind real-time playback (stall: the
worst lateness of a chunk against a player that started at the first chunk). 429/503 answers are
counted as rejections, anything else that fails as an error.

With --levels 1,2,4,8 the load steps up; the report names the highest level "held": no errors,
p99 TTFA under --ttfa-slo and p99 stall under --stall-slo.

Around each level the server's /metrics is scraped: the change of csm_stage_seconds over the level
gives, per stage between the engine and the socket (engine chunk gaps, watermark queueing and
compute, event-loop lag, encoding, sends), its count, mean and p50/p99 (interpolated within the
histogram's buckets, as Prometheus' histogram_quantile does), printed side by side for all levels
at the end and kept in the JSON under each level's "stages"; "server" has the frames the engine
generated. A server without /metrics (or one that refuses it) gives null there.

    python bench/load.py --url http://127.0.0.1:8000 --ws 16 --speech 16 --duration 30
    python bench/load.py --url http://gpu-box:8000 --levels 8,16,32,64 --mix 0.5 --out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import time
from dataclasses import dataclass, field

import anyio
import httpx
from websockets.asyncio.client import connect

BYTES_PER_S = 24_000 * 2  # pcm s16le mono 24 kHz
PHRASES = ["Hello there, thanks for calling. How can I help you today?",
           "The weather tomorrow looks clear, with a light breeze in the afternoon.",
           "Your order has shipped and should arrive within three business days."]  # fmt: skip


@dataclass
class Utterance:
    kind: str  # "ws" | "speech"
    ok: bool
    status: str  # "ok" | "rejected" | "error:<what>"
    ttfa_s: float | None = None
    total_s: float | None = None
    audio_s: float = 0.0
    stall_s: float = 0.0


@dataclass
class Playback:
    """Lateness of arriving audio against a player that starts at the first chunk."""

    started: float | None = None
    audio_s: float = 0.0
    stall_s: float = 0.0

    def arrive(self, nbytes: int, now: float) -> None:
        if self.started is None:
            self.started = now
        else:
            self.stall_s = max(self.stall_s, now - (self.started + self.audio_s))
        self.audio_s += nbytes / BYTES_PER_S


@dataclass
class Run:
    utterances: list[Utterance] = field(default_factory=list)
    client_lag_s: list[float] = field(default_factory=list)  # this process's own event-loop lag


async def lag_probe(run: Run, stop: float, period: float = 0.01) -> None:
    """How late this client's event loop wakes up: arrivals it records late count as stalls
    that are the client's, not the server's, so each level reports it beside them."""
    while time.monotonic() < stop:
        t = time.monotonic()
        await asyncio.sleep(period)
        run.client_lag_s.append(time.monotonic() - t - period)


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def speech_client(c: httpx.AsyncClient, args: argparse.Namespace, run: Run, stop: float, i: int) -> None:
    n = 0
    while time.monotonic() < stop:
        body = {"input": PHRASES[(i + n) % len(PHRASES)], "voice": "alloy", "response_format": "pcm",
                "max_audio_length_ms": args.audio_ms}
        n += 1
        t0 = time.monotonic()
        play = Playback()
        try:
            async with c.stream("POST", "/v1/audio/speech", json=body, headers=headers(args.api_key)) as r:
                if r.status_code in (429, 503):
                    run.utterances.append(Utterance("speech", False, "rejected"))
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 200:
                    run.utterances.append(Utterance("speech", False, f"error:http {r.status_code}"))
                    continue
                async for chunk in r.aiter_raw():
                    play.arrive(len(chunk), time.monotonic())
        except (httpx.HTTPError, OSError) as e:
            run.utterances.append(Utterance("speech", False, f"error:{type(e).__name__}"))
            continue
        ttfa = None if play.started is None else play.started - t0
        run.utterances.append(Utterance("speech", True, "ok", ttfa, time.monotonic() - t0, play.audio_s, play.stall_s))


async def ws_client(c: httpx.AsyncClient, args: argparse.Namespace, run: Run, stop: float, i: int) -> None:
    form = {"voice_id": "alloy", "output_format": "pcm", "max_audio_length_ms": str(args.audio_ms)}
    while True:  # a refused session is retried after Retry-After, as a real client would
        try:
            r = await c.post("/v1/streaming-session", data=form, headers=headers(args.api_key))
        except (httpx.HTTPError, OSError) as e:
            run.utterances.append(Utterance("ws", False, f"error:{type(e).__name__}"))
            return
        if r.status_code not in (429, 503):
            break
        run.utterances.append(Utterance("ws", False, "rejected"))
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        if time.monotonic() >= stop:
            return
    if r.status_code != 200:
        run.utterances.append(Utterance("ws", False, f"error:open {r.status_code}"))
        return
    sid = r.json()["session_id"]
    url = args.url.replace("http", "ws", 1) + f"/v1/ws/stream-text/{sid}"
    try:
        async with connect(url, additional_headers=headers(args.api_key), max_size=None) as ws:
            n = 0
            while n == 0 or time.monotonic() < stop:  # an opened session speaks at least once
                run.utterances.append(await _ws_turn(ws, PHRASES[(i + n) % len(PHRASES)]))
                n += 1
    except Exception as e:  # noqa: BLE001 - a load test reports every failure, it does not stop
        run.utterances.append(Utterance("ws", False, f"error:{type(e).__name__}"))
    finally:
        await c.delete(f"/v1/streaming-session/{sid}", headers=headers(args.api_key))


async def _ws_turn(ws, phrase: str) -> Utterance:  # noqa: ANN001 - a websockets connection
    t0 = time.monotonic()
    play = Playback()
    await ws.send(json.dumps({"text_chunk": phrase, "is_final": True}))
    status = "ok"
    with anyio.fail_after(120):
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                play.arrive(len(msg), time.monotonic())
                continue
            event = json.loads(msg)
            if event["type"] == "error":
                status = f"error:{event.get('code')}"
            if event["type"] == "done":
                break
    ttfa = None if play.started is None else play.started - t0
    return Utterance("ws", status == "ok", status, ttfa, time.monotonic() - t0, play.audio_s, play.stall_s)


async def run_level(args: argparse.Namespace, n_ws: int, n_speech: int) -> Run:
    run = Run()
    stop = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=n_ws + n_speech + 8)
    async with httpx.AsyncClient(base_url=args.url, timeout=120, limits=limits) as c:
        tasks = [ws_client(c, args, run, stop, i) for i in range(n_ws)]
        tasks += [speech_client(c, args, run, stop, i) for i in range(n_speech)]
        await asyncio.gather(lag_probe(run, stop), *tasks)
    return run


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def summarize(run: Run, kind: str | None = None) -> dict:
    us = [u for u in run.utterances if kind is None or u.kind == kind]
    ok = [u for u in us if u.ok]
    ttfa = [u.ttfa_s for u in ok if u.ttfa_s is not None]
    errors: dict[str, int] = {}
    for u in us:
        if u.status.startswith("error"):
            errors[u.status] = errors.get(u.status, 0) + 1
    return {
        "utterances": len(us), "ok": len(ok), "rejected": sum(u.status == "rejected" for u in us),
        "errors": errors, "audio_s": round(sum(u.audio_s for u in ok), 1),
        "ttfa_p50_ms": _ms(pct(ttfa, 50)), "ttfa_p99_ms": _ms(pct(ttfa, 99)),
        "total_p99_ms": _ms(pct([u.total_s for u in ok if u.total_s], 99)),
        "stall_p99_ms": _ms(pct([u.stall_s for u in ok], 99)),
    }  # fmt: skip


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def held(summary: dict, args: argparse.Namespace) -> bool:
    return (not summary["errors"] and summary["ok"] > 0
            and (summary["ttfa_p99_ms"] or 0) <= args.ttfa_slo * 1000
            and (summary["stall_p99_ms"] or 0) <= args.stall_slo * 1000)


# ---- server-side stage timings (/metrics) ------------------------------------------------------

STAGE_METRIC = "csm_stage_seconds"
STALL_METRIC = "csm_stream_stall_seconds"  # servers before it lack the row
FRAME_S = 0.08
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    count: float = 0.0
    sum: float = 0.0


@dataclass
class Scrape:
    stages: dict[str, Histogram] = field(default_factory=dict)
    frames: float | None = None
    engine: dict[str, float] = field(default_factory=dict)  # the csm_engine_* counters


ENGINE_COUNTERS = {"csm_engine_steps_total": "steps", "csm_engine_prefills_total": "prefills",
                   "csm_engine_prefill_rows_total": "prefill_rows"}


def parse_metrics(text: str) -> Scrape:
    """The csm_stage_seconds histograms (by stage) and the frame counter of a /metrics text."""
    out = Scrape()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        name, value = m["name"], float(m["value"])
        if name == "csm_frames_total":
            out.frames = value
        if name in ENGINE_COUNTERS:
            out.engine[ENGINE_COUNTERS[name]] = value
        if name == "csm_engine_thread_seconds_total":
            out.engine[dict(_LABEL.findall(m["labels"] or "")).get("part", "") + "_s"] = value
        labels = dict(_LABEL.findall(m["labels"] or ""))
        if name.startswith(STAGE_METRIC + "_"):
            hist, suffix = out.stages.setdefault(labels.get("stage", ""), Histogram()), name[len(STAGE_METRIC) + 1 :]
        elif name.startswith(STALL_METRIC + "_"):  # the gaps listeners heard, server side: a row of its own
            hist, suffix = out.stages.setdefault("stream_stall", Histogram()), name[len(STALL_METRIC) + 1 :]
        else:
            continue
        if suffix == "bucket":
            hist.buckets[float(labels["le"])] = value  # "+Inf" parses as inf
        elif suffix == "count":
            hist.count = value
        elif suffix == "sum":
            hist.sum = value
    return out


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Quantile q of a histogram given as sorted (upper bound, cumulative count), interpolated
    linearly within the bucket it falls in; in the +Inf bucket, the largest finite bound."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def stage_deltas(before: Scrape, after: Scrape) -> dict[str, dict]:
    """Per stage, what happened between two scrapes: count, total and mean seconds, p50/p99."""
    out = {}
    for stage, h in after.stages.items():
        b = before.stages.get(stage, Histogram())
        n = h.count - b.count
        total = h.sum - b.sum
        cum = sorted((le, c - b.buckets.get(le, 0.0)) for le, c in h.buckets.items())
        out[stage] = {"count": int(n), "total_s": round(total, 3), "mean_ms": _ms(total / n) if n else None,
                      "p50_ms": _ms(bucket_quantile(0.5, cum)), "p99_ms": _ms(bucket_quantile(0.99, cum))}
    return out


async def scrape(args: argparse.Namespace) -> Scrape | None:
    try:
        async with httpx.AsyncClient(base_url=args.url, timeout=30) as c:
            r = await c.get("/metrics", headers=headers(args.api_key))
    except (httpx.HTTPError, OSError):
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


def server_side(before: Scrape | None, after: Scrape | None, seconds: float) -> tuple[dict | None, dict | None]:
    """(stages, server) of one level; None, None without two scrapes."""
    if before is None or after is None:
        return None, None
    frames = None if after.frames is None or before.frames is None else after.frames - before.frames
    server = {"frames": frames, "seconds": round(seconds, 2),
              "realtime_streams": None if frames is None else round(frames * FRAME_S / seconds, 2),
              **engine_thread(before.engine, after.engine, seconds)}
    return stage_deltas(before, after), server


def engine_thread(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """The engine thread over a level: steps/s, ms per step and where the thread's time went
    (blocked on steps, prefilling, the rest: scheduling, host work, waiting for the GIL)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    steps, prefills = d.get("steps", 0.0), d.get("prefills", 0.0)
    if not steps:
        return {}
    busy, wait, prefill = d.get("busy_s", 0.0), d.get("wait_s", 0.0), d.get("prefill_s", 0.0)
    codec = d.get("codec_s", 0.0)  # servers before the codec part counted it under other
    return {"steps_per_s": round(steps / seconds, 1), "ms_per_step": round(busy / steps * 1000, 2),
            "wait_ms_per_step": round(wait / steps * 1000, 2),
            "codec_ms_per_step": round(codec / steps * 1000, 2),
            "prefill_ms_per_step": round(prefill / steps * 1000, 2),
            "other_ms_per_step": round((busy - wait - codec - prefill) / steps * 1000, 2),
            "prefills": int(prefills), "prefill_ms_each": round(prefill / prefills * 1000, 1) if prefills else None,
            "prefill_rows_each": round(d.get("prefill_rows", 0.0) / prefills, 1) if prefills else None}


def stage_table(levels: list[dict]) -> str:
    """Stages down, levels across: count, mean and p99 (ms) of each stage at each level."""
    with_stages = [e for e in levels if e.get("stages")]
    if not with_stages:
        return "(no stage timings: the server's /metrics could not be read)"
    names = list(dict.fromkeys(s for e in with_stages for s in e["stages"]))
    cell = "{:>7} {:>8} {:>8}"
    head = f"{'stage':<20}" + "".join(f" | {str(e['clients']) + ' clients':^25}" for e in with_stages)
    sub = f"{'':<20}" + "".join(" | " + cell.format("n", "mean ms", "p99 ms") for _ in with_stages)
    rows = [head, sub]
    for name in names:
        cells = []
        for e in with_stages:
            d = e["stages"].get(name) or {}
            cells.append(cell.format(d.get("count", "-"), _fmt(d.get("mean_ms")), _fmt(d.get("p99_ms"))))
        rows.append(f"{name:<20}" + "".join(" | " + c for c in cells))
    for key, label in (("realtime_streams", "engine rt streams"), ("steps_per_s", "engine steps/s"),
                       ("ms_per_step", "engine ms/step"), ("wait_ms_per_step", "  blocked on GPU"),
                       ("codec_ms_per_step", "  blocked on Mimi"), ("prefill_ms_per_step", "  prefilling"),
                       ("other_ms_per_step", "  other (host, GIL)"),
                       ("prefill_ms_each", "prefill ms each"), ("prefill_rows_each", "prefill rows each")):
        rows.append(f"{label:<20}" + "".join(f" | {(e.get('server') or {}).get(key)!s:^25}" for e in with_stages))
    return "\n".join(rows)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


async def main(args: argparse.Namespace) -> dict:
    levels = [int(x) for x in args.levels.split(",")] if args.levels else [args.ws + args.speech]
    report: dict = {"url": args.url, "duration_s": args.duration, "audio_ms": args.audio_ms, "levels": []}
    for level in levels:
        n_ws = round(level * args.mix) if args.levels else args.ws
        n_speech = level - n_ws if args.levels else args.speech
        before, t0 = await scrape(args), time.monotonic()
        run = await run_level(args, n_ws, n_speech)
        after, seconds = await scrape(args), time.monotonic() - t0
        entry = {"clients": level, "ws": n_ws, "speech": n_speech, "all": summarize(run),
                 "ws_sessions": summarize(run, "ws"), "speech_streams": summarize(run, "speech")}
        entry["client_lag_p99_ms"] = _ms(pct(run.client_lag_s, 99))
        entry["held"] = held(entry["all"], args)
        entry["stages"], entry["server"] = server_side(before, after, seconds)
        report["levels"].append(entry)
        print(f"{level:>5} clients ({n_ws} ws, {n_speech} http): {json.dumps(entry['all'])} "
              f"client lag p99 {entry['client_lag_p99_ms']} ms held={entry['held']}",
              flush=True)
        if entry["stages"]:
            print(stage_table([entry]), flush=True)
    report["held_clients"] = max((e["clients"] for e in report["levels"] if e["held"]), default=0)
    if len(report["levels"]) > 1:
        print("\nwhere the time went, per level (server side, csm_stage_seconds):")
        print(stage_table(report["levels"]), flush=True)
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--ws", type=int, default=4, help="concurrent WebSocket sessions (without --levels)")
    p.add_argument("--speech", type=int, default=4, help="concurrent speech streams (without --levels)")
    p.add_argument("--levels", default="", help="comma-separated client counts to step through")
    p.add_argument("--mix", type=float, default=0.5, help="share of WebSocket clients at each level")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    p.add_argument("--audio-ms", type=int, default=4000, help="max audio per utterance")
    p.add_argument("--ttfa-slo", type=float, default=0.5, help="p99 TTFA (s) a held level must meet")
    p.add_argument("--stall-slo", type=float, default=0.2, help="p99 playback stall (s) a held level must meet")
    p.add_argument("--out", default=None, help="write the JSON report here")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    result = asyncio.run(main(a))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps({"held_clients": result["held_clients"]}))
