"""``GET /metrics`` in Prometheus' text format (``prometheus_client``, the reference library).

What the journal knows (jobs by state, outcomes, bytes copied, pause windows) is read from it at each
scrape, so the figures survive a daemon restart and agree with ``blockcopy jobs``; what only the
running daemon sees (QMP round trips, recovery runs) is counted in memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from blockcopy.monitor import Monitor
from blockcopy.records import job_state

if TYPE_CHECKING:
    from blockcopy.service.daemon import Daemon

#: Pause windows of pivots, seconds (a few milliseconds is the aim).
PAUSE_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
QMP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)


class _JournalCollector:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        ops = self.daemon.journal.operations()
        jobs = GaugeMetricFamily("blockcopy_jobs", "Jobs by state (as `blockcopy jobs` shows it)", labels=["state"])
        for state, count in sorted(Counter(job_state(op) for op in ops).items()):
            jobs.add_metric([state], count)
        yield jobs
        outcomes = CounterMetricFamily("blockcopy_job_outcomes", "Ended jobs by outcome", labels=["outcome"])
        for outcome, count in sorted(Counter(op.outcome.value for op in ops if op.outcome).items()):
            outcomes.add_metric([outcome], count)
        yield outcomes
        copied = CounterMetricFamily("blockcopy_copied_bytes", "Bytes the mirrors of all jobs copied")
        copied.add_metric([], sum(d.progress_current for op in ops for d in op.disks))
        yield copied
        windows = sorted(op.pause_window_ms / 1000.0 for op in ops if op.pause_window_ms is not None)
        buckets = [(str(b), sum(1 for w in windows if w <= b)) for b in PAUSE_BUCKETS]
        buckets.append(("+Inf", len(windows)))
        pause = HistogramMetricFamily("blockcopy_pause_window_seconds",
                                      "The guest's pause around each pivot (QEMU's STOP to RESUME)")
        pause.add_metric([], buckets, sum_value=sum(windows))
        yield pause
        domains = GaugeMetricFamily("blockcopy_domains", "Attached domains")
        domains.add_metric([], len(self.daemon.journal.domains()))
        yield domains
        runs = CounterMetricFamily("blockcopy_recovery_runs", "Recovery runs of a job: at the daemon's start, and "
                                   "each retry after QEMU could not be reached or a transition stalled")
        runs.add_metric([], self.daemon.recovery_runs)
        yield runs


class Metrics:
    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_JournalCollector(daemon))
        self.qmp = Histogram("blockcopy_qmp_round_trip_seconds", "QMP command round trips", ["command"],
                             buckets=QMP_BUCKETS, registry=self.registry)
        Monitor.round_trip_observer = self._observe_qmp

    def _observe_qmp(self, command: str, seconds: float) -> None:
        self.qmp.labels(command).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
