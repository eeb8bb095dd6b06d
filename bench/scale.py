#!/usr/bin/env python3
"""Scale: work pools as they grow, next to Celery, and one broker with hundreds of workers.

- Pool growth: 1, 2, 4, 8 workers with --concurrency 4 each; a `run_on: one` job whose command is
  `sleep 0.2`; 10 calls per slot, sent at once over HTTP: jobs/s = calls / (first trigger -> last
  finished). Efficiency against perfect linear growth = jobs/s / (workers × the jobs/s of one
  worker); "of the ideal" compares with slots / 0.2 s, what slots that never wait would do.
  Celery (Redis, prefork) with the same total concurrency (`-c 4 × workers`) runs the same number
  of tasks that each run `sleep 0.2`.
- Pool on `true`: 2 workers × --concurrency 4, then × 16, --n calls of a pool job running `true`;
  broadcast on `true` with the same workers as bench/dispatch.py does it (two topics, one worker
  each); Celery with the same total concurrency (`-c 8`, `-c 32`) on the same number of tasks.
- Many workers: one broker, Mongrel2 and 50, then 150, then 300 real worker processes
  (--concurrency 1 each, one topic). At each size: the broker's CPU while nothing runs
  (heartbeats only: every worker syncs once a second) over 10 s, in % of a core; one broadcast
  of `true` to all of them: trigger -> the last one finished; GET /workers: median of 5 (ms);
  the broker's resident memory.
Each run is checked: every call ran exactly once (pools), every worker once (broadcast).
Usage: .venv/bin/python bench/scale.py [--n 2000] [--sizes 50,150,300] [--no-celery]
"""
import argparse
import http.client
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

import common
import stacks
from jobz.harness import LocalStack

POOL_SIZES = (1, 2, 4, 8)
NOISE = ('Memory overcommit',)    # redis-server's advice at start
SLOTS = 4               # --concurrency of each pool worker
TRUE_SLOTS = (4, 16)    # --concurrency of the two workers for `true`
NAP = 0.2               # seconds each pool call sleeps
CALLS_PER_SLOT = 10
JOBS_YAML = f"""
nap: {{command: "sleep {NAP}", topic: nap, run_on: one}}
pooled: {{command: "true", topic: pooled, run_on: one}}
bench_a: {{command: "true", topic: a}}
bench_b: {{command: "true", topic: b}}
bc: {{command: "true", topic: bc}}
"""


# -- measures (keys: 'growth SIZE SYSTEM …', 'true SLOTS SYSTEM', 'workers SIZE …') --------------
def pool_rate(stack: LocalStack, job: str, n: int) -> float:
    """n calls of a pool job sent at once; jobs/s from the first trigger to the last finish (each ran once)."""
    sent = stacks.blast(stack.port, [f'job_name={job}'] * n)
    done = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), max(60.0, n / 10))
    return n / (max(r[0][2] for r in done.values()) - min(sent.values()))


def growth_rows(out: dict, system: str, rates: dict[int, float]) -> None:
    for size, rate in rates.items():
        out[f'growth {size} {system} jobs/s'] = rate
        out[f'growth {size} {system} efficiency (%)'] = 100 * rate / (size * rates[min(rates)])
        out[f'growth {size} {system} of ideal (%)'] = 100 * rate / (size * SLOTS / NAP)


def jobz_pool_growth(tmp: str, sizes: list[int]) -> dict[str, float]:
    rates = {}
    for size in sizes:
        stack = stacks.make_stack(tempfile.mkdtemp(dir=tmp), JOBS_YAML, SLOTS)
        try:
            stacks.start(stack, {f'p{k}': 'nap' for k in range(size)})
            pool_rate(stack, 'nap', size * SLOTS)    # warm-up: one wave
            rates[size] = pool_rate(stack, 'nap', size * SLOTS * CALLS_PER_SLOT)
        finally:
            stack.stop_all()
    out = {}
    growth_rows(out, 'jobz', rates)
    return out


def celery_pool_growth(tmp: str, sizes: list[int]) -> dict[str, float]:
    import peers
    rates = {}
    for size in sizes:
        slots = size * SLOTS
        with peers.celery_pool(tmp, f'scale{size}', slots):
            submit = lambda key, i, t: peers.celery_sleep.apply_async((key, i, t, NAP))    # noqa: E731
            peers.throughput(submit, f'scale{size}:warm', slots)
            rates[size] = peers.throughput(submit, f'scale{size}', slots * CALLS_PER_SLOT)
    out = {}
    growth_rows(out, 'Celery', rates)
    return out


def true_throughput(tmp: str, n: int, celery: bool) -> dict[str, float]:
    out = {}
    for slots in TRUE_SLOTS:
        stack = stacks.make_stack(tempfile.mkdtemp(dir=tmp), JOBS_YAML, slots)
        try:
            stacks.start(stack, {'w1': 'pooled,a', 'w2': 'pooled,b'})
            pool_rate(stack, 'pooled', 100)
            out[f'true {slots} pool'] = pool_rate(stack, 'pooled', n)
            sent = stacks.blast(stack.port, [f'job_name=bench_{"ab"[i % 2]}' for i in range(n)])
            done = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), max(60.0, n / 20))
            out[f'true {slots} broadcast'] = n / (max(r[0][2] for r in done.values()) - min(sent.values()))
        finally:
            stack.stop_all()
        if celery:
            import peers
            with peers.celery_pool(tmp, f'scaletrue{slots}', 2 * slots):
                submit = peers.celery_submit(peers.celery_true)
                peers.throughput(submit, f'scaletrue{slots}:warm', 100)
                out[f'true {slots} Celery'] = peers.throughput(submit, f'scaletrue{slots}', n)
    return out


def stop_together(stack: LocalStack, names: list[str]) -> None:
    """SIGTERM to many workers at once, then wait for each: one after the other would take minutes."""
    for name in names:
        stack.procs[name].send_signal(signal.SIGTERM)
    for name in names:
        stack.stop(name, 0)    # signal 0: only wait (a second TERM would make it kill its commands)


def many_workers(tmp: str, sizes: list[int]) -> dict[str, float]:
    stack = stacks.make_stack(tempfile.mkdtemp(dir=tmp), JOBS_YAML, 1)
    out, names = {}, []
    try:
        stacks.start(stack, {})
        broker = stack.procs['broker'].pid
        conn = http.client.HTTPConnection('127.0.0.1', stack.port, timeout=60)
        for size in sizes:
            while len(names) < size:    # 25 at a time: 150 Python start-ups at once starve everything
                names.append(f'm{len(names):03d}')
                stack.start_worker(names[-1], '--topics', 'bc', '--log-level', 'warning')
                if len(names) % 25 == 0 or len(names) == size:
                    stack.wait_healthy(600.0, workers=len(names))
            time.sleep(3.0)    # past the joins: every worker syncing once a second, nothing else
            cpu = common.cpu_seconds(broker)
            time.sleep(10.0)
            out[f'workers {size} idle CPU (%)'] = (common.cpu_seconds(broker) - cpu) * 10
            (run_id, sent), = stacks.send_paced(stack, ['job_name=bc'], 1.0)[0].items()
            done = stacks.wait_final(stacks.journal(stack), [run_id], stack.procs.values(), 120.0, per_run=size)
            out[f'workers {size} broadcast (ms)'] = (max(r[2] for r in done[run_id]) - sent) * 1000
            times = []
            for _ in range(5):
                began = time.perf_counter()
                conn.request('GET', '/workers')
                resp = conn.getresponse()
                body = resp.read()
                times.append((time.perf_counter() - began) * 1000)
                if resp.status != 200 or body.count(b'"alive": true') < size:
                    raise RuntimeError(f'/workers answered {resp.status} without all {size} workers alive')
            out[f'workers {size} /workers (ms)'] = statistics.median(times)
            out[f'workers {size} memory (MiB)'] = common.rss_kib(broker) / 1024
        conn.close()
    finally:
        stop_together(stack, [n for n in names if n in stack.procs])
        stack.stop_all()
    return out


def measure(tmp: str, args) -> dict[str, float]:
    """Everything once (Celery only with args.celery, and then inside peers.redis_running)."""
    out = jobz_pool_growth(tmp, args.pool_sizes)
    if args.celery:
        out |= celery_pool_growth(tmp, args.pool_sizes)
    out |= true_throughput(tmp, args.n, args.celery)
    out |= many_workers(tmp, args.sizes)
    return out


# -- the report ---------------------------------------------------------------------------------
def cell(out: dict, key: str, unit: str = '') -> str:
    return f'{common.fmt(out[key])}{unit}' if key in out else '–'


def report(out: dict, args) -> str:
    """Markdown: the three tables, then the issue's targets judged on this run."""
    lines = [f'Pool growth: workers × {SLOTS} slots, `sleep {NAP}`, {CALLS_PER_SLOT} calls per slot; efficiency '
             'against linear growth from one worker, and against slots that never wait (the ideal). Celery '
             'with the same total concurrency.', '',
             '| workers × slots | jobz jobs/s | efficiency | of ideal | Celery jobs/s | efficiency | of ideal |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for size in args.pool_sizes:
        row = [cell(out, f'growth {size} {s} {m}', u) for s in ('jobz', 'Celery')
               for m, u in (('jobs/s', ''), ('efficiency (%)', ' %'), ('of ideal (%)', ' %'))]
        lines.append(f'| {size} × {SLOTS} | ' + ' | '.join(row) + ' |')
    lines += ['', 'Throughput on `true` (jobs/s): two workers, each with the concurrency shown; Celery with the '
              'same total concurrency.', '',
              '| concurrency | jobz pool | jobz broadcast | Celery | pool ÷ Celery | broadcast ÷ Celery |',
              '|---|---:|---:|---:|---:|---:|']
    for slots in TRUE_SLOTS:
        pool, bc, cel = (out.get(f'true {slots} {s}') for s in ('pool', 'broadcast', 'Celery'))
        ratio = (lambda v: f'{v / cel:.2f}' if cel else '–')
        lines.append(f'| 2 × {slots} (Celery -c {2 * slots}) | {cell(out, f"true {slots} pool")} | '
                     f'{cell(out, f"true {slots} broadcast")} | {cell(out, f"true {slots} Celery")} | '
                     f'{ratio(pool)} | {ratio(bc)} |')
    lines += ['', 'One broker, many workers (each syncs once a second): idle CPU over 10 s, one broadcast of '
              '`true` to all, `GET /workers`, resident memory.', '',
              '| workers | idle broker CPU | broadcast: trigger → all finished | GET /workers | broker memory |',
              '|---:|---:|---:|---:|---:|']
    for size in args.sizes:
        lines.append(f'| {size} | {cell(out, f"workers {size} idle CPU (%)", " %")} | '
                     f'{cell(out, f"workers {size} broadcast (ms)", " ms")} | '
                     f'{cell(out, f"workers {size} /workers (ms)", " ms")} | '
                     f'{cell(out, f"workers {size} memory (MiB)", " MiB")} |')
    return '\n'.join(lines + ['', *targets(out, args)])


def targets(out: dict, args) -> list[str]:
    big, slots = max(args.sizes), TRUE_SLOTS[0]
    checks = [(f'pool efficiency ≥ 90 % up to {max(args.pool_sizes)} workers',
               # the smallest pool is the base (100 % by definition): the others are judged against it
               min(out[f'growth {s} jobz efficiency (%)'] for s in args.pool_sizes[1:] or args.pool_sizes),
               '%', lambda v: v >= 90)]
    if f'true {slots} Celery' in out:
        checks.append((f'pool on `true` ≥ 2 × Celery (2 × {slots})',
                       out[f'true {slots} pool'] / out[f'true {slots} Celery'], '×', lambda v: v >= 2))
    checks += [(f'{big} workers: idle broker ≤ 10 % of a core', out[f'workers {big} idle CPU (%)'], '%',
                lambda v: v <= 10),
               (f'{big} workers: broadcast to all ≤ 1 s', out[f'workers {big} broadcast (ms)'], 'ms',
                lambda v: v <= 1000),
               (f'{big} workers: /workers ≤ 50 ms', out[f'workers {big} /workers (ms)'], 'ms', lambda v: v <= 50)]
    return ['| target | this run | |', '|---|---:|---|'] + [
        f'| {what} | {value:.2f} {unit} | {"met" if met(value) else "**missed**"} |'
        for what, value, unit, met in checks]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument('--pool-sizes', type=lambda v: [int(x) for x in v.split(',')], default=list(POOL_SIZES),
                    help='numbers of pool workers for the growth (default: 1,2,4,8)')
    ap.add_argument('--sizes', type=lambda v: [int(x) for x in v.split(',')], default=[50, 150, 300],
                    help='numbers of workers for one broker (default: 50,150,300)')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=2000, help='calls for the `true` throughputs (default: 2000)')
    ap.add_argument('--no-celery', dest='celery', action='store_false', help='leave Celery out')
    add_arguments(ap)
    args = ap.parse_args(argv)
    os.environ['JOBZ_LOG_LEVEL'] = 'warning'
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    tmp = tempfile.mkdtemp(prefix='jobz-scale-')
    try:
        if args.celery:
            import peers
            with peers.redis_running(tmp):
                out = measure(tmp, args)
        else:
            out = measure(tmp, args)
        problems = common.log_problems(tmp, noise=stacks.M2_NOISE + NOISE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print('# jobz at scale: pools growing (next to Celery), one broker with many workers\n\n'
          + report(out, args) + '\n\n' + common.machine())
    if problems:
        print(f'\n{len(problems)} warning/error line(s) in the logs, first ones:\n' + '\n'.join(problems[:10]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
