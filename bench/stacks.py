"""A jobz stack for benchmarks, and the clients that drive and check it.

Every stack runs the real processes (Mongrel2, broker, workers, semaphores) on free loopback
ports, with its job file, state and logs in one folder. Results are read from the broker's
journal, opened read-only.
"""
import contextlib
import http.client
import json
import os
import re
import selectors
import socket
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common  # noqa: F401  (puts the project root on sys.path)
from jobz.db import open_db
from jobz.harness import LocalStack, free_port, wait_for
from jobz.protocol import FINAL_STATES
from jobz.stack import Stack

WRK = '/usr/bin/wrk'
M2_NOISE = ('Failed to open PID file',               # at every start: no PID file yet
            'Failed to accept', 'Receive on handler socket failed',   # at every SIGTERM
            'Receive on control failed', 'Failed to read message',
            'Task is already added', 'tasks stalled',    # at SIGTERM, with keep-alive connections open
            'No handler to notify')    # wrk closes connections with requests in flight
TIME_UNITS = {'us': 0.001, 'ms': 1.0, 's': 1000.0, 'm': 60_000.0, 'h': 3_600_000.0}   # wrk's -> ms


# -- the stack ---------------------------------------------------------------------------------
def make_stack(folder: str, jobs_yaml: str | None, concurrency: int = 2) -> Stack:
    """A stack on free ports with state in folder/home, logs in folder/logs, its job file (if any)."""
    return LocalStack(folder, jobs_yaml or '', tls_port=free_port(), worker_args=['--concurrency', str(concurrency)])


def start(stack: Stack, workers: dict[str, str], semaphores: dict[str, str] | None = None) -> None:
    """Broker, workers and semaphores (name -> topics), Mongrel2; wait until all have registered."""
    stack.start_broker()
    for name, topics in workers.items():
        stack.start_worker(name, '--topics', topics)
    for name, topics in (semaphores or {}).items():
        stack.start_semaphore(name, '--topics', topics)
    stack.start_mongrel2()
    stack.wait_healthy(60.0, workers=len(workers) + len(semaphores or {}))


def journal(stack: Stack) -> str:
    """Where the stack's broker journals: its PostgreSQL URL, or the SQLite file in its home."""
    return stack.journal or os.path.join(stack.home, 'journal.db')


# -- HTTP clients ------------------------------------------------------------------------------
def trigger(conn: http.client.HTTPConnection, query: str) -> tuple[str, float]:
    """One GET /job_start?QUERY on a keep-alive connection: (run_id, time.time() when sent)."""
    sent = time.time()
    conn.request('GET', f'/job_start?{query}')
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f'trigger {query} answered {resp.status}: {body[:200]!r}')
    return json.loads(body)['run_id'], sent


def plain(stack: Stack):
    """How the clients connect by default: plain HTTP to the stack's front end."""
    return lambda: http.client.HTTPConnection('127.0.0.1', stack.port, timeout=60)


def send_many(stack: Stack, queries: list[str], connections: int = 4, connect=None) -> dict[str, float]:
    """Every trigger in queries, as fast as `connections` keep-alive connections (threads) go.

    connect() makes a connection (default: plain HTTP); returns run_id -> send time."""
    local, conns, lock = threading.local(), [], threading.Lock()
    connect = connect or plain(stack)

    def one(query: str) -> tuple[str, float]:
        if not hasattr(local, 'conn'):
            local.conn = connect()
            with lock:
                conns.append(local.conn)
        return trigger(local.conn, query)

    try:
        with ThreadPoolExecutor(connections) as pool:
            return dict(pool.map(one, queries))
    finally:
        for conn in conns:
            conn.close()


def blast(port: int, queries: list[str], connections: int = 32) -> dict[str, float]:
    """Every trigger in queries, over `connections` keep-alive connections in one thread.

    One request in flight per connection, answers read without an HTTP library: the client
    costs a few per cent of a core, so the machine's time goes to what is measured.
    Returns run_id -> time.time() when its request was sent; raises on any answer but 200."""
    todo = list(reversed(queries))
    sent: dict[str, float] = {}
    pending: dict[socket.socket, tuple[bytes, float]] = {}    # connection -> (unread bytes, sent at)
    with selectors.DefaultSelector() as sel:
        def send(conn: socket.socket) -> None:
            query = todo.pop()
            pending[conn] = (pending.get(conn, (b'', 0.0))[0], time.time())
            conn.sendall(f'GET /job_start?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n'.encode())

        conns = [socket.create_connection(('127.0.0.1', port)) for _ in range(min(connections, len(todo)))]
        try:
            for conn in conns:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ)
                send(conn)
            busy = len(conns)
            while busy:
                for key, _ in sel.select(60):
                    conn = key.fileobj
                    data = conn.recv(65536)
                    if not data:
                        raise RuntimeError('the front end closed a connection')
                    buf, at = pending[conn]
                    buf += data
                    head_end = buf.find(b'\r\n\r\n')
                    if head_end < 0:
                        pending[conn] = (buf, at)
                        continue
                    head = buf[:head_end].decode('latin-1')
                    length = int(re.search(r'(?i)content-length:\s*(\d+)', head)[1])
                    if len(buf) < head_end + 4 + length:
                        pending[conn] = (buf, at)
                        continue
                    body = buf[head_end + 4:head_end + 4 + length]
                    if not head.startswith('HTTP/1.1 200'):
                        raise RuntimeError(f'trigger answered {head.splitlines()[0]}: {body[:200]!r}')
                    sent[json.loads(body)['run_id']] = at
                    pending[conn] = (buf[head_end + 4 + length:], at)
                    if todo:
                        send(conn)
                    else:
                        busy -= 1
        finally:
            for conn in conns:
                conn.close()
    return sent


def send_paced(stack: Stack, queries: list[str], rate: float, connect=None) -> tuple[dict[str, float], list[float]]:
    """The triggers at `rate`/s from one connection: (run_id -> send time, answer times in ms)."""
    sent, answer_ms = {}, []
    conn = (connect or plain(stack))()
    begin = time.monotonic()
    try:
        for i, query in enumerate(queries):
            time.sleep(max(0.0, begin + i / rate - time.monotonic()))
            run_id, t = trigger(conn, query)
            answer_ms.append((time.time() - t) * 1000)
            sent[run_id] = t
    finally:
        conn.close()
    return sent, answer_ms


def run_wrk(url: str, seconds: float, connections: int, threads: int = 2) -> dict:
    """One wrk run; its numbers, or an error if any answer was not 2xx or a socket failed."""
    cmd = [WRK, '-t', str(threads), '-c', str(connections), '-d', f'{seconds:g}s', '--latency', url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    got = parse_wrk(out)
    if got['non2xx'] or got['socket_errors']:
        raise RuntimeError(f'wrk {url}: {got["non2xx"]} non-2xx answers, '
                           f'{got["socket_errors"]} socket errors:\n{out}')
    return got


def parse_wrk(out: str) -> dict:
    """requests, req/s, p50/p99 (ms), non-2xx count and socket errors from wrk's report."""
    def find(pattern: str) -> re.Match:
        match = re.search(pattern, out, re.M)
        if not match:
            raise RuntimeError(f'wrk output without {pattern!r}:\n{out}')
        return match

    def latency(pct: str) -> float:
        value, unit = find(rf'^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$').groups()
        return float(value) * TIME_UNITS[unit]

    non2xx = re.search(r'Non-2xx or 3xx responses:\s+(\d+)', out)
    errors = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', out)
    return {'requests': int(find(r'^\s+(\d+) requests in ').group(1)),
            'rate': float(find(r'^Requests/sec:\s+([\d.]+)').group(1)),
            'p50': latency('50'), 'p99': latency('99'),
            'non2xx': int(non2xx.group(1)) if non2xx else 0,
            'socket_errors': sum(map(int, errors.groups())) if errors else 0}


# -- reading the journal (read-only) -------------------------------------------------------------
_postgres: dict = {}    # URL -> one connection, kept: a new one per poll would cost more than the poll


def open_ro(path: str):
    """For `with open_ro(journal) as db`: the SQLite file read-only, or a PostgreSQL journal's URL."""
    if path.startswith('postgresql://'):
        if path not in _postgres:
            _postgres[path] = open_db(path)    # autocommit: every SELECT sees the latest commit
        return contextlib.nullcontext(_postgres[path])
    # Autocommit: every SELECT sees the latest commit of the writer (WAL).
    return sqlite3.connect(f'file:{path}?mode=ro', uri=True, isolation_level=None, timeout=10)


def count_runs(path: str, job: str | None = None) -> int:
    with open_ro(path) as db:
        if job:
            return db.execute('SELECT count(*) FROM runs WHERE job = ?', (job,)).fetchone()[0]
        return db.execute('SELECT count(*) FROM runs').fetchone()[0]


def settled_runs(path: str, job: str | None = None) -> int:
    """The runs count once it stops moving (requests wrk left in flight are journaled by then)."""
    last = count_runs(path, job)
    while True:
        time.sleep(0.2)
        now = count_runs(path, job)
        if now == last:
            return now
        last = now


def wait_final(path: str, run_ids, procs, timeout: float, worker: str | None = None,
               per_run: int = 1, state: str = 'succeeded') -> dict[str, list[tuple]]:
    """Wait until every run has its final results; return run_id -> [(worker, started, finished)].

    Raises unless each run has exactly `per_run` result rows (of `worker`, if given), all in `state`."""
    wanted = set(run_ids)

    def rows():
        with open_ro(path) as db:
            got = db.execute('SELECT run_id, worker, state, started, finished FROM results').fetchall()
        return [r for r in got if r[0] in wanted]

    def all_final():
        mine = rows()
        return mine if sum(r[2] in FINAL_STATES for r in mine) >= per_run * len(wanted) else None

    mine = wait_for(all_final, timeout, f'final results of {len(wanted)} runs', 0.01, procs)
    ok = [r for r in mine if r[2] == state and worker in (None, r[1])]
    if len(mine) != per_run * len(wanted) or len(ok) != len(mine) or {r[0] for r in ok} != wanted:
        states = {s: sum(r[2] == s for r in mine) for s in {r[2] for r in mine}}
        raise RuntimeError(f'expected {len(wanted)} runs to end {state} {per_run} time(s) each'
                           f'{" on " + worker if worker else ""}; the journal has {len(mine)} result rows, '
                           f'{len(ok)} good; states {states}')
    out: dict[str, list[tuple]] = {}
    for r in ok:
        out.setdefault(r[0], []).append((r[1], r[3], r[4]))
    return out
