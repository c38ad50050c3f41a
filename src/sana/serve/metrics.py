"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: a few counters and histograms."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Histogram:
    """Cumulative-bucket histogram: observe(v) counts v in every bucket with upper bound >= v."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {total}')
        out += [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What /metrics reports. Thread-safe: the worker thread and the event loop both write."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.images_served = 0
        self.requests: Counter[str] = Counter()  # by HTTP status code
        self.errors: Counter[str] = Counter()  # by error code (invalid_value, queue_full, timeout, ...)

    def observe_batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)

    def observe_request(self, status: int, seconds: float | None = None, images: int = 0) -> None:
        with self._lock:
            self.requests[str(status)] += 1
            self.images_served += images
            if seconds is not None:
                self.request_seconds.observe(seconds)

    def count_error(self, code: str) -> None:
        with self._lock:
            self.errors[code] += 1

    def render(self, gauges: dict[str, tuple[str, float]], info: Callable[[], dict[str, str]] | None = None) -> str:
        """The exposition text; `gauges` maps name -> (help, value) for values read at scrape time."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        for name, (help_text, value) in gauges.items():
            family(name, "gauge", help_text, [f"{name} {_number(value)}"])
        with self._lock:
            family(
                "sana_batch_size",
                "histogram",
                "Images generated together in one batch.",
                self.batch_size.lines("sana_batch_size"),
            )
            family(
                "sana_batch_duration_seconds",
                "histogram",
                "Time to generate one batch.",
                self.batch_seconds.lines("sana_batch_duration_seconds"),
            )
            family(
                "sana_request_duration_seconds",
                "histogram",
                "Time from receiving an image generation request to answering it with images.",
                self.request_seconds.lines("sana_request_duration_seconds"),
            )
            family(
                "sana_images_served_total",
                "counter",
                "Images returned to clients.",
                [f"sana_images_served_total {self.images_served}"],
            )
            family(
                "sana_requests_total",
                "counter",
                "Image generation requests answered, by HTTP status.",
                [f'sana_requests_total{{status="{k}"}} {v}' for k, v in sorted(self.requests.items())],
            )
            family(
                "sana_errors_total",
                "counter",
                "Requests that failed or were abandoned, by error type.",
                [f'sana_errors_total{{type="{_label(k)}"}} {v}' for k, v in sorted(self.errors.items())],
            )
        if info is not None:
            labels = ",".join(f'{k}="{_label(v)}"' for k, v in info().items())
            family("sana_model_info", "gauge", "The model being served.", [f"sana_model_info{{{labels}}} 1"])
        return "\n".join(lines) + "\n"


def _number(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
