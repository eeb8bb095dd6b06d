#!/usr/bin/env python3
"""Fault storm: does jobz lose or repeat runs while its processes are killed at random?

Broker, Mongrel2 and workers w1, w2 (both on topics storm, storm_exp and
storm_pool; --concurrency 2) in a temp folder on free loopback ports. A job
appends its run id to ran-<worker>.txt, then sleeps 0.00-0.03 s: some kills
land mid-job, yet a worker keeps up with 50/s. storm and storm_exp (`expires:
2`) run on both workers; storm_pool (`run_on: one`) on exactly one of them.
One thread sends --n triggers at --rate/s (an --expiring share for storm_exp, a
--pool share for storm_pool; no catch-up burst after a stall). Another, seeded by --seed, injects faults at
random times: SIGKILL a random live worker and restart it 0.2-3 s later with the
same name and flags (its SQLite lets it catch up); SIGKILL the broker and
restart it 0-1 s later; restart Mongrel2. Then it waits up to --deadline s for
every accepted (HTTP 200) run to be final in /job_status (on both workers; a
pool run on the one that took it), and counts each (run, worker) pair, a pool
run as one pair whatever worker it ran on:
  ran once      succeeded, and the run id is once in ran-<worker>.txt
  interrupted   the worker died while it ran (ran 0 or 1 times, and says so)
  expired       a storm_exp call not started within 2 s, never ran
  lost          no final state by the deadline
  ran twice     the run id is in ran-<worker>.txt more than once (a pool run: in
                both files together)
  mismatched    a final state the file contradicts (failed; succeeded, never ran)
Refused triggers (errors, timeouts, other statuses) were never promised. Exit
status 1 if any pair was lost, ran twice or mismatched.
"""
import argparse
import collections
import heapq
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401  (puts the project root on sys.path)
from jobz.harness import LocalStack, Triggers, http  # noqa: E402
from jobz.protocol import FINAL_STATES  # noqa: E402

JOB = ('  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt; sleep %(pause)s"\n'
       "  params: {pause: '0\\.\\d\\d'}\n")
JOBS_YAML = 'storm:\n' + JOB + 'storm_exp:\n' + JOB + '  expires: 2\n' + 'storm_pool:\n' + JOB + '  run_on: one\n'
WORKERS = ('w1', 'w2')
WORKER_FLAGS = ('--topics', 'storm,storm_exp,storm_pool')
POOL = 'pool'    # the "worker" of a pool run's one pair
GOOD = {('succeeded', 1): 'ran once', ('interrupted', 0): 'interrupted',
        ('interrupted', 1): 'interrupted', ('expired', 0): 'expired'}
BAD = ('lost', 'ran twice', 'mismatched')


class Faults(threading.Thread):
    """Injects the planned faults at their times (seconds after start); restarts what it killed."""

    def __init__(self, stack: LocalStack, rng: random.Random, span: float, counts: dict[str, int]):
        super().__init__(daemon=True)
        self.stack, self.rng, self.counts = stack, rng, counts
        # (seconds after start, kind, worker name): one per fault, within 10%-85% of the trigger period
        self.events = sorted((rng.uniform(0.1 * span, 0.85 * span), kind, '')
                             for kind, n in counts.items() for _ in range(n))
        self.done: collections.Counter = collections.Counter()
        self.stop = threading.Event()
        self.start_time = 0.0

    def run(self) -> None:
        self.start_time = time.monotonic()
        while self.events and not self.stop.is_set():
            wait = self.start_time + self.events[0][0] - time.monotonic()
            if wait > 0:
                self.stop.wait(wait)
                continue
            self.fire(*heapq.heappop(self.events))

    def fire(self, _at: float, kind: str, name: str) -> None:
        stack, now = self.stack, time.monotonic() - self.start_time
        if kind == 'restart':
            self.say(f'restart {name}')
            stack.start_worker(name, *WORKER_FLAGS)
        elif kind == 'worker kills':
            up = [w for w in WORKERS if w in stack.procs]
            if not up:    # both down already: try again a little later
                heapq.heappush(self.events, (now + 0.5, kind, ''))
                return
            name, down = self.rng.choice(up), self.rng.uniform(0.2, 3.0)
            self.say(f'SIGKILL {name}, down {down:.1f}s')
            self.kill(name)
            heapq.heappush(self.events, (now + down, 'restart', name))
        elif kind == 'broker kills':
            down = self.rng.uniform(0.0, 1.0)
            self.say(f'SIGKILL broker, down {down:.1f}s')
            self.kill('broker')
            time.sleep(down)
            stack.start_broker()
        elif kind == 'Mongrel2 restarts':
            self.say('restart Mongrel2')
            stack.stop('mongrel2')
            stack.start_mongrel2()
        if kind != 'restart':
            self.done[kind] += 1

    def kill(self, name: str) -> None:
        status = self.stack.stop(name, signal.SIGKILL)
        if status != -signal.SIGKILL:    # it had died by itself: a crash, see its log
            self.say(f'!! {name} had already exited with status {status}')

    def say(self, what: str) -> None:
        print(f'  {time.monotonic() - self.start_time:5.1f}s  {what}', file=sys.stderr, flush=True)


def classify(state: str | None, times_ran: int) -> str:
    if times_ran > 1:
        return 'ran twice'
    if state not in FINAL_STATES:
        return 'lost'
    return GOOD.get((state, times_ran), 'mismatched')


def mentions(log_dir: str, run_id: str) -> list[str]:
    """The first log lines that name a run, from every process's log."""
    return [f'    {log.name}: {line}' for log in sorted(Path(log_dir).iterdir())
            for line in log.read_text(errors='replace').splitlines() if run_id in line][:8]


def build_stack(tmp: str) -> tuple[LocalStack, str]:
    """A stack on free ports in tmp, with its job file and logs; and the folder of ran-*.txt."""
    stack = LocalStack(tmp, JOBS_YAML, worker_args=['--concurrency', '2'])
    for w in WORKERS:
        Path(stack.out, f'ran-{w}.txt').touch()
    return stack, stack.out


def trigger_queries(n: int, expiring: float, pool: float, rng: random.Random):
    """n triggers: a share `expiring` of them for storm_exp, `pool` for storm_pool, each with a random pause."""
    for _ in range(n):
        draw = rng.random()
        job = 'storm_exp' if draw < expiring else 'storm_pool' if draw < expiring + pool else 'storm'
        yield f'job_name={job}&pause=0.0{rng.randint(0, 3)}'


def outcomes(url: str, run_ids, deadline: float) -> dict[tuple[str, str], str | None]:
    """{(run_id, worker): final state or None} once every run is final (or at the deadline); a pool run
    is one pair (run_id, POOL) with the state on the one worker that has it."""
    out, waiting = {}, set(run_ids)
    end = time.monotonic() + deadline
    while waiting:
        for run_id in sorted(waiting):
            try:
                status = http(f'{url}/job_status?run_id={run_id}', timeout=10.0)[1]
            except OSError:
                status = None
            found = {w: s['state'] for w, s in status.get('workers', {}).items()} if isinstance(status, dict) else {}
            if isinstance(status, dict) and status.get('job') == 'storm_pool':
                state = next(iter(found.values()), None) if len(found) == 1 else None
                out[run_id, POOL] = state
                done = state in FINAL_STATES
            else:
                for w in WORKERS:
                    out[run_id, w] = found.get(w)
                done = all(out[run_id, w] in FINAL_STATES for w in WORKERS)
            if done:
                waiting.discard(run_id)
        if not waiting or time.monotonic() > end:
            return out
        time.sleep(0.2)
    return out


def storm(stack: LocalStack, triggers: Triggers, faults: Faults, deadline: float) -> dict:
    """Start the stack, run triggers and faults, wait for final states; stop everything."""
    try:
        stack.start_broker()
        for w in WORKERS:
            stack.start_worker(w, *WORKER_FLAGS)
        stack.start_mongrel2()
        stack.wait_healthy(30.0, workers=len(WORKERS))
        triggers.start()
        faults.start()
        triggers.join()
        faults.join()
        stack.wait_healthy(30.0, workers=len(WORKERS))    # every process is up again
        print(f'storm over; waiting up to {deadline:g}s for final states', file=sys.stderr)
        return outcomes(stack.url, triggers.accepted, deadline)
    finally:
        triggers.stop.set()
        faults.stop.set()
        if faults.is_alive():
            faults.join(30.0)
        stack.stop_all()


def report(args, triggers: Triggers, faults: Faults, verdicts: dict, unpromised: int, took: float) -> None:
    counts = collections.Counter(verdicts.values())
    refused = ', '.join(f'{k}: {v}' for k, v in triggers.refused.most_common()) or 'none'
    rows = [('triggers sent', args.n), ('accepted (HTTP 200)', len(triggers.accepted)),
            ('refused', f'{sum(triggers.refused.values())} ({refused})'),
            ('(run, worker) pairs expected', len(verdicts)),
            *[(k, counts[k]) for k in ('ran once', 'interrupted', 'expired', *BAD)],
            ('not accepted, ran anyway (answer lost)', unpromised),
            *[(k, f'{faults.done[k]} of {n}') for k, n in faults.counts.items()],
            ('seed', args.seed), ('duration (s)', f'{took:.1f}')]
    print('\n'.join(['| count | value |', '|---|---:|'] + [f'| {k} | {v} |' for k, v in rows]))


def run(tmp: str, args) -> int:
    stack, out = build_stack(tmp)
    triggers = Triggers(stack.url, trigger_queries(args.n, args.expiring, args.pool, random.Random(args.seed)),
                        args.rate, timeout=5.0)
    faults = Faults(stack, random.Random(args.seed + 1), args.n / args.rate,
                    {'worker kills': args.worker_kills, 'broker kills': args.broker_kills,
                     'Mongrel2 restarts': args.mongrel2_restarts})
    began = time.monotonic()
    states = storm(stack, triggers, faults, args.deadline)
    ran = {w: collections.Counter(Path(out, f'ran-{w}.txt').read_text().split()) for w in WORKERS}
    ran[POOL] = ran['w1'] + ran['w2']    # a pool run counts wherever it ran
    verdicts = {(r, w): classify(state, ran[w][r]) for (r, w), state in states.items()}
    unpromised = {r for w in WORKERS for r in ran[w]} - set(triggers.accepted)
    report(args, triggers, faults, verdicts, len(unpromised), time.monotonic() - began)
    bad = sorted((v, r, w) for (r, w), v in verdicts.items() if v in BAD)
    for verdict, run_id, worker in bad[:10]:
        print(f'\n{verdict}: run {run_id} on {worker} (state {states[run_id, worker]}, '
              f'ran {ran[worker][run_id]}x)\n' + '\n'.join(mentions(stack.log_dir, run_id)))
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=1000, help='triggers to send (default: 1000)')
    ap.add_argument('--rate', type=float, default=50.0, help='triggers per second (default: 50)')
    ap.add_argument('--expiring', type=float, default=0.2, help='share of triggers for storm_exp (default: 0.2)')
    ap.add_argument('--pool', type=float, default=0.3, help='share of triggers for storm_pool (default: 0.3)')
    ap.add_argument('--worker-kills', type=int, default=5, help='worker SIGKILLs (default: 5)')
    ap.add_argument('--broker-kills', type=int, default=2, help='broker SIGKILLs (default: 2)')
    ap.add_argument('--mongrel2-restarts', type=int, default=1, help='Mongrel2 restarts (default: 1)')
    ap.add_argument('--seed', type=int, default=1, help='random seed (default: 1)')
    ap.add_argument('--deadline', type=float, default=120.0, help='seconds to wait for results (default: 120)')
    ap.add_argument('--keep', action='store_true', help='keep the temp folder (logs, state) and print it')
    args = ap.parse_args(argv)
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # so the finally blocks stop the stack
    tmp = tempfile.mkdtemp(prefix='jobz-faults-')
    try:
        return run(tmp, args)
    finally:
        if args.keep:
            print(f'\nkept {tmp}', file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
