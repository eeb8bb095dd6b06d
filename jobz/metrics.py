"""The broker's /metrics in the Prometheus text format (version 0.0.4).

Written out by hand: the format is a few lines of text, and the broker then needs no
library that every host would have to carry. The tests read it back with prometheus_client.
"""
import bisect
import math

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
