#!/usr/bin/env python3
"""Front-end benchmark: HTTP requests answered per second through Mongrel2, measured with wrk.

Every round starts fresh processes on free loopback ports in a folder of its own, and
stops them all at the end. The load generator is `wrk` (Debian package) with 2 threads,
--connections keep-alive connections (default 32) for --duration seconds (default 5), and
--latency; we take its "Requests/sec:" line and its 50% and 99% latency.

1. bare: Mongrel2 (jobz.stack.Stack.start_mongrel2, the project's mongrel2.conf) in front
   of a tiny handler, this script run as `front.py --bare-handler RECV SEND`. It pulls
   requests with jobz.m2 (the broker's protocol code), up to 256 per poll like the broker,
   and answers each at once with a fixed small JSON 200. No broker runs: this is the
   ceiling of Mongrel2 plus a Python handler on this machine.
2. jobz /health: the real broker (Stack.start_broker + start_mongrel2, no workers); an
   answer from memory, no journal write: the broker's per-request handling cost.
3. jobz /job_start?job_name=front_bench: each request creates a run. The job runs `true`
   on topic front_bench, to which no worker subscribes, so this measures only the broker:
   validate, journal durably (SQLite WAL, synchronous=FULL, one commit per burst),
   publish, answer. Afterwards the runs in <home>/journal.db (opened read-only) are
   counted against wrk's 200 answers (its requests minus its "Non-2xx or 3xx responses",
   which must be 0; the broker logs each run at INFO, as in production). wrk drops the requests still in flight when time is up (at most one per
   connection): Mongrel2 had already passed them on, so the broker journaled them but
   nobody read the answer. Hence the check: answered <= runs <= answered + connections,
   else an error (fewer runs would mean an accepted trigger was lost).

Any non-2xx answer or wrk socket error (connect, read, write, timeout) fails the round.
Metrics: req/s and p50/p99 latency (ms) of each, and the ratios to bare.
Usage: .venv/bin/python bench/front.py [--duration 5] [--connections 32] [--repeat 3]
"""
import argparse
import os
import shutil
import signal
import sys
import tempfile
import urllib.request

import zmq

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
import common  # noqa: E402  (puts the project root on sys.path)
import stacks  # noqa: E402
from jobz import m2  # noqa: E402
from jobz.harness import wait_for  # noqa: E402

WRK_THREADS = 2
JOB = 'front_bench'
JOBS_YAML = f'{JOB}:\n  command: "true"\n  topic: {JOB}\n'
BARE_BODY = b'{"ok": true}'
HANDLER_BATCH = 256    # the broker's BATCH: messages taken per poll


# -- the bare handler (a subprocess of this script) ---------------------------
def bare_handler(recv_spec: str, send_spec: str) -> int:
    """Answer every Mongrel2 request at once with a fixed JSON 200, until SIGTERM."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    ctx = zmq.Context()
    conn = m2.Connection(ctx, recv_spec, send_spec, 'jobz')    # 'jobz': the handler's recv_ident
    poller = zmq.Poller()
    poller.register(conn.reqs, zmq.POLLIN)
    try:
        while not stopping:
            if poller.poll(100):
                answer_burst(conn)
    finally:
        conn.close()
        ctx.term()
    return 0


def answer_burst(conn: m2.Connection) -> None:
    """Take what is waiting (up to HANDLER_BATCH, as the broker does) and answer each request."""
    for _ in range(HANDLER_BATCH):
        try:
            req = m2.Request.parse(conn.reqs.recv(zmq.NOBLOCK))
        except zmq.Again:
            return
        if req.method == 'JSON':    # disconnect notices: never answered (Mongrel2 would loop)
            continue
        conn.reply_http(req, 200, BARE_BODY)


def metrics(label: str, got: dict) -> dict[str, float]:
    return {f'{label} (req/s)': got['rate'],
            f'{label} p50 (ms)': got['p50'],
            f'{label} p99 (ms)': got['p99']}


# -- the processes -------------------------------------------------------------
def answers(url: str) -> bool:
    """True once url answers 200 (a short timeout: a reply PUB drops while it joins is retried)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def measure_bare(folder: str, args) -> dict:
    """wrk against Mongrel2 and the bare handler."""
    stack = stacks.make_stack(folder, None)
    handler = [sys.executable, os.path.abspath(__file__), '--bare-handler',
               stack.addr('m2_recv'), stack.addr('m2_send')]
    try:
        stack.start_mongrel2()
        with common.started(handler, os.path.join(folder, 'bare-handler.log')) as proc:
            wait_for(lambda: answers(stack.url + '/'), 30.0, 'bare handler answering',
                     procs=[proc, *stack.procs.values()])
            return stacks.run_wrk(stack.url + '/', args.duration, args.connections, WRK_THREADS)
    finally:
        stack.stop_all()


def measure_jobz(folder: str, args) -> tuple[dict, dict]:
    """wrk against the broker behind Mongrel2: /health, then /job_start (checked against the journal)."""
    stack = stacks.make_stack(folder, JOBS_YAML)
    journal = stacks.journal(stack)
    try:
        stack.start_broker()
        stack.start_mongrel2()
        stack.wait_healthy(30.0, workers=0)
        health = stacks.run_wrk(stack.url + '/health', args.duration, args.connections, WRK_THREADS)
        before = stacks.count_runs(journal, JOB)
        start = stacks.run_wrk(f'{stack.url}/job_start?job_name={JOB}', args.duration, args.connections, WRK_THREADS)
        answered = start['requests'] - start['non2xx']
        runs = stacks.settled_runs(journal, JOB) - before
    finally:
        stack.stop_all()
    if not answered <= runs <= answered + args.connections:
        raise RuntimeError(f'/job_start: wrk got {answered} answers 200 but the journal has {runs} runs '
                           f'(expected {answered} plus at most {args.connections} left in flight)')
    print(f'  /job_start: {answered} answered 200, {runs} runs journaled '
          f'({runs - answered} in flight when wrk stopped)', file=sys.stderr, flush=True)
    return health, start


# -- the interface other scripts use -------------------------------------------
def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This benchmark's options (another script may add them to its own parser)."""
    ap.add_argument('--duration', type=int, default=5,
                    help='seconds of wrk load per measurement (default: 5)')
    ap.add_argument('--connections', type=int, default=32,
                    help=f'wrk keep-alive connections, over {WRK_THREADS} threads (default: 32)')


def measure(tmp: str, args) -> dict[str, float]:
    """One round: bare handler, jobz /health, jobz /job_start; tmp is a fresh folder for it."""
    if shutil.which(stacks.WRK) is None or shutil.which('mongrel2') is None:
        raise RuntimeError('needs wrk and mongrel2 (apt-get install wrk mongrel2-core)')
    bare = measure_bare(os.path.join(tmp, 'bare'), args)
    health, start = measure_jobz(os.path.join(tmp, 'jobz'), args)
    return {**metrics('bare Mongrel2 handler', bare),
            **metrics('jobz /health via Mongrel2', health),
            **metrics('jobz /job_start via Mongrel2', start),
            'ratio jobz /health / bare': health['rate'] / bare['rate'],
            'ratio jobz /job_start / bare': start['rate'] / bare['rate']}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--bare-handler']:    # the subprocess measure_bare starts
        return bare_handler(*argv[1:3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeat', type=int, default=3, help='rounds (default: 3)')
    add_arguments(ap)
    args = ap.parse_args(argv)
    rounds, problems = common.run_rounds('jobz-bench-front-', args.repeat,
                                         lambda tmp, k: measure(tempfile.mkdtemp(dir=tmp), args),
                                         stacks.M2_NOISE)
    common.print_report(f'wrk -t {WRK_THREADS} -c {args.connections} -d {args.duration:g}s (keep-alive), '
                        f'{len(rounds)} round(s), loopback', rounds, problems)
    return 0


if __name__ == '__main__':
    sys.exit(main())
