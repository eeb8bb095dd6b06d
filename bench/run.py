#!/usr/bin/env python3
"""make bench: jobz and the job runners people pick instead, on the same work, in one run.

Each round runs, one after the other on this machine: jobz (bench/dispatch.py: throughput,
no-op throughput, paced latency, fan-in, broadcast), the peers (bench/peers.py: Celery with
Redis, RQ with its forking Worker and with SimpleWorker, the raw spawn limit) and the front end
(bench/front.py: wrk against a bare Mongrel2 handler and against the broker). Then, once: the
cost of growth (bench/growth.py: memory and latency from 1,000 to 100,000 journaled runs,
catch-up of 10,000 missed calls), the latency floor (bench/floor.py) and scale (bench/scale.py:
work pools from 1 to 8 workers next to Celery, one broker with 50 to 300 workers). Each round also
runs jobz's measures again with the journal in PostgreSQL (a throwaway cluster, jobz/postgres.py),
and once at the end bench/failover.py kills the active one of two front ends, several times.

Prints markdown tables (medians over the rounds, min – max) side by side, each ratio to jobz
and the issue's targets, met or not; --write also saves the report to bench/RESULTS.md.
Usage: .venv/bin/python bench/run.py [--repeat 3] [--write]
"""
import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import zmq

import common
import dispatch
import failover
import floor
import front
import growth
import peers
import scale
import stacks
from jobz.postgres import Cluster
from targets import CELERY, RAW, RQ_FORK, RQ_SIMPLE, targets

SYSTEMS = ('jobz', 'Celery+Redis', 'RQ Worker (fork)', 'RQ SimpleWorker', 'raw')
# One row per measure: the jobz metric, then the same measure of each peer (None: not measured).
ROWS = [
    ('throughput, shell `true` (jobs/s)', 'throughput `true` (jobs/s)',
     (f'{CELERY} throughput (jobs/s)', f'{RQ_FORK} throughput (jobs/s)', f'{RQ_SIMPLE} throughput (jobs/s)', RAW)),
    ('throughput, no-op (jobs/s)', 'throughput no-op (jobs/s)',
     (f'{CELERY} no-op throughput (jobs/s)', f'{RQ_FORK} no-op throughput (jobs/s)',
      f'{RQ_SIMPLE} no-op throughput (jobs/s)', None)),
    ('trigger → command start p50 at 50/s (ms)', 'trigger → command start p50 (ms)',
     tuple(f'{s} submit → command start p50 (ms)' for s in (CELERY, RQ_FORK, RQ_SIMPLE)) + (None,)),
    ('trigger → command start p99 at 50/s (ms)', 'trigger → command start p99 (ms)',
     tuple(f'{s} submit → command start p99 (ms)' for s in (CELERY, RQ_FORK, RQ_SIMPLE)) + (None,)),
    ('fan-in of 100: submit → follow-up done (ms)', 'fan-in of 100: submit → follow-up done (ms)',
     ('Celery chord of 100: submit → callback done (ms)', None, None, None)),
    ('fan-in: last job done → follow-up start (ms)', 'fan-in: last job done → follow-up start (ms)',
     ('Celery chord: last task done → callback start (ms)', None, None, None)),
    ('broadcast to 20 workers: trigger → all started (ms)', 'broadcast to 20: trigger → all started (ms)',
     ('Celery broadcast to 20 workers: submit → all started (ms)', None, None, None)),
]


def cell(summary: dict, metric: str | None) -> str:
    if metric is None or metric not in summary:
        return '–'
    med, low, high = summary[metric]
    return f'{common.fmt(med)} ({common.fmt(low)} – {common.fmt(high)})'


def side_by_side(jobz: dict, peer: dict) -> str:
    lines = ['| measure | ' + ' | '.join(SYSTEMS) + ' |', '|---|' + '---:|' * len(SYSTEMS)]
    for label, ours, theirs in ROWS:
        lines.append(f'| {label} | {cell(jobz, ours)} | ' + ' | '.join(cell(peer, m) for m in theirs) + ' |')
    lines.append(f'| raw `/bin/sh -c true`, 2 procs (jobs/s) | – | – | – | – | '
                 f'{cell(peer, "raw subprocess `/bin/sh -c true`, 2 procs (jobs/s)")} |')
    return '\n'.join(lines)


def ratios(jobz: dict, peer: dict) -> str:
    """jobz's median divided by each peer's (above 1: jobz higher; for times, lower is better)."""
    lines = ['| measure | ' + ' | '.join(f'jobz ÷ {s}' for s in SYSTEMS[1:]) + ' |',
             '|---|' + '---:|' * (len(SYSTEMS) - 1)]
    for label, ours, theirs in ROWS:
        lines.append(f'| {label} | ' + ' | '.join(
            f'{jobz[ours][0] / peer[m][0]:.2f}' if m in peer and ours in jobz else '–' for m in theirs) + ' |')
    return '\n'.join(lines)


def postgres(jobz: dict, pg: dict, peer: dict, failed_over: dict) -> list[str]:
    """The PostgreSQL journal next to SQLite's and Celery, its targets, and the failover."""
    rows = [(name, metric, peer_metric) for name, metric, (peer_metric, *_) in ROWS[:5]]
    lines = ['| measure | jobz, SQLite journal | jobz, PostgreSQL journal | Celery+Redis | PostgreSQL ÷ SQLite '
             '| PostgreSQL ÷ Celery |', '|---|---:|---:|---:|---:|---:|']
    for name, metric, peer_metric in rows:
        a, b, c = jobz[metric][0], pg[metric][0], peer[peer_metric][0]
        lines.append(f'| {name} | {common.fmt(a)} | {common.fmt(b)} | {common.fmt(c)} | {b / a:.2f} | {b / c:.2f} |')
    med = failed_over['failover: last 200 from the old → first 200 from the new, median (s)']
    checks = [
        ('PostgreSQL journal: throughput ≥ 1.5 × Celery',
         pg['throughput `true` (jobs/s)'][0] / peer[f'{CELERY} throughput (jobs/s)'][0], '×', lambda v: v >= 1.5),
        ('PostgreSQL journal: trigger → start p99 ≤ 10 ms at 50/s', pg['trigger → command start p99 (ms)'][0],
         'ms', lambda v: v <= 10),
        ('failover ≤ 5 s (median)', med, 's', lambda v: v <= 5),
    ]
    return lines + ['', 'Failover (bench/failover.py, one run): two front ends on one PostgreSQL journal, keyed '
                    'triggers at 50/s to whichever is active, the active one killed (broker and Mongrel2, '
                    'SIGKILL) again and again; the killed one comes back as the standby.', '',
                    '| measure | value |', '|---|---:|'] + [
        f'| {k} | {common.fmt(v)} |' for k, v in failed_over.items()] + [
        '', '| target | this run | |', '|---|---:|---|'] + [
        f'| {what} | {value:.2f} {unit} | {"met" if met(value) else "**missed**"} |'
        for what, value, unit, met in checks]


def cpu_floor(jobz: dict, peer: dict) -> list[str]:
    """What two cores allow, from the CPU every job took (all processes and commands, medians)."""
    job, noop, part = (jobz[m][0] for m in ('CPU per job, `true` (ms)', 'CPU per job, no-op (ms)',
                                            'CPU per fan-in part, job + arrival (ms)'))
    raw = 2000 / peer['raw subprocess `/bin/sh -c true`, 2 procs (jobs/s)'][0]    # ms of CPU per spawn
    celery = peer[f'{CELERY} throughput (jobs/s)'][0]
    chord = peer['Celery chord of 100: submit → callback done (ms)'][0]
    bound = 2000 / job
    rows = [
        ('CPU per job, `true`: all of jobz and the command (ms)', job),
        ('… of which spawning `/bin/sh -c true` (the raw limit, ms)', raw),
        ('CPU per job, no-op (ms)', noop),
        ('throughput bound on 2 cores: 2000 / CPU per job (jobs/s)', bound),
        ('… ÷ raw limit, ÷ Celery', f'{bound * raw / 2000:.2f}, {bound / celery:.2f}'),
        ('fan-in of 100 bound, perfectly batched: 100 × (job + no-op) / 2 cores (ms)', 100 * (job + noop) / 2),
        ('CPU per fan-in part, as measured: job + arrival (ms)', part),
        ('fan-in of 100 on 2 cores at that CPU: 100 × part / 2 (ms)', 100 * part / 2),
        ('½ of the Celery chord (ms)', chord / 2),
    ]
    return ['| measure | value |', '|---|---:|'] + [
        f'| {what} | {value if isinstance(value, str) else common.fmt(value)} |' for what, value in rows]


def versions() -> str:
    m2 = subprocess.run(['dpkg-query', '-W', '-f', '${Version}', 'mongrel2-core'], capture_output=True, text=True)
    return (f'jobz at {git_head()}; Mongrel2 {m2.stdout or "?"}; SQLite {sqlite3.sqlite_version}; '
            f'pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}). {peers.versions()}')


def git_head() -> str:
    got = subprocess.run(['git', '-C', common.ROOT, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
    return got.stdout.strip() or 'an unknown commit'


def report(args, jobz_rounds, peer_rounds, front_rounds, grown, floors, scaled, pg_rounds, failed_over,
           elapsed) -> str:
    jobz, peer, fronts, pg = (common.summarize(r) for r in (jobz_rounds, peer_rounds, front_rounds, pg_rounds))
    return '\n'.join([
        '# jobz benchmark results', '',
        f'`make bench` (bench/run.py --repeat {args.repeat}) on {time.strftime("%Y-%m-%d")}, '
        f'{elapsed / 60:.0f} min. Medians of {args.repeat} rounds, (min – max).', '',
        f'Machine: {common.machine()}.', '', versions(), '',
        f'Work: every job runs the shell command `true`; 2 worker processes (jobz: 2 workers with '
        f'--concurrency {args.concurrency}; Celery: `-c 2` prefork; RQ: 2 workers), loopback. '
        f'Logging: jobz at --log-level {args.log_level}, Celery and RQ at WARNING (no line per job). '
        f'Throughput: {args.n:,} jobs, first trigger to last completion, each checked to have run once. '
        f'Latency: {args.latency_n} triggers paced at {args.rate:g}/s. jobz is triggered over HTTP through '
        f'Mongrel2 and journals durably (SQLite WAL, synchronous=FULL) on the broker and on each worker; '
        f'Redis runs without persistence.', '',
        '## Side by side', '', side_by_side(jobz, peer), '',
        'Each ratio, jobz ÷ the other (throughput: higher is better for jobz; times: lower is):', '',
        ratios(jobz, peer), '',
        '## Front end: HTTP requests per second through Mongrel2 (wrk)', '',
        f'wrk -t 2 -c {args.connections} -d {args.duration}s on loopback.', '', common.table(front_rounds), '',
        '## Cost of growth (one run)', '', common.table([grown]), '',
        '## Where the time goes: CPU per job', '', *cpu_floor(jobz, peer), '',
        '## Latency floor: the parts of the path, alone (one run)', '',
        'floor = bare round trip / 2 + commit + ZeroMQ hop + commit: a trigger crosses Mongrel2 into the '
        'broker, which commits before it publishes; the worker commits "started" before it spawns.', '',
        common.table([floors]), '',
        '## Targets', '', *targets(jobz, peer, fronts, grown, floors,
                                   {'jobz': jobz_rounds, 'peers': peer_rounds, 'front end': front_rounds}, args), '',
        '## Scale: work pools and many workers (bench/scale.py, one run)', '', scale.report(scaled, args), '',
        '## The journal on PostgreSQL, and failover', '',
        f'The same jobz measures in the same rounds with `--journal postgresql://…` (PostgreSQL {pg_version()}, '
        'synchronous_commit on, a throwaway cluster on loopback); medians of the rounds.', '',
        *postgres(jobz, pg, peer, failed_over), ''])


def pg_version() -> str:
    got = subprocess.run(['dpkg-query', '-W', '-f', '${Version}', 'postgresql'], capture_output=True, text=True)
    return got.stdout.strip() or '?'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeat', type=int, default=3, help='rounds of jobz, peers and front end (default: 3)')
    ap.add_argument('--write', action='store_true', help='also write the report to bench/RESULTS.md')
    dispatch.add_arguments(ap)
    front.add_arguments(ap)
    growth.add_arguments(ap)
    floor.add_arguments(ap)
    scale.add_arguments(ap)
    ap.add_argument('--kills', type=int, default=5, help='front ends killed for the failover (default: 5)')
    args = ap.parse_args(argv)
    args.broadcast_workers, args.broadcasts = dispatch.BROADCAST, dispatch.BROADCAST_TRIES    # for peers
    os.environ['JOBZ_LOG_LEVEL'] = args.log_level    # read by every jobz process the stacks start
    for tool in ('mongrel2', 'redis-server', 'wrk'):
        if shutil.which(tool) is None:
            sys.exit(f'error: {tool} is not installed (make bench installs it)')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # unwind (and stop everything) as on Ctrl-C
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix='jobz-bench-')
    jobz_rounds, peer_rounds, front_rounds, pg_rounds = [], [], [], []
    cluster = None
    try:
        cluster = Cluster().start()
        with peers.redis_running(tmp):
            for k in range(args.repeat):
                for name, rounds, measure in (
                        ('jobz', jobz_rounds, lambda: dispatch.measure(tmp, args)),
                        ('jobz on PostgreSQL', pg_rounds, lambda: dispatch.measure(tmp, args, cluster.new_database)),
                        ('peers', peer_rounds, lambda: peers.one_round(tmp, k, args)),
                        ('front end', front_rounds, lambda: front.measure(tempfile.mkdtemp(dir=tmp), args))):
                    print(f'round {k + 1}/{args.repeat}: {name}…', file=sys.stderr, flush=True)
                    rounds.append(measure())
            print('scale: pools, Celery, many workers…', file=sys.stderr, flush=True)
            args.celery = True
            scaled = scale.measure(tmp, args)
        print('growth and catch-up…', file=sys.stderr, flush=True)
        grown = growth.measure_growth(tmp, args) | growth.measure_catchup(tmp, args)
        print('latency floor…', file=sys.stderr, flush=True)
        floors = floor.measure(tmp, args)
        problems = common.log_problems(tmp, peers.PROBLEMS, stacks.M2_NOISE + peers.NOISE)
        print('failover…', file=sys.stderr, flush=True)
        failed_over = failover.measure(args.kills, failover.RATE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cluster:
            cluster.remove()
    text = report(args, jobz_rounds, peer_rounds, front_rounds, grown, floors, scaled, pg_rounds, failed_over,
                  time.monotonic() - began)
    if problems:    # a run with errors in its logs is worth a look before anyone quotes it
        text += (f'\n## Warnings in the logs\n\n{len(problems)} line(s), the first ones:\n\n'
                 + '\n'.join(f'    {line}' for line in problems[:10]) + '\n')
    print(text)
    if args.write:
        with open(os.path.join(common.BENCH, 'RESULTS.md'), 'w') as f:
            f.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
