#!/usr/bin/env python3
"""The latency floor: what the parts of a trigger's path cost on this machine, paced at --rate/s.

A trigger reaches a running command through: HTTP into Mongrel2 and over ZeroMQ to the broker,
the broker's durable commit, one ZeroMQ hop (PUB -> SUB) to the worker, the worker's durable
commit of "started", then the spawn. Each part is measured alone here, paced like the latency
benchmark (idle between events, as a machine at 50 triggers/s is):

- bare handler round trip: a GET through Mongrel2 to the bare handler of bench/front.py and
  back (two ZeroMQ hops and HTTP); also back to back, to show what waking idle threads costs.
- SQLite commit: one small row, WAL, synchronous=FULL (the journal's settings), in a folder on
  the disk the benchmarks use.
- ZeroMQ hop: PUB -> SUB over loopback TCP between two processes, one way (send time carried in
  the message).
- spawn: os.posix_spawn of /bin/sh -c true until it returns (as the worker spawns).

floor (trigger -> command start) = round trip / 2 + commit + hop + commit: what jobz cannot go
below without giving up a durable commit on either side. It leaves out all of jobz's own work.
Usage: .venv/bin/python bench/floor.py [--rate 50] [--n 300]
"""
import argparse
import http.client
import multiprocessing
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time

import zmq

import common
import front
import stacks
from jobz.harness import free_ports, wait_for


def paced(n: int, rate: float, once) -> list[float]:
    """Call once() n times at `rate`/s; it returns a duration in seconds. Durations in ms."""
    out = []
    begin = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, begin + i / rate - time.monotonic()))
        out.append(once() * 1000)
    return out


def bare_round_trips(tmp: str, n: int, rate: float) -> tuple[list[float], list[float]]:
    """(paced, back-to-back) round trips of GET / through Mongrel2 to the bare handler, in ms."""
    stack = stacks.make_stack(os.path.join(tmp, 'bare'), None)
    handler = [sys.executable, front.__file__, '--bare-handler', stack.addr('m2_recv'), stack.addr('m2_send')]
    try:
        stack.start_mongrel2()
        with common.started(handler, os.path.join(tmp, 'bare-handler.log')) as proc:
            wait_for(lambda: front.answers(stack.url + '/'), 30.0, 'bare handler', procs=[proc])
            conn = http.client.HTTPConnection('127.0.0.1', stack.port, timeout=10)

            def once() -> float:
                began = time.perf_counter()
                conn.request('GET', '/')
                conn.getresponse().read()
                return time.perf_counter() - began
            try:
                return paced(n, rate, once), paced(n, 1e9, once)
            finally:
                conn.close()
    finally:
        stack.stop_all()


def commits(folder: str, n: int, rate: float) -> list[float]:
    db = sqlite3.connect(os.path.join(folder, 'floor.db'), isolation_level=None)
    db.execute('PRAGMA journal_mode=WAL')
    db.execute('PRAGMA synchronous=FULL')
    db.execute('CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)')

    def once() -> float:
        began = time.perf_counter()
        db.execute('BEGIN')
        db.execute('INSERT INTO t (v) VALUES (?)', ('x' * 200,))
        db.execute('COMMIT')
        return time.perf_counter() - began
    try:
        return paced(n, rate, once)
    finally:
        db.close()


def _subscriber(addr: str, n: int, out) -> None:
    """Runs in its own process: receive n stamped messages, send back the one-way delays."""
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.subscribe(b'')
    sub.connect(addr)
    got = []
    while len(got) < n:
        stamp = float(sub.recv())
        if stamp > 0:    # 0: a probe while the subscription joins
            got.append((time.time() - stamp) * 1000)
    out.send(got)
    sub.close()
    ctx.term()


def zmq_hops(n: int, rate: float) -> list[float]:
    port, = free_ports(1)
    addr = f'tcp://127.0.0.1:{port}'
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.bind(addr)
    ours, theirs = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=_subscriber, args=(addr, n, theirs), daemon=True)
    proc.start()
    try:
        time.sleep(0.5)    # PUB drops what is sent before the subscription arrives
        for _ in range(5):
            pub.send(b'0')
        paced(n, rate, lambda: pub.send(str(time.time()).encode()) or 0.0)
        if not ours.poll(30):
            raise RuntimeError('the subscriber did not report')
        return ours.recv()
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        pub.close()
        ctx.term()


def spawns(n: int, rate: float) -> list[float]:
    env = dict(os.environ)

    def once() -> float:
        began = time.perf_counter()
        pid = os.posix_spawn('/bin/sh', ['/bin/sh', '-c', 'true'], env, setsid=True,
                             setsigdef=(signal.SIGPIPE,))
        took = time.perf_counter() - began
        os.waitpid(pid, 0)
        return took
    return paced(n, rate, once)


def measure(tmp: str, args) -> dict[str, float]:
    p50 = lambda values: common.percentile(values, 50)    # noqa: E731
    n = args.floor_n
    trips, hot = bare_round_trips(tmp, n, args.rate)
    commit = commits(tmp, n, args.rate)
    hop = zmq_hops(n, args.rate)
    spawn = spawns(n, args.rate)
    out = {f'bare handler round trip at {args.rate:g}/s p50 (ms)': p50(trips),
           'bare handler round trip back to back p50 (ms)': p50(hot),
           f'SQLite commit (WAL, synchronous=FULL) at {args.rate:g}/s p50 (ms)': p50(commit),
           f'SQLite commit (WAL, synchronous=FULL) at {args.rate:g}/s p99 (ms)': common.percentile(commit, 99),
           f'ZeroMQ PUB → SUB hop at {args.rate:g}/s p50 (ms)': p50(hop),
           f'posix_spawn of /bin/sh at {args.rate:g}/s p50 (ms)': p50(spawn)}
    out['floor: trigger → command start p50 (ms)'] = p50(trips) / 2 + 2 * p50(commit) + p50(hop)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument('--floor-n', type=int, default=300, help='events per part (default: 300)')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument('--rate', type=float, default=50.0, help='events per second (default: 50)')
    args = ap.parse_args(argv)
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    tmp = tempfile.mkdtemp(prefix='jobz-floor-')
    try:
        print(common.table([measure(tmp, args)]) + '\n\n' + common.machine())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
