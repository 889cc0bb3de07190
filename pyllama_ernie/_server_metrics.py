"""The server's ``/metrics``: request counters, the model's counters and gauges, in Prometheus' text format.

Written by hand (the text exposition format 0.0.4 is a few lines) rather than with
prometheus_client, so the server needs no further dependency.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "pyllama_ernie_"

# model.stats() key -> (metric name, type, help)
_MODEL_METRICS = (
    ("requests_total", "model_requests_total", "counter", "Generation requests the model accepted."),
    ("prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt positions of accepted requests."),
    ("prompt_tokens_cached_total", "prompt_tokens_cached_total", "counter",
     "Prompt positions taken from the KV cache instead of evaluated (prompt cache hits)."),
    ("completion_tokens_total", "completion_tokens_total", "counter", "Tokens generated."),
    ("cancelled_total", "model_cancelled_total", "counter",
     "Generations that ended cancelled (their client went away, or the server is stopping)."),
    ("busy", "slots_busy", "gauge", "Sequences generating now."),
    ("n_parallel", "slots_total", "gauge", "Sequences the model decodes together (--parallel)."),
    ("queued", "queue_depth", "gauge", "Requests waiting for a free sequence."),
    ("max_queue", "queue_max", "gauge", "The most requests that may wait (--max-queue)."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Counts what the HTTP side sees and samples the model's counters for a tokens/s gauge.

    Args:
        stats: the model's ``stats()`` (a dict of ints).
        window: seconds over which the generation rate is measured.
    """

    def __init__(self, stats: Callable[[], dict[str, int]], window: float = 10.0) -> None:
        self._stats = stats
        self._window = window
        self._lock = threading.Lock()
        self._requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self._disconnects: collections.Counter[str] = collections.Counter()
        # (monotonic time, completion_tokens_total), oldest first
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, str(status))] += 1

    def count_disconnect(self, endpoint: str) -> None:
        """A client went away before its answer was complete (its generation was cancelled)."""
        with self._lock:
            self._disconnects[endpoint] += 1

    def disconnects(self, endpoint: str) -> int:
        with self._lock:
            return self._disconnects[endpoint]

    def sample(self, now: float | None = None) -> dict[str, int]:
        """Read the model's counters and remember the generated-token count for the rate."""
        stats = self._stats()
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, int(stats.get("completion_tokens_total", 0))))
            # keep one sample at or before the window's start, so the rate spans the whole window
            while len(self._samples) > 2 and self._samples[1][0] <= now - self._window:
                self._samples.popleft()
        return stats

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last ``window`` seconds of samples."""
        with self._lock:
            if len(self._samples) < 2:
                return 0.0
            (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def render(self, alias: str) -> str:
        """The Prometheus text exposition of everything."""
        stats = self.sample()
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, rows: list[tuple[str, Any]]) -> None:
            out.append(f"# HELP {PREFIX}{name} {help_text}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(f"{PREFIX}{name}{labels} {value}" for labels, value in rows)

        family("info", "gauge", "The served model (always 1).", [(f'{{model="{_label(alias)}"}}', 1)])
        with self._lock:
            requests = sorted(self._requests.items())
            disconnects = sorted(self._disconnects.items())
        family("requests_total", "counter", "HTTP requests answered, by endpoint and status code "
               "(499: the client went away first).",
               [(f'{{endpoint="{_label(e)}",status="{s}"}}', n) for (e, s), n in requests])
        family("client_disconnects_total", "counter",
               "Requests whose client went away before the answer was complete; their generation was cancelled.",
               [(f'{{endpoint="{_label(e)}"}}', n) for e, n in disconnects])
        for key, name, kind, help_text in _MODEL_METRICS:
            if key in stats:
                family(name, kind, help_text, [("", int(stats[key]))])
        family("generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {self._window:g} s.",
               [("", f"{self.tokens_per_second():.3f}")])
        return "\n".join(out) + "\n"
