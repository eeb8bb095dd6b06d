#!/usr/bin/env python3
"""Peer benchmark: the job runners people pick instead of jobz, on the same work as bench/dispatch.py.

Each job runs the shell command `true` (subprocess.run(['true']) inside the task), 2 worker
processes, loopback. One Debian redis-server (free loopback port, own temp dir, no persistence)
serves the run; the workers are started afresh for each round.
- Celery + Redis (broker and result backend): `celery worker -c 2 -P prefork`, default settings
  (prefetch x4, ack on receipt); shell tasks ignore results.
- RQ, 2 `rq worker` processes (log level WARNING): the default Worker, which forks a work horse
  for each job, and SimpleWorker, which runs jobs in the worker process.
- raw: Python running `true` with subprocess.run in 2 processes: the limit.

Every job appends "index submitted started finished" (time.time()) to a Redis list; we wait for
N entries and check that every index 0..N-1 is there exactly once.
- throughput: N jobs submitted by one client as fast as it goes (apply_async / enqueue);
  jobs/s = N / (last command finished - first submit).
- latency: --latency-n jobs paced at --rate; the submit time carried in the message versus the
  start time taken in the task just before the spawn: p50/p99 in ms.
- chord (Celery): 100 shell tasks -> callback: submit -> callback done, and the last member's
  command finished -> callback start.
Each measurement is repeated --repeat times; the table shows median and min-max.
Needs: apt-get install redis-server; .venv/bin/pip install celery redis rq
Usage: .venv/bin/python bench/peers.py [--n 2000] [--rate 50] [--latency-n 300] [--repeat 3]
"""
import argparse
import contextlib
import math
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
URL_ENV = 'JOBZ_PEERS_REDIS'       # how the workers (which import this file as `peers`) find Redis
try:
    import redis
    import rq
    from celery import Celery, chord
    from rq import Queue, Worker
except ImportError as e:
    sys.exit(f'error: {e}; install the peers: .venv/bin/pip install celery redis rq')

CHORD_SIZE = 100
WARM_UP = 20
PROBLEMS = ('WARNING', 'ERROR', 'CRITICAL', 'Traceback', 'Error')
NOISE = ('superuser privileges', 'absolutely not recommended', 'C_FORCE_ROOT', 'uid=0', 'Memory overcommit')
_db = (None, None)


def db() -> redis.Redis:
    """This process's Redis client (a new one after a fork)."""
    global _db
    if _db[0] != os.getpid():
        _db = (os.getpid(), redis.Redis.from_url(os.environ[URL_ENV]))
    return _db[1]


def shell_job(key: str, i: int, submitted: float) -> int:
    """The job: run `true` as a shell job would, then report its timings under `key`."""
    started = time.time()
    subprocess.run(['true'], check=True)
    db().rpush(key, f'{i} {submitted} {started} {time.time()}')
    return i


def chord_callback(results: list, key: str) -> None:
    started = time.time()
    ok = sorted(results) == list(range(len(results)))
    db().rpush(key, f'{len(results) if ok else -1} {started} {time.time()}')


app = Celery('peers', broker=os.environ.get(URL_ENV), backend=os.environ.get(URL_ENV))
app.conf.update(broker_connection_retry_on_startup=True)
celery_true = app.task(name='peers.true', ignore_result=True)(shell_job)
celery_member = app.task(name='peers.member')(shell_job)
celery_callback = app.task(name='peers.callback', ignore_result=True)(chord_callback)


# --- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(cmd: list[str], log: str):
    """Run cmd in a new session (so Ctrl-C reaches only us) and always stop it afterwards."""
    env = dict(os.environ, PYTHONPATH=BENCH)
    with open(log, 'ab') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the process (warm shutdown), then SIGKILL to whatever is left in its group.

    We wait for the leader without reaping it, so its pid (which is also the group id) cannot be
    reused before the final killpg. A Ctrl-C while waiting skips to the SIGKILL."""
    try:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        while (os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
               and time.monotonic() < end):
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(check, what: str, procs=(), timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if any(p.poll() is not None for p in procs) or time.monotonic() > end:
            raise RuntimeError(f'{what} did not come up (see its log)')
        time.sleep(0.1)


def drop_result_subscriptions() -> None:
    """Make the Celery client forget the chord results it follows (left after an interruption)
    before Redis stops: else each one tries to unsubscribe at exit, from a stopped Redis."""
    with contextlib.suppress(AttributeError, redis.RedisError):
        app.backend.result_consumer.subscribed_to.clear()
        app.backend.result_consumer.stop()


def start_redis(stack: contextlib.ExitStack, tmp: str) -> None:
    port = free_port()
    proc = stack.enter_context(started(
        ['redis-server', '--bind', '127.0.0.1', '--port', str(port), '--dir', tmp, '--save', '',
         '--appendonly', 'no', '--daemonize', 'no'], f'{tmp}/redis.log'))
    stack.callback(drop_result_subscriptions)                 # runs before Redis stops
    url = os.environ[URL_ENV] = f'redis://127.0.0.1:{port}/0'
    app.conf.update(broker_url=url, result_backend=url)

    def up() -> bool:
        with contextlib.suppress(redis.ConnectionError):
            return db().ping()
    wait_until(up, 'redis-server', [proc])


@contextlib.contextmanager
def celery_worker(tmp: str, k: int):
    cmd = [sys.executable, '-m', 'celery', '-A', 'peers', 'worker', '-c', '2', '-P', 'prefork',
           '-l', 'warning', '-n', f'peers{k}@%h']
    with started(cmd, f'{tmp}/celery{k}.log') as proc:
        wait_until(lambda: app.control.ping(timeout=0.5), 'celery worker', [proc])
        yield lambda key, i, t: celery_true.apply_async((key, i, t))


@contextlib.contextmanager
def rq_workers(tmp: str, k: int, cls: str):
    queue = Queue('peers', connection=db())
    names = [f'peers-{cls.rsplit(".", 1)[1]}-{k}-{j}' for j in (1, 2)]
    # -c peers: the worker imports the job module once and its work horses inherit it (RQ's
    # performance advice); else every horse imports this file anew, Celery included.
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(started(
            [sys.executable, '-m', 'rq.cli', 'worker', '-u', os.environ[URL_ENV], '-w', cls, '-n', name,
             '-c', 'peers', '--logging_level', 'WARNING', 'peers'], f'{tmp}/{name}.log')) for name in names]
        wait_until(lambda: set(names) <= {w.name for w in Worker.all(connection=db())}, 'rq workers', procs)
        yield lambda key, i, t: queue.enqueue('peers.shell_job', key, i, t)


# --- measurements ----------------------------------------------------------------------------

def collect(key: str, n: int, timeout: float) -> list[tuple[float, ...]]:
    """Wait for n reports under key; check jobs 0..n-1 ran exactly once; (i, submitted, started, finished)."""
    end = time.monotonic() + timeout
    while db().llen(key) < n and time.monotonic() < end:
        time.sleep(0.02)
    time.sleep(0.05)                                  # let a duplicate show up, if there is one
    rows = [tuple(map(float, v.split())) for v in db().lrange(key, 0, -1)]
    ran = sorted(int(r[0]) for r in rows)
    if ran != list(range(n)):
        raise RuntimeError(f'{key}: expected jobs 0..{n - 1} once each; got {len(rows)} reports '
                           f'of {len(set(ran))} distinct jobs (see the worker logs)')
    db().delete(key)
    return rows


def percentile(values, q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def throughput(submit, key: str, n: int) -> float:
    first = time.time()
    for i in range(n):
        submit(key, i, time.time())
    rows = collect(key, n, max(60.0, n / 10))
    return n / (max(r[3] for r in rows) - first)


def latency(submit, key: str, n: int, rate: float) -> tuple[float, float]:
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        submit(key, i, time.time())
    lat = [(r[2] - r[1]) * 1000 for r in collect(key, n, 60.0)]
    return percentile(lat, 50), percentile(lat, 99)


def celery_chord(key: str) -> tuple[float, float]:
    """(submit -> callback done, last member's command finished -> callback start), in ms."""
    submitted = time.time()
    res = chord([celery_member.s(f'{key}:m', i, submitted) for i in range(CHORD_SIZE)])(celery_callback.s(f'{key}:cb'))
    last = max(r[3] for r in collect(f'{key}:m', CHORD_SIZE, 60.0))
    wait_until(lambda: db().llen(f'{key}:cb'), 'chord callback', timeout=60.0)
    got, cb_start, cb_done = map(float, db().lpop(f'{key}:cb').split())
    # the member results through Celery too; this also ends the client's subscriptions to them
    if got != CHORD_SIZE or sorted(res.parent.get(timeout=60)) != list(range(CHORD_SIZE)):
        raise RuntimeError(f'chord results are wrong (the callback saw {got:g})')
    return (cb_done - submitted) * 1000, (cb_start - last) * 1000


def spawn_true(n: int) -> None:
    for _ in range(n):
        subprocess.run(['true'], check=True)


def raw_rate(n: int, procs: int = 2) -> float:
    """Jobs/s of plain subprocess.run(['true']) in `procs` processes, n in all."""
    with multiprocessing.Pool(procs) as pool:
        pool.map(spawn_true, [1] * procs, chunksize=1)        # processes up before the clock starts
        start = time.monotonic()
        pool.map(spawn_true, [n // procs + (i < n % procs) for i in range(procs)], chunksize=1)
        return n / (time.monotonic() - start)


def measure(out: dict, label: str, submit, key: str, args) -> None:
    throughput(submit, f'{key}:warm', WARM_UP)
    out[f'{label} throughput (jobs/s)'] = throughput(submit, f'{key}:thr', args.n)
    p50, p99 = latency(submit, f'{key}:lat', args.latency_n, args.rate)
    out[f'{label} submit → command start p50 (ms)'] = p50
    out[f'{label} submit → command start p99 (ms)'] = p99


def one_round(tmp: str, k: int, args) -> dict[str, float]:
    out = {}
    with celery_worker(tmp, k) as submit:
        measure(out, 'Celery+Redis prefork', submit, f'celery{k}', args)
        celery_chord(f'celery{k}:chordwarm')
        done, gap = celery_chord(f'celery{k}:chord')
        out[f'Celery chord of {CHORD_SIZE}: submit → callback done (ms)'] = done
        out['Celery chord: last task done → callback start (ms)'] = gap
    for label, cls in (('RQ Worker (fork per job)', 'rq.worker.Worker'), ('RQ SimpleWorker', 'rq.worker.SimpleWorker')):
        with rq_workers(tmp, k, cls) as submit:
            measure(out, label, submit, f'rq{k}:{cls}', args)
    out['raw subprocess `true`, 2 procs (jobs/s)'] = raw_rate(args.n)
    return out


# --- report ----------------------------------------------------------------------------------

def log_problems(tmp: str) -> list[str]:
    """Warning/error lines in the redis and worker logs, minus the usual noise of running as root."""
    found = []
    for name in sorted(f for f in os.listdir(tmp) if f.endswith('.log')):
        with open(os.path.join(tmp, name), errors='replace') as f:
            found += [f'{name}: {line.rstrip()}' for line in f if any(w in line for w in PROBLEMS)
                      and not any(n in line for n in NOISE)]
    return found


def versions() -> str:
    import celery
    redis_server = subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]
    with open('/proc/cpuinfo') as f:
        model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '?')
    return (f'Machine: {os.cpu_count()} CPUs (nproc), {model}, Python {platform.python_version()}; celery '
            f'{celery.__version__}, rq {rq.__version__}, redis-py {redis.__version__}, redis-server {redis_server[2:]}')


def table(rounds: list[dict], args, elapsed: float) -> str:
    lines = [f'Peers: N={args.n} jobs for throughput, {args.latency_n} paced at {args.rate:g}/s, '
             f'{len(rounds)} round(s), 2 worker processes, job = subprocess.run(["true"]), loopback', '',
             '| metric | median | min – max |', '|---|---:|---:|']
    for metric in rounds[0]:
        values = [r[metric] for r in rounds]
        lines.append(f'| {metric} | {statistics.median(values):.2f} | {min(values):.2f} – {max(values):.2f} |')
    return '\n'.join(lines + ['', versions(), f'Run time: {elapsed:.0f} s'])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=2000, help='jobs for throughput and raw (default: 2000)')
    ap.add_argument('--rate', type=float, default=50.0, help='paced jobs per second (default: 50)')
    ap.add_argument('--latency-n', type=int, default=300, help='paced jobs (default: 300)')
    ap.add_argument('--repeat', type=int, default=3, help='rounds of each measurement (default: 3)')
    args = ap.parse_args(argv)
    if shutil.which('redis-server') is None:
        sys.exit('error: redis-server is not installed (apt-get install redis-server)')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # clean up on SIGTERM as on Ctrl-C
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix='jobz-peers-')
    try:
        with contextlib.ExitStack() as stack:
            start_redis(stack, tmp)
            rounds = []
            for k in range(args.repeat):
                rounds.append(one_round(tmp, k, args))
                print(f'round {k + 1}/{args.repeat}: ' + ', '.join(f'{v:.1f}' for v in rounds[-1].values()),
                      file=sys.stderr, flush=True)
        problems = log_problems(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(rounds, args, time.monotonic() - began))
    if problems:
        print(f'\n{len(problems)} warning/error line(s) in the worker logs, first ones:')
        print('\n'.join(problems[:10]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
