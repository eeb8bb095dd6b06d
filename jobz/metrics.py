"""The broker's /metrics in the Prometheus text format (version 0.0.4), and the counters behind it.

Written out by hand: the format is a few lines of text, and the broker then needs no
library that every host would have to carry. The tests read it back with prometheus_client.
"""
import bisect
import math
import time

BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600, math.inf)   # seconds of a run


def _labels(labels: dict) -> str:
    if not labels:
        return ''
    esc = (str(v).replace('\\', r'\\').replace('\n', r'\n').replace('"', r'\"') for v in labels.values())
    return '{' + ','.join(f'{k}="{v}"' for k, v in zip(labels, esc)) + '}'


def _number(v: float) -> str:
    return '+Inf' if v == math.inf else repr(float(v)) if isinstance(v, float) else str(v)


class Exposition:
    """Metric families written one after the other: HELP, TYPE, then the samples."""

    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples) -> None:
        """`samples`: (labels dict, value) pairs, or for a histogram (labels, Histogram)."""
        self.lines += [f'# HELP {name} {help}', f'# TYPE {name} {kind}']
        for labels, value in samples:
            if kind == 'histogram':
                for bound, n in zip(BUCKETS, value.cumulative()):
                    self.lines.append(f'{name}_bucket{_labels(dict(labels, le=_number(bound)))} {n}')
                self.lines.append(f'{name}_sum{_labels(labels)} {_number(value.sum)}')
                self.lines.append(f'{name}_count{_labels(labels)} {value.count}')
            else:
                self.lines.append(f'{name}{_labels(labels)} {_number(value)}')

    def text(self) -> bytes:
        return ('\n'.join(self.lines) + '\n').encode()


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for n in self.counts:
            total += n
            out.append(total)
        return out


class Stats:
    """Counters since the broker started: runs journaled and ended, and how long they took.

    Moved only by committed bursts (apply): a burst whose commit failed counts nothing."""

    def __init__(self):
        self.started_at = time.time()
        self.runs_started: dict[str, int] = {}
        self.runs_ended: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}

    def apply(self, started: list[str], ended: list[tuple[str, str, float]]) -> None:
        for job in started:
            self.runs_started[job] = self.runs_started.get(job, 0) + 1
        for job, state, seconds in ended:
            self.runs_ended[job, state] = self.runs_ended.get((job, state), 0) + 1
            self.durations.setdefault(job, Histogram()).observe(seconds)


def broker_metrics(stats: Stats, registry, journal, gates, waiting: int) -> bytes:
    """/metrics: the counters, the runs still open, the workers, the journal, the gates."""
    m = Exposition()
    m.family('jobz_runs_started_total', 'counter', 'Runs journaled since the broker started.',
             [({'job': j}, n) for j, n in sorted(stats.runs_started.items())])
    m.family('jobz_runs_finished_total', 'counter', 'Runs that ended since the broker started, by state.',
             [({'job': j, 'state': s}, n) for (j, s), n in sorted(stats.runs_ended.items())])
    open_runs: dict[tuple[str, str], int] = {}
    for run in journal.open_runs():
        open_runs[run['job'], run['state']] = open_runs.get((run['job'], run['state']), 0) + 1
    m.family('jobz_runs_open', 'gauge', 'Runs in the journal that some worker has still to finish.',
             [({'job': j, 'state': s}, n) for (j, s), n in sorted(open_runs.items())])
    m.family('jobz_run_duration_seconds', 'histogram', 'Seconds from trigger to the last worker finished.',
             [({'job': j}, h) for j, h in sorted(stats.durations.items())])
    now, peers = time.monotonic(), sorted(registry.peers.items())
    alive = {n for n, peer in peers if registry.alive(peer, now)}
    m.family('jobz_workers_connected', 'gauge', 'Workers heard from within --worker-timeout.', [({}, len(alive))])
    m.family('jobz_worker_up', 'gauge', 'Whether a known worker is connected.',
             [({'worker': n}, int(n in alive)) for n, _ in peers])
    m.family('jobz_worker_lag', 'gauge', 'Calls on a topic the worker has not taken yet.',
             [({'worker': n, 'topic': t}, max(0, journal.heads.get(t, 0) - c))
              for n, peer in peers for t, c in sorted(peer.cursors.items())])
    m.family('jobz_worker_heartbeat_age_seconds', 'gauge', 'Seconds since the worker was last heard.',
             [({'worker': n}, round(now - peer.seen, 3)) for n, peer in peers])
    m.family('jobz_worker_running', 'gauge', 'Commands the worker says it is running.',
             [({'worker': n}, peer.running) for n, peer in peers])
    m.family('jobz_journal_runs', 'gauge', 'Runs in the journal.', [({}, journal.count_runs())])
    m.family('jobz_journal_bytes', 'gauge', 'Size of the journal database and its write-ahead log.',
             [({}, journal.size())])
    queues, wall = journal.pool_waiting(), time.time()
    m.family('jobz_pool_queued', 'gauge', 'Calls of run_on: one jobs waiting for a worker with room, per topic.',
             [({'topic': t}, n) for t, (n, _) in sorted(queues.items())])
    m.family('jobz_pool_oldest_queued_seconds', 'gauge', 'How long the oldest call waiting for a worker has waited.',
             [({'topic': t}, round(wall - since, 3)) for t, (_, since) in sorted(queues.items())])
    m.family('jobz_semaphore_gates_open', 'gauge', 'Gates with arrivals that have not released yet.',
             [({'job': j}, n) for j, n in sorted(gates.open_counts().items())])
    m.family('jobz_http_waiting', 'gauge', 'job_start?wait= requests held open for their run to end.',
             [({}, waiting)])
    m.family('jobz_broker_uptime_seconds', 'gauge', 'Seconds since the broker started.',
             [({}, round(time.time() - stats.started_at, 3))])
    return m.text()
