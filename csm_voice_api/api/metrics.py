"""Prometheus metrics, all defined here. Code that serves requests updates them; GET /metrics reads them.

Engine counters (queue depth, frames generated, slots) are read from `engine.stats()` at scrape time,
so the engine itself never depends on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("csm_speech_requests", "Speech requests started, by route.", ["route"], registry=REGISTRY)
REJECTIONS = Counter(
    "csm_rejections", "Requests refused for lack of capacity or over a limit, by reason.", ["reason"], registry=REGISTRY
)
TTFA = Histogram(
    "csm_time_to_first_audio_seconds",
    "Seconds from request accepted to first audio chunk produced, by route.",
    ["route"],
    buckets=(0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0),
    registry=REGISTRY,
)


class _HasStats(Protocol):
    def stats(self) -> dict[str, Any]: ...


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.engine: _HasStats | None = None
        self.admission: _HasStats | None = None
        self.sessions: Callable[[], Any] = lambda: None  # -> the SessionManager (wired after start-up)

    def collect(self) -> Iterator[Metric]:
        manager = self.sessions()
        sessions = manager.list() if manager is not None else []
        yield GaugeMetricFamily("csm_active_sessions", "Open realtime sessions.", value=len(sessions))
        yield GaugeMetricFamily("csm_attached_sessions", "Sessions with a WebSocket or stream attached.",
                                value=sum(1 for s in sessions if s.attached))
        adm = self.admission.stats() if self.admission is not None else {}
        yield GaugeMetricFamily("csm_inflight_generations", "HTTP generations admitted and not finished.",
                                value=adm.get("inflight", 0))
        yield GaugeMetricFamily("csm_admission_capacity", "Generations admitted at once before 429.",
                                value=adm.get("capacity", 0))
        yield GaugeMetricFamily("csm_open_websockets", "Open WebSocket connections.", value=adm.get("websockets", 0))
        yield GaugeMetricFamily("csm_draining", "1 while shutting down (SIGTERM received).",
                                value=int(adm.get("draining", False)))
        stats = self.engine.stats() if self.engine is not None else {}
        yield CounterMetricFamily("csm_frames", "Audio frames (80 ms) generated.", value=stats.get("frames_total", 0))
        yield GaugeMetricFamily("csm_queue_depth", "Requests waiting for a slot.", value=stats.get("queued", 0))
        yield GaugeMetricFamily("csm_active_generations", "Slots generating now.", value=stats.get("active", 0))
        yield GaugeMetricFamily("csm_slots", "Generation slots on the device.", value=stats.get("slots", 0))
        yield GaugeMetricFamily("csm_free_slots", "Slots free now.", value=stats.get("free_slots", 0))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily: nothing to check for name clashes at registration


_ENGINE = _EngineCollector()
REGISTRY.register(_ENGINE)


def bind_engine(engine: _HasStats | None) -> None:
    """Point the engine gauges at `engine` (the app does this at startup)."""
    _ENGINE.engine = engine


def bind_app_state(admission: _HasStats | None, sessions: Callable[[], Any] | None) -> None:
    """Point the admission and session gauges at the app's objects (None: unbind)."""
    _ENGINE.admission, _ENGINE.sessions = admission, sessions or (lambda: None)


def render() -> bytes:
    return generate_latest(REGISTRY)
