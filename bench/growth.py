#!/usr/bin/env python3
"""Cost of growth: does jobz stay as lean and as quick with a big journal, and how fast does a
worker that was away catch up?

Everything goes through the real processes: Mongrel2, broker and workers started by
jobz.stack.Stack on free loopback ports, in a subfolder of a temp folder, triggers over HTTP.
The databases are only ever read (SQLite opened read-only), never written.

A. Growth (--base runs, then --runs runs in the broker's journal).
   Broker, w1 (topic a), w2 (topic b), --concurrency 2. Jobs: bench_a and bench_b run `true`;
   `fill` (topic fill) runs `true` too, but no worker subscribes to it, so filling the journal
   spawns nothing. At each level:
   1. fill: GET /job_start?job_name=fill until the journal's `runs` table holds the level's count.
      The bulk is sent by wrk (/usr/bin/wrk, 2 threads, --connections keep-alive connections):
      a 1 s probe, then timed rounds sized from the last round's rate; the last few thousand
      (and all of a small level) by our own client over as many keep-alive connections, so the
      count lands on the target exactly.
   2. latency: --paced triggers at --paced-rate per second from one keep-alive connection,
      alternating bench_a/bench_b; per run, client send time (time.time()) versus
      results.started in the journal (the worker recorded the call as started and spawns it):
      p50 and p99 in ms. Every run must have succeeded, once.
   3. memory: once every paced run has a final result and the processes had SETTLE_S to go idle,
      VmRSS of broker, w1, w2 and Mongrel2 (median of 5 samples over one second).
   Reported: RSS at both levels and its growth in % (target: within 10 %), p50/p99 at both
   levels, fill rate of the first and the last wrk round, size of journal.db (and its WAL) at
   the end.

B. Catch-up (--catchup calls).
   Broker and w3 (topic c, job bench_c running `true`, --concurrency 2). Once w3 has registered
   and stored its cursor, it is stopped (SIGTERM: it says goodbye), --catchup triggers of
   bench_c are sent over HTTP (4 keep-alive client threads; all must answer 200) and must all be
   in the journal. Then w3 is started again, and its own SQLite (<home>/worker-w3.db, read-only)
   is polled every 20 ms until its cursor for topic c has advanced by --catchup and its `calls`
   table holds that many more rows: 'catch-up' is the time from the start of the w3 process
   (so including Python start-up) to that moment (target: under 3 s). 'all run' is the time from
   the same start to the latest results.finished of those runs in the journal. Each run must
   have exactly one result row for w3, succeeded, and w3's calls table must show each one done
   after exactly one start (attempts = 1).

Each part starts fresh processes and always stops them. --repeat rounds; the table shows the
median and min-max of each metric, then the machine.
Usage: .venv/bin/python bench/growth.py [--runs 100000] [--catchup 10000] [--repeat 1]
"""
import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
import common  # noqa: E402  (puts the project root on sys.path)
import stacks  # noqa: E402
from jobz.harness import wait_for  # noqa: E402
from jobz.stack import Stack  # noqa: E402
from stacks import open_ro, count_runs, settled_runs, wait_final  # noqa: E402

GROWTH_JOBS = ('bench_a:\n  command: "true"\n  topic: a\n'
               'bench_b:\n  command: "true"\n  topic: b\n'
               'fill:\n  command: "true"\n  topic: fill\n')     # no worker takes topic fill
CATCHUP_JOBS = 'bench_c:\n  command: "true"\n  topic: c\n'
PACED = ('job_name=bench_a', 'job_name=bench_b')
TOP_UP = 2000               # the last runs of a fill go through our client, for an exact count
PROBE_MIN = 5000            # a fill smaller than 1.5 x this is sent by our client alone
SETTLE_S = 2.0              # idle time before RSS is read
POLL_S = 0.02               # how often the catching-up worker's SQLite is read


# -- the worker's own database (read-only) -------------------------------------------------------
def worker_progress(db_path: str, topic: str) -> tuple[int | None, int]:
    """(the worker's cursor for topic, rows in its calls table), read from its own SQLite."""
    with open_ro(db_path) as db:
        row = db.execute('SELECT seq FROM cursors WHERE topic = ?', (topic,)).fetchone()
        calls = db.execute('SELECT count(*) FROM calls').fetchone()[0]
    return (row[0] if row else None), calls


# -- part A: growth -----------------------------------------------------------------------------
def fill_to(stack: Stack, journal: str, target: int, connections: int) -> list[float]:
    """Trigger `fill` until the journal holds `target` runs; return the rate of each wrk round.

    wrk runs for whole seconds only, so it does the bulk (a 1 s probe first, then rounds sized
    from the last rate, aiming short of the target) and our client sends the exact rest."""
    rates: list[float] = []
    while True:
        have = settled_runs(journal)
        left = target - have
        rate = rates[-1] if rates else None
        if left <= max(TOP_UP, 1.5 * (rate or PROBE_MIN)):
            if left > 0:
                stacks.send_many(stack, ['job_name=fill'] * left, connections)
            return rates
        seconds = 1 if rate is None else int(min(30.0, max(1.0, 0.9 * (left - TOP_UP / 2) / rate)))
        began = time.monotonic()
        stacks.run_wrk(f'{stack.url}/job_start?job_name=fill', seconds, connections)    # raises on errors
        elapsed = time.monotonic() - began
        if any(p.poll() is not None for p in stack.procs.values()):
            raise RuntimeError('fill: a process of the stack exited (see its log)')
        rates.append(max(50.0, (settled_runs(journal) - have) / elapsed))


def memory(stack: Stack, names) -> dict[str, float]:
    """Median VmRSS (KiB) of each named process over 5 samples in one second."""
    samples = {name: [] for name in names}
    for _ in range(5):
        for name in names:
            samples[name].append(common.rss_kib(stack.procs[name].pid))
        time.sleep(0.2)
    return {name: statistics.median(v) for name, v in samples.items()}


def level(stack: Stack, journal: str, target: int, args) -> dict:
    """Fill to `target` runs, then paced latency, then (settled) memory at that level."""
    fill_rates = fill_to(stack, journal, target, args.fill_connections)
    runs = count_runs(journal)
    sent, _ = stacks.send_paced(stack, [PACED[i % 2] for i in range(args.paced)], args.paced_rate)
    results = wait_final(journal, sent, stack.procs.values(), 60.0)
    latency = [(results[run_id][0][1] - t) * 1000 for run_id, t in sent.items()]
    time.sleep(SETTLE_S)    # results are in; let acks, syncs and the shells' reaping finish
    return {'runs': runs, 'fill_rates': fill_rates,
            'p50': common.percentile(latency, 50), 'p99': common.percentile(latency, 99),
            'rss': memory(stack, ('broker', 'w1', 'w2', 'mongrel2'))}


def short(n: int) -> str:
    """1000 -> '1k', 100000 -> '100k', 2500 -> '2.5k'."""
    return f'{n / 1000:g}k' if n >= 1000 else str(n)


def measure_growth(tmp: str, args) -> dict[str, float]:
    """Part A (see the module docstring) in a fresh subfolder of tmp; returns metric -> value."""
    stack = stacks.make_stack(tempfile.mkdtemp(prefix='growth-', dir=tmp), GROWTH_JOBS)
    journal = stacks.journal(stack)
    try:
        stacks.start(stack, {'w1': 'a', 'w2': 'b'})
        small = level(stack, journal, args.base, args)
        big = level(stack, journal, args.runs, args)
        wal = journal + '-wal'
        sizes = (os.path.getsize(journal), os.path.getsize(wal) if os.path.exists(wal) else 0)
    finally:
        stack.stop_all()
    lo, hi = short(args.base), short(args.runs)
    out = {}
    for name in ('broker', 'w1', 'w2', 'mongrel2'):
        a, b = small['rss'][name], big['rss'][name]
        out[f'{name} RSS at {lo} runs (KiB)'] = a
        out[f'{name} RSS at {hi} runs (KiB)'] = b
        out[f'{name} RSS growth {lo} → {hi} (%)'] = (b - a) / a * 100
    for q in ('p50', 'p99'):
        out[f'trigger → command start {q} at {lo} (ms)'] = small[q]
        out[f'trigger → command start {q} at {hi} (ms)'] = big[q]
    if big['fill_rates']:
        out['fill triggers, first wrk round (req/s)'] = big['fill_rates'][0]
        out['fill triggers, last wrk round (req/s)'] = big['fill_rates'][-1]
    out[f'journal runs at the {hi} level'] = big['runs']
    out[f'journal.db at {hi} runs (MiB)'] = sizes[0] / 2**20
    out[f'journal.db-wal at {hi} runs (MiB)'] = sizes[1] / 2**20
    return out


# -- part B: catch-up ---------------------------------------------------------------------------
def wait_caught_up(stack: Stack, db_path: str, cursor: int, calls: int) -> float:
    """Poll the worker's SQLite every POLL_S until cursor and calls are reached; return monotonic time."""
    def reached():
        try:
            have_cursor, have_calls = worker_progress(db_path, 'c')
        except sqlite3.Error:
            return None    # the worker is just opening or creating its tables
        return (have_cursor or 0) >= cursor and have_calls >= calls and time.monotonic()

    return wait_for(reached, 300.0, 'catch-up of w3', POLL_S, stack.procs.values())


def check_once(db_path: str, run_ids) -> None:
    """Each run is in w3's calls table, done, started exactly once."""
    with open_ro(db_path) as db:
        rows = {r[0]: r[1:] for r in db.execute('SELECT run_id, state, attempts FROM calls')}
    bad = [r for r in run_ids if rows.get(r) != ('done', 1)]
    if bad:
        raise RuntimeError(f'{len(bad)} runs not done exactly once in w3\'s calls, e.g. '
                           f'{bad[0]}: {rows.get(bad[0])}')


def measure_catchup(tmp: str, args) -> dict[str, float]:
    """Part B (see the module docstring) in a fresh subfolder of tmp; returns metric -> value."""
    stack = stacks.make_stack(tempfile.mkdtemp(prefix='catchup-', dir=tmp), CATCHUP_JOBS)
    journal = stacks.journal(stack)
    db_path = os.path.join(stack.home, 'worker-w3.db')
    n = args.catchup
    try:
        stacks.start(stack, {'w3': 'c'})
        # Registered is not enough: the first SYNC answer is what stores its cursor for c.
        wait_for(lambda: os.path.exists(db_path) and worker_progress(db_path, 'c')[0] is not None,
                 30.0, 'w3 storing its cursor', procs=stack.procs.values())
        if stack.stop('w3') != 0:
            raise RuntimeError('w3 did not stop cleanly (see its log)')
        cursor0, calls0 = worker_progress(db_path, 'c')

        began = time.monotonic()
        sent = stacks.send_many(stack, ['job_name=bench_c'] * n)
        accept = n / (time.monotonic() - began)
        with open_ro(journal) as db:
            journaled = db.execute("SELECT count(*) FROM runs WHERE topic = 'c'").fetchone()[0]
        if journaled != cursor0 + n:
            raise RuntimeError(f'journal holds {journaled} runs of topic c, expected {cursor0 + n}')

        t_wall, t0 = time.time(), time.monotonic()
        stack.start_worker('w3', '--topics', 'c')
        caught = wait_caught_up(stack, db_path, cursor0 + n, calls0 + n) - t0
        results = wait_final(journal, sent, stack.procs.values(), max(120.0, n / 20), worker='w3')
        all_run = max(r[0][2] for r in results.values()) - t_wall
        check_once(db_path, sent)
    finally:
        stack.stop_all()
    return {f'catch-up of {n:,} calls (s)': caught,
            f'all {n:,} caught-up calls run (s)': all_run,
            'triggers while w3 away answered (req/s)': accept}


# -- the script ---------------------------------------------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This benchmark's options (named so they do not clash with dispatch.py's)."""
    ap.add_argument('--runs', type=int, default=100_000, help='runs in the journal at the big level (default: 100000)')
    ap.add_argument('--base', type=int, default=1000, help='runs in the journal at the small level (default: 1000)')
    ap.add_argument('--paced', type=int, default=200, help='paced triggers per level (default: 200)')
    ap.add_argument('--paced-rate', type=float, default=50.0, help='paced triggers per second (default: 50)')
    ap.add_argument('--fill-connections', type=int, default=32, help='wrk connections for the fill (default: 32)')
    ap.add_argument('--catchup', type=int, default=10_000, help='calls the away worker misses (default: 10000)')


def verdicts(rounds: list[dict], args) -> list[str]:
    """The two targets, judged on the median of the rounds."""
    summary = common.summarize(rounds)
    lo, hi = short(args.base), short(args.runs)
    lines = []
    for name in ('broker', 'w1', 'w2'):
        growth = summary[f'{name} RSS growth {lo} → {hi} (%)'][0]
        lines.append(f'{name} memory {lo} → {hi}: {growth:+.1f} % '
                     f'({"met" if abs(growth) <= 10 else "MISSED"}: flat within 10 %)')
    caught = summary[f'catch-up of {args.catchup:,} calls (s)'][0]
    lines.append(f'catch-up of {args.catchup:,} calls: {caught:.2f} s ({"met" if caught < 3 else "MISSED"}: under 3 s)')
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument('--repeat', type=int, default=1, help='rounds of both parts (default: 1; the fill is slow)')
    ap.add_argument('--keep', action='store_true', help='keep the temp folder (logs, databases) and print its path')
    args = ap.parse_args(argv)
    if args.runs <= args.base:
        ap.error('--runs must be larger than --base')
    for tool in ('mongrel2', stacks.WRK):
        if shutil.which(tool) is None:
            sys.exit(f'error: {tool} is not installed (apt-get install mongrel2-core wrk)')
    # SIGTERM unwinds like Ctrl-C, so the finally blocks below still stop every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    tmp = tempfile.mkdtemp(prefix='jobz-growth-')
    try:
        rounds = []
        for k in range(args.repeat):
            rounds.append(measure_growth(tmp, args) | measure_catchup(tmp, args))
            print(f'round {k + 1}/{args.repeat} done', file=sys.stderr, flush=True)
        problems = common.log_problems(tmp, noise=stacks.M2_NOISE)
    finally:
        if args.keep:
            print(f'kept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    common.print_report(f'Journal {args.base:,} → {args.runs:,} runs (fill by wrk -c {args.fill_connections}), '
                        f'{args.paced} paced triggers at {args.paced_rate:g}/s per level; catch-up of '
                        f'{args.catchup:,} calls; {len(rounds)} round(s), workers --concurrency 2', rounds, problems,
                        footer=['\nTargets:\n' + '\n'.join(f'- {line}' for line in verdicts(rounds, args))])
    return 0


if __name__ == '__main__':
    sys.exit(main())
