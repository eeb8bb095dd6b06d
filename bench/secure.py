#!/usr/bin/env python3
"""Dispatch benchmark: how fast jobz turns HTTP triggers into started commands.

Each round starts a fresh stack (Mongrel2, broker, two workers) on free loopback
ports in a temp folder. The job file holds two jobs running `true`, `bench_a`
(topic a) and `bench_b` (topic b); worker w1 subscribes to a, w2 to b, and the
triggers alternate, so every run runs on exactly one worker and the load is split.

- throughput: N triggers (GET /job_start) from a few threads over keep-alive
  connections, all answers 200; then wait until the broker's journal
  (<home>/journal.db, opened read-only) holds N succeeded results and no other.
  jobs/s = N / (last results.finished - first trigger sent).
- latency: triggers paced at --rate; per run, client send time (time.time())
  versus results.started (when the worker spawned the command): p50/p99. Also
  the HTTP answer time (trigger accepted) p50/p99.
- raw: the peer limit, Python spawning `true` (subprocess.Popen, then wait) in
  2 processes for N jobs; jobs/s and the ratio jobz/raw.

Every measurement is repeated --repeat times; the table shows median and min-max.
Usage: .venv/bin/python bench/dispatch.py [--n 2000] [--rate 50] [--repeat 3]
"""
import argparse
import collections
import contextlib
import http.client
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jobz.stack import Stack  # noqa: E402

JOBS_YAML = 'bench_a:\n  command: "true"\n  topic: a\nbench_b:\n  command: "true"\n  topic: b\n'
JOB_NAMES = ('bench_a', 'bench_b')
CLIENT_THREADS = 4
M2_NOISE = ('Failed to open PID file',               # at every start: no PID file yet
            'Failed to accept', 'Receive on handler socket failed',   # at every SIGTERM
            'Receive on control failed', 'Failed to read message')


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound to port 0 all at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def make_stack(home: str, jobfile: str, secure: dict | None) -> Stack:
    http_port, tls_port, *zmq_ports = free_ports(8)
    stack = Stack(home, [jobfile], port=http_port, worker_args=['--concurrency', '2'],
                  ports=dict(zip(('pub', 'router', 'm2_recv', 'm2_send', 'm2_tls_recv', 'm2_tls_send'), zmq_ports)),
                  log_dir=os.path.join(home, 'logs'), tls=secure and secure['ca'], tls_port=tls_port)
    if secure:
        stack.broker_args = ['--curve-secret', f"{secure['keys']}/broker.key_secret", '--enrolled', secure['enrolled']]
    return stack


def make_secrets(tmp: str) -> dict:
    """A CA with a server and a client certificate, and CURVE keys for the broker, w1 and w2."""
    from jobz import ca, keys
    secure = {'ca': f'{tmp}/ca', 'keys': f'{tmp}/keys', 'enrolled': f'{tmp}/enrolled'}
    with contextlib.redirect_stdout(io.StringIO()):
        ca.main(['--dir', secure['ca'], 'init'])
        ca.main(['--dir', secure['ca'], 'server', 'jobz-tls', '--host', '127.0.0.1'])
        ca.main(['--dir', secure['ca'], 'client', 'bench'])
        for name in ('broker', 'w1', 'w2'):
            keys.main(['new', name, '--dir', secure['keys']])
        for name in ('w1', 'w2'):
            keys.main(['enroll', f"{secure['keys']}/{name}.key", '--enrolled', secure['enrolled']])
    ctx = ssl.create_default_context(cafile=f"{secure['ca']}/ca.crt")
    ctx.load_cert_chain(f"{secure['ca']}/clients/bench.crt", f"{secure['ca']}/clients/bench.key")
    secure['context'] = ctx
    return secure


def start_stack(stack: Stack, secure: dict | None) -> None:
    """Broker, w1 on topic a, w2 on topic b, Mongrel2; their output goes to <home>/logs/."""
    os.makedirs(stack.home)
    stack.start_broker()
    for name, topic in (('w1', 'a'), ('w2', 'b')):
        curve = ['--curve-secret', f"{secure['keys']}/{name}.key_secret",
                 '--broker-key', f"{secure['keys']}/broker.key"] if secure else []
        stack.start_worker(name, '--topics', topic, *curve)
    stack.start_mongrel2()
    stack.wait_healthy(30.0, workers=2)


def connect(stack: Stack, secure: dict | None) -> http.client.HTTPConnection:
    """A keep-alive connection to the front end: plain HTTP, or HTTPS with our client certificate."""
    if secure:
        return http.client.HTTPSConnection('127.0.0.1', stack.tls_port, context=secure['context'], timeout=30)
    return http.client.HTTPConnection('127.0.0.1', stack.port, timeout=30)


def trigger(conn: http.client.HTTPConnection, job: str) -> tuple[str, float, float]:
    """One GET /job_start on a keep-alive connection: (run_id, sent at, answered at)."""
    sent = time.time()
    conn.request('GET', f'/job_start?job_name={job}')
    resp = conn.getresponse()
    body = resp.read()
    answered = time.time()
    if resp.status != 200:
        raise RuntimeError(f'trigger of {job} answered {resp.status}: {body[:200]!r}')
    return json.loads(body)['run_id'], sent, answered


def send_burst(stack: Stack, secure, n: int) -> dict[str, float]:
    """n triggers as fast as CLIENT_THREADS keep-alive connections go: run_id -> send time."""
    local, conns = threading.local(), []

    def one(i: int) -> tuple[str, float, float]:
        if not hasattr(local, 'conn'):    # one keep-alive connection per client thread
            local.conn = connect(stack, secure)
            conns.append(local.conn)
        return trigger(local.conn, JOB_NAMES[i % 2])

    try:
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            return {run_id: sent for run_id, sent, _ in pool.map(one, range(n))}
    finally:
        for conn in conns:
            conn.close()


def send_paced(stack: Stack, secure, n: int, rate: float) -> tuple[dict[str, float], list[float]]:
    """n triggers at `rate`/s from one connection: (run_id -> send time, answer times in s)."""
    sent, answer_times = {}, []
    conn = connect(stack, secure)
    start = time.monotonic()
    try:
        for i in range(n):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            run_id, t, answered = trigger(conn, JOB_NAMES[i % 2])
            sent[run_id] = t
            answer_times.append(answered - t)
    finally:
        conn.close()
    return sent, answer_times


def wait_results(journal: str, run_ids, deadline_s: float) -> dict[str, tuple]:
    """Wait until every run has a final result; return run_id -> (worker, state, started, finished).

    Checks that each run ran exactly once (one result row) and succeeded."""
    wanted = set(run_ids)
    end = time.monotonic() + deadline_s
    db = sqlite3.connect(f'file:{journal}?mode=ro', uri=True)
    try:
        while True:
            rows = db.execute('SELECT run_id, worker, state, started, finished FROM results').fetchall()
            mine = [r for r in rows if r[0] in wanted]
            done = [r for r in mine if r[2] not in ('pending', 'running')]
            if len(done) >= len(wanted) or time.monotonic() > end:
                break
            time.sleep(0.05)
    finally:
        db.close()
    states = dict(collections.Counter(r[2] for r in mine))
    ok = [r for r in mine if r[2] == 'succeeded']
    if len(ok) != len(wanted) or len(mine) != len(wanted) or {r[0] for r in ok} != wanted:
        raise RuntimeError(f'expected {len(wanted)} runs succeeded once each; journal has {len(mine)} '
                           f'result rows, {len(ok)} succeeded, {len(done)} final; states {states}')
    return {r[0]: r[1:] for r in ok}


def percentile(values, q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spawn_true(n: int) -> None:
    for _ in range(n):
        subprocess.Popen(['true']).wait()


def raw_rate(n: int, procs: int = 2) -> float:
    """Jobs/s of plain subprocess.Popen(['true']) in `procs` processes, n in all."""
    with multiprocessing.Pool(procs) as pool:
        start = time.monotonic()
        pool.map(spawn_true, [n // procs + (i < n % procs) for i in range(procs)])
        return n / (time.monotonic() - start)


def one_round(tmp: str, k: int, args, secure: dict | None) -> dict[str, float]:
    home = os.path.join(tmp, f'round{k}')
    jobfile = os.path.join(tmp, 'bench.yaml')
    stack = make_stack(home, jobfile, secure)
    journal = os.path.join(home, 'journal.db')
    try:
        start_stack(stack, secure)
        sent = send_burst(stack, secure, args.n)
        first = min(sent.values())
        accept = args.n / (time.time() - first)
        results = wait_results(journal, sent, max(60.0, args.n / 10))
        jobz = args.n / (max(r[3] for r in results.values()) - first)

        sent, answers = send_paced(stack, secure, args.latency_n, args.rate)
        results = wait_results(journal, sent, 60.0)
        start_lat = [(results[run_id][2] - t) * 1000 for run_id, t in sent.items()]
    finally:
        stack.stop_all()
    raw = raw_rate(args.n)
    return {'jobz throughput (jobs/s)': jobz,
            'burst triggers answered (req/s)': accept,
            'raw Popen `true`, 2 procs (jobs/s)': raw,
            'ratio jobz / raw': jobz / raw,
            'trigger → command start p50 (ms)': percentile(start_lat, 50),
            'trigger → command start p99 (ms)': percentile(start_lat, 99),
            'HTTP answer p50 (ms)': percentile(answers, 50) * 1000,
            'HTTP answer p99 (ms)': percentile(answers, 99) * 1000}


def log_problems(tmp: str) -> list[str]:
    """Warning/error lines in the stacks' logs, minus Mongrel2's usual start/stop noise."""
    found = []
    for folder, _, files in os.walk(tmp):
        for name in [f for f in files if f.endswith(('.log', '.out'))]:
            with open(os.path.join(folder, name), errors='replace') as f:
                found += [f'{name}: {line.rstrip()}' for line in f
                          if any(w in line for w in ('WARNING', 'ERROR', 'Traceback'))
                          and not any(n in line for n in M2_NOISE)]
    return found


def machine() -> str:
    model = 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    return f'Machine: {os.cpu_count()} CPUs (nproc), {model}, Python {platform.python_version()}'


def table(rounds: list[dict], args) -> str:
    mode = 'HTTPS with client certificates + CURVE' if args.secure else 'plain HTTP, no CURVE'
    lines = [f'N={args.n} burst triggers, {args.latency_n} paced at {args.rate:g}/s, '
             f'{len(rounds)} round(s), 2 workers x concurrency 2, {mode}', '',
             '| metric | median | min – max |', '|---|---:|---:|']
    for metric in rounds[0]:
        values = [r[metric] for r in rounds]
        lines.append(f'| {metric} | {statistics.median(values):.2f} | '
                     f'{min(values):.2f} – {max(values):.2f} |')
    return '\n'.join(lines + ['', machine()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=2000, help='triggers for throughput and raw (default: 2000)')
    ap.add_argument('--rate', type=float, default=50.0, help='paced triggers per second (default: 50)')
    ap.add_argument('--latency-n', type=int, default=300, help='paced triggers (default: 300)')
    ap.add_argument('--repeat', type=int, default=3, help='rounds of each measurement (default: 3)')
    ap.add_argument('--secure', action='store_true',
                    help='triggers over the HTTPS front end with a client certificate, CURVE to the workers')
    args = ap.parse_args(argv)
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    tmp = tempfile.mkdtemp(prefix='jobz-bench-')
    try:
        with open(os.path.join(tmp, 'bench.yaml'), 'w') as f:
            f.write(JOBS_YAML)
        secure = make_secrets(tmp) if args.secure else None
        rounds = []
        for k in range(args.repeat):
            rounds.append(one_round(tmp, k, args, secure))
            print(f'round {k + 1}/{args.repeat}: ' + ', '.join(f'{v:.1f}' for v in rounds[-1].values()),
                  file=sys.stderr, flush=True)
        problems = log_problems(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rounds, args))
    if problems:
        print(f'\n{len(problems)} warning/error line(s) in the stack logs, first ones:')
        print('\n'.join(problems[:10]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
