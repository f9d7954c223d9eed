"""Counters and a latency histogram, exposed in the Prometheus text format (/metrics).

Names follow etcd's where etcd has the same measure (etcd_http_*, etcd_server_*,
etcd_debugging_store_*), so existing dashboards keep working; grozd's own are grozd_*.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

# etcd's v2 HTTP latency buckets: 0.5 ms doubling to ~2 s.
BUCKETS = tuple(0.0005 * 2**i for i in range(13))

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(
        f'{n}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for n, v in zip(names, values, strict=True)
    )
    return "{" + inner + "}"


def _num(value: float) -> str:
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class HttpMetrics:
    """Request counts by method, failures by method and code, latency by method."""

    def __init__(self) -> None:
        self.received: dict[str, int] = defaultdict(int)
        self.failed: dict[tuple[str, str], int] = defaultdict(int)
        self._hist: dict[str, list[int]] = {}
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def observe(self, method: str, status: int, seconds: float) -> None:
        """Record one answered keys request."""
        self.received[method] += 1
        if status >= 400:
            self.failed[(method, str(status))] += 1
            return
        buckets = self._hist.get(method)
        if buckets is None:
            buckets = self._hist[method] = [0] * len(BUCKETS)
        i = bisect.bisect_left(BUCKETS, seconds)
        if i < len(buckets):
            buckets[i] += 1
        self._sum[method] += seconds
        self._count[method] += 1

    def render(self, out: list[str]) -> None:
        """Append the exposition lines."""
        out.append("# HELP etcd_http_received_total Counter of requests received into the system"
                   " (successfully parsed and authd).")
        out.append("# TYPE etcd_http_received_total counter")
        for method, n in sorted(self.received.items()):
            out.append(f'etcd_http_received_total{{method="{method}"}} {n}')
        out.append("# HELP etcd_http_failed_total Counter of handle failures of requests"
                   " (non-watches), by method (GET/PUT etc.) and code (400, 500 etc.).")
        out.append("# TYPE etcd_http_failed_total counter")
        for (method, code), n in sorted(self.failed.items()):
            out.append(f'etcd_http_failed_total{{code="{code}",method="{method}"}} {n}')
        name = "etcd_http_successful_duration_seconds"
        out.append(f"# HELP {name} Bucketed histogram of processing time (s) of successfully"
                   " handled requests (non-watches), by method (GET/PUT etc.).")
        out.append(f"# TYPE {name} histogram")
        for method, buckets in sorted(self._hist.items()):
            running = 0
            for bound, n in zip(BUCKETS, buckets, strict=True):
                running += n
                out.append(f'{name}_bucket{{method="{method}",le="{_num(bound)}"}} {running}')
            out.append(f'{name}_bucket{{method="{method}",le="+Inf"}} {self._count[method]}')
            out.append(f'{name}_sum{{method="{method}"}} {_num(self._sum[method])}')
            out.append(f'{name}_count{{method="{method}"}} {self._count[method]}')


def gauge(out: list[str], name: str, help_text: str, value: float,
          labels: dict[str, str] | None = None, kind: str = "gauge") -> None:
    """Append one single-sample metric."""
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    names = tuple(sorted(labels)) if labels else ()
    values = tuple(labels[n] for n in names) if labels else ()
    out.append(f"{name}{_labels(names, values)} {_num(value)}")


def labelled(out: list[str], name: str, help_text: str, label: str,
             values: dict[str, float], kind: str = "counter") -> None:
    """Append a metric with one label and several samples."""
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for key, value in sorted(values.items()):
        out.append(f"{name}{_labels((label,), (key,))} {_num(value)}")
