#!/usr/bin/env python3
"""Peer benchmark: the job runners people pick instead of jobz, on the same work as bench/dispatch.py.

A shell job runs the command `true` (subprocess.run(['true']) inside the task); a no-op job runs
nothing. Loopback throughout. One Debian redis-server (free loopback port, own temp dir, no
persistence) serves the whole run; the workers are started afresh for each round and stopped after.
- Celery + Redis (broker and result backend): `celery worker -c 2 -P prefork -Q celery`, default
  settings (prefetch x4, ack on receipt); shell and no-op tasks ignore results.
- RQ, 2 `rq worker` processes (log level WARNING): the default Worker, which forks a work horse
  for each job, and SimpleWorker, which runs jobs in the worker process.
- raw: Python running the command with subprocess.run in 2 processes, no queue at all: the limit.

Every job appends "index submitted started finished" (time.time()) to a Redis list; we wait for
N entries and check that every index 0..N-1 is there exactly once. "started" is taken in the
task just before the spawn (no-op: at its start), "finished" just after the command exits.
- throughput: N (--n) shell jobs submitted by one client as fast as it goes (apply_async /
  enqueue); jobs/s = N / (last job finished - first submit). Celery, RQ Worker, RQ SimpleWorker.
- no-op throughput: the same with the no-op job (same report to Redis, no subprocess), so the
  difference to the shell throughput is the cost of spawning `true`. For RQ Worker the fork of
  the work horse is still in it: that is how RQ runs every job.
- latency: --latency-n shell jobs paced at --rate per second; submit time carried in the
  message -> start time in the task: p50/p99 in ms.
- chord (Celery): 100 shell tasks -> callback: submit -> callback done, and the last member's
  command finished -> callback start (ms).
- broadcast (Celery only): Celery's documented broadcast routing, a kombu Broadcast queue
  (fanout exchange; on Redis a PUBLISH that every subscribed worker receives). On Redis the
  documented settings alone are not enough: the client does not declare a Broadcast's exchange,
  so it takes it for a direct one and pushes the task to lists no worker reads (celery/celery
  #2638, open). apply_async(declare=[the fanout exchange]) is the known workaround; we use it.
  --broadcast-workers (20) separate `celery worker -c 1 -P prefork -Q peers_broadcast`
  processes, each with its own queue (Broadcast names it bcast.<uuid> in every process), are
  started for the measurement and stopped after it. One trigger -> each of the 20 runs `true`;
  we take the start time of the last of them minus the submit time (ms). One warm-up
  broadcast, then --broadcasts (5) measured one after the other; the round reports their
  median. Every worker must run each broadcast exactly once.
  RQ has no broadcast: a job goes to one worker; reaching 20 would take 20 jobs (or 20 queues),
  which is not a broadcast, so there is no RQ row.
- raw: the 2 processes run N commands between them, as fast as they go: `true` exec'd directly,
  and `/bin/sh -c true` the way jobz runs every command (jobz/worker.py); jobs/s.
Warm-up: 20 jobs of each kind before each throughput measurement, 1 command per raw process.
Each round measures everything once; the table shows the median and min-max over the rounds.
Needs: apt-get install redis-server; .venv/bin/pip install celery redis rq
Usage: .venv/bin/python bench/peers.py [--n 2000] [--rate 50] [--latency-n 300] [--repeat 3]
         [--broadcast-workers 20] [--broadcasts 5]
From another script: add_arguments(ap); with redis_running(tmp): one_round(tmp, k, args) for each
round k (Redis once per process: the Celery app keeps the first URL).
"""
import argparse
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
import common  # noqa: E402
from jobz.harness import TimedOut, free_ports, wait_for  # noqa: E402

URL_ENV = 'JOBZ_PEERS_REDIS'       # how the workers (which import this file as `peers`) find Redis
try:
    import redis
    import rq
    from celery import Celery, chord
    from kombu import Queue as KombuQueue
    from kombu.common import Broadcast
    from rq import Queue, Worker
except ImportError as e:
    sys.exit(f'error: {e}; install the peers: .venv/bin/pip install celery redis rq')

CHORD_SIZE = 100
WARM_UP = 20
BROADCAST_QUEUE = 'peers_broadcast'
HOST = socket.gethostname()
BROADCAST = Broadcast(BROADCAST_QUEUE)      # a fanout exchange; its queue name is unique per process
RQ_CLASSES = (('RQ Worker (fork per job)', 'rq.worker.Worker'), ('RQ SimpleWorker', 'rq.worker.SimpleWorker'))
RAW_COMMANDS = (('`true`', ['true']), ('`/bin/sh -c true`', ['/bin/sh', '-c', 'true']))
PROBLEMS = ('WARNING', 'ERROR', 'CRITICAL', 'Traceback', 'Error', 'level=warning', 'level=error')
NOISE = ('superuser privileges', 'absolutely not recommended', 'C_FORCE_ROOT', 'uid=0', 'Memory overcommit')
_db = (None, None, None)


def db() -> redis.Redis:
    """This process's Redis client (a new one after a fork or for a new Redis)."""
    global _db
    key = (os.getpid(), os.environ[URL_ENV])
    if _db[:2] != key:
        _db = (*key, redis.Redis.from_url(key[1]))
    return _db[2]


# --- the jobs (run by the workers, which import this file as `peers`) --------------------------

def shell_job(key: str, i: int, submitted: float) -> int:
    """The job: run `true` as a shell job would, then report its timings under `key`."""
    started = time.time()
    subprocess.run(['true'], check=True)
    db().rpush(key, f'{i} {submitted} {started} {time.time()}')
    return i


def noop_job(key: str, i: int, submitted: float) -> int:
    """shell_job without the command: the same report, nothing spawned."""
    started = time.time()
    db().rpush(key, f'{i} {submitted} {started} {time.time()}')
    return i


def sleep_job(key: str, i: int, submitted: float, seconds: float = 0.2) -> int:
    """shell_job with `sleep` for its command: work that waits, for pools that grow (bench/scale.py)."""
    started = time.time()
    subprocess.run(['sleep', str(seconds)], check=True)
    db().rpush(key, f'{i} {submitted} {started} {time.time()}')
    return i


def chord_callback(results: list, key: str) -> None:
    started = time.time()
    ok = sorted(results) == list(range(len(results)))
    db().rpush(key, f'{len(results) if ok else -1} {started} {time.time()}')


app = Celery('peers', broker=os.environ.get(URL_ENV), backend=os.environ.get(URL_ENV))
app.conf.update(
    broker_connection_retry_on_startup=True,
    # the default queue as Celery defines it when task_queues is unset, plus the broadcast queue
    # (Celery's routing guide, "Broadcast"); each worker picks its queues with -Q
    task_queues=(KombuQueue('celery'), BROADCAST),
    task_routes={'peers.broadcast': {'queue': BROADCAST_QUEUE}},
)
celery_true = app.task(name='peers.true', ignore_result=True)(shell_job)
celery_noop = app.task(name='peers.noop', ignore_result=True)(noop_job)
celery_sleep = app.task(name='peers.sleep', ignore_result=True)(sleep_job)
celery_member = app.task(name='peers.member')(shell_job)
celery_callback = app.task(name='peers.callback', ignore_result=True)(chord_callback)


@app.task(name='peers.broadcast', bind=True, ignore_result=True)
def celery_broadcast(self, key: str, submitted: float) -> None:
    """The broadcast job: run `true`, report "worker submitted started finished" under `key`."""
    started = time.time()
    subprocess.run(['true'], check=True)
    db().rpush(key, f'{self.request.hostname} {submitted} {started} {time.time()}')


# --- processes -------------------------------------------------------------------------------

def worker_env() -> dict:
    """The environment of a worker: this folder on PYTHONPATH, so it can import `peers`."""
    return dict(os.environ, PYTHONPATH=BENCH)


def start(cmd: list[str], log: str):
    return common.started(cmd, log, env=worker_env())


def drop_result_subscriptions() -> None:
    """Make the Celery client forget the chord results it follows (left after an interruption)
    before Redis stops: else each one tries to unsubscribe at exit, from a stopped Redis."""
    with contextlib.suppress(AttributeError, redis.RedisError):
        app.backend.result_consumer.subscribed_to.clear()
        app.backend.result_consumer.stop()


@contextlib.contextmanager
def redis_running(tmp: str):
    """A redis-server for the run (logs to tmp); points this process and the workers at it."""
    port, = free_ports(1)
    url = f'redis://127.0.0.1:{port}/0'
    cmd = ['redis-server', '--bind', '127.0.0.1', '--port', str(port), '--dir', tmp, '--save', '',
           '--appendonly', 'no', '--daemonize', 'no']
    with common.started(cmd, f'{tmp}/redis.log') as proc:
        os.environ[URL_ENV] = url
        app.conf.update(broker_url=url, result_backend=url)

        def up() -> bool:
            with contextlib.suppress(redis.ConnectionError):
                return db().ping()
        try:
            wait_for(up, 30.0, 'redis-server', procs=[proc])
            yield url
        finally:
            drop_result_subscriptions()                        # before Redis stops


def celery_cmd(name: str, *options: str) -> list[str]:
    return [sys.executable, '-m', 'celery', '-A', 'peers', 'worker', '-l', 'warning', '-n', name, *options]


def celery_up(names: list[str]) -> bool:
    """Whether every worker in names answers a ping."""
    replies = app.control.ping(destination=names, timeout=1.0)
    return set(names) <= {name for reply in replies for name in reply}


@contextlib.contextmanager
def celery_worker(tmp: str, k: int):
    name = f'peers{k}@{HOST}'
    with start(celery_cmd(name, '-c', '2', '-P', 'prefork', '-Q', 'celery'), f'{tmp}/celery{k}.log') as proc:
        wait_for(lambda: celery_up([name]), 30.0, 'celery worker', procs=[proc])
        yield


@contextlib.contextmanager
def celery_pool(tmp: str, name: str, concurrency: int):
    """One Celery worker with `concurrency` prefork processes on the default queue."""
    name = f'{name}@{HOST}'
    with start(celery_cmd(name, '-c', str(concurrency), '-P', 'prefork', '-Q', 'celery'), f'{tmp}/{name}.log') as proc:
        wait_for(lambda: celery_up([name]), 60.0, 'celery worker', procs=[proc])
        yield


@contextlib.contextmanager
def celery_broadcast_workers(tmp: str, k: int, count: int):
    """count single-process Celery workers on the broadcast queue; yields their names."""
    names = [f'peers{k}-b{j}@{HOST}' for j in range(count)]
    commands = [(celery_cmd(name, '-c', '1', '-P', 'prefork', '-Q', BROADCAST_QUEUE), f'{tmp}/celery{k}-b{j}.log')
                for j, name in enumerate(names)]
    with started_together(commands) as procs:
        wait_for(lambda: celery_up(names), 120.0, 'celery broadcast workers', procs=procs)
        yield names


@contextlib.contextmanager
def started_together(commands: list[tuple[list[str], str]]):
    """common.started for several (command, log) at once, stopped in parallel afterwards: a Celery
    worker's warm shutdown takes about 2 s, which 20 workers one after the other would take 20 times."""
    procs = []
    try:
        for cmd, log in commands:
            with open(log, 'ab') as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, env=worker_env()))
        yield procs
    finally:
        with ThreadPoolExecutor(max(1, len(procs))) as pool:
            list(pool.map(common.stop, procs))


@contextlib.contextmanager
def rq_workers(tmp: str, k: int, cls: str):
    names = [f'peers-{cls.rsplit(".", 1)[1]}-{k}-{j}' for j in (1, 2)]
    # -c peers: the worker imports the job module once and its work horses inherit it (RQ's
    # performance advice); else every horse imports this file anew, Celery included.
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(start(
            [sys.executable, '-m', 'rq.cli', 'worker', '-u', os.environ[URL_ENV], '-w', cls, '-n', name,
             '-c', 'peers', '--logging_level', 'WARNING', 'peers'], f'{tmp}/{name}.log')) for name in names]
        wait_for(lambda: set(names) <= {w.name for w in Worker.all(connection=db())},
                 30.0, 'rq workers', procs=procs)
        yield


def celery_submit(task):
    return lambda key, i, t: task.apply_async((key, i, t))


def rq_submit(function: str):
    queue = Queue('peers', connection=db())
    return lambda key, i, t: queue.enqueue(function, key, i, t)


# --- measurements ----------------------------------------------------------------------------

def reports(key: str, n: int, timeout: float) -> list[list[str]]:
    """Wait for n reports under key (and a moment longer, for a duplicate to show); take them all."""
    with contextlib.suppress(TimedOut):          # too few: the caller's check says so
        wait_for(lambda: db().llen(key) >= n, timeout, key, 0.02)
    time.sleep(0.05)
    rows = [v.decode().split() for v in db().lrange(key, 0, -1)]
    db().delete(key)
    return rows


def collect(key: str, n: int, timeout: float) -> list[tuple[float, ...]]:
    """The n reports of jobs 0..n-1, each exactly once: (i, submitted, started, finished)."""
    rows = [tuple(map(float, r)) for r in reports(key, n, timeout)]
    ran = sorted(int(r[0]) for r in rows)
    if ran != list(range(n)):
        raise RuntimeError(f'{key}: expected jobs 0..{n - 1} once each; got {len(rows)} reports '
                           f'of {len(set(ran))} distinct jobs (see the worker logs)')
    return rows


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
    return common.percentile(lat, 50), common.percentile(lat, 99)


def measure(out: dict, label: str, shell, noop, key: str, args) -> None:
    """Throughput of shell and no-op jobs, then the paced latency of shell jobs."""
    throughput(shell, f'{key}:warm', WARM_UP)
    out[f'{label} throughput (jobs/s)'] = throughput(shell, f'{key}:thr', args.n)
    throughput(noop, f'{key}:noopwarm', WARM_UP)
    out[f'{label} no-op throughput (jobs/s)'] = throughput(noop, f'{key}:noop', args.n)
    p50, p99 = latency(shell, f'{key}:lat', args.latency_n, args.rate)
    out[f'{label} submit → command start p50 (ms)'] = p50
    out[f'{label} submit → command start p99 (ms)'] = p99


def celery_chord(key: str) -> tuple[float, float]:
    """(submit -> callback done, last member's command finished -> callback start), in ms."""
    submitted = time.time()
    res = chord([celery_member.s(f'{key}:m', i, submitted) for i in range(CHORD_SIZE)])(celery_callback.s(f'{key}:cb'))
    last = max(r[3] for r in collect(f'{key}:m', CHORD_SIZE, 60.0))
    wait_for(lambda: db().llen(f'{key}:cb'), 60.0, 'chord callback')
    got, cb_start, cb_done = map(float, db().lpop(f'{key}:cb').split())
    # the member results through Celery too; this also ends the client's subscriptions to them
    if got != CHORD_SIZE or sorted(res.parent.get(timeout=60)) != list(range(CHORD_SIZE)):
        raise RuntimeError(f'chord results are wrong (the callback saw {got:g})')
    return (cb_done - submitted) * 1000, (cb_start - last) * 1000


def broadcast(key: str, workers: list[str], timeout: float = 30.0) -> float:
    """One broadcast of `true`: submit -> the last of the workers started it, in ms."""
    submitted = time.time()
    # declare: else the client takes the exchange for a direct one (see the module docstring)
    celery_broadcast.apply_async((key, submitted), declare=[BROADCAST.exchange])
    rows = reports(key, len(workers), timeout)
    ran = sorted(r[0] for r in rows)
    if ran != sorted(workers):
        missing = sorted(set(workers) - set(ran))
        raise RuntimeError(f'{key}: expected each of {len(workers)} workers once; got {len(rows)} reports '
                           f'from {len(set(ran))} workers (missing: {", ".join(missing) or "none"})')
    return (max(float(r[2]) for r in rows) - submitted) * 1000


def broadcast_round(tmp: str, k: int, args) -> float:
    """Median over --broadcasts broadcasts to fresh workers, after one warm-up (ms)."""
    with celery_broadcast_workers(tmp, k, args.broadcast_workers) as names:
        # A worker that answers pings may not have subscribed to the fanout yet (Redis pub/sub
        # keeps nothing for late subscribers): warm up until one broadcast reaches them all.
        for attempt in range(3):
            try:
                broadcast(f'celery{k}:bcastwarm{attempt}', names, timeout=10.0)
                break
            except (RuntimeError, TimedOut):
                if attempt == 2:
                    raise
        return statistics.median(broadcast(f'celery{k}:bcast{b}', names) for b in range(args.broadcasts))


def spawn(argv: list[str], n: int, go=None) -> None:
    """Run argv n times, one after the other (after `go` is set, if given)."""
    if go is not None:
        go.wait()
    for _ in range(n):
        subprocess.run(argv, check=True)


def raw_rate(argv: list[str], n: int, procs: int = 2) -> float:
    """Jobs/s of plain subprocess.run(argv) in `procs` processes, n in all.

    Plain processes that start together on an event (a Pool can hang in its terminate())."""
    go = multiprocessing.Event()
    workers = [multiprocessing.Process(target=spawn, args=(argv, n // procs + (i < n % procs), go))
               for i in range(procs)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.2)    # the processes are up and waiting before the clock starts
        start = time.monotonic()
        go.set()
        for w in workers:
            w.join()
        elapsed = time.monotonic() - start
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join()
    if any(w.exitcode for w in workers):
        raise RuntimeError(f'a raw spawning process failed (exit codes {[w.exitcode for w in workers]})')
    return n / elapsed


def one_round(tmp: str, k: int, args) -> dict[str, float]:
    """Every metric once, with workers started for this round; Redis must be running (redis_running)."""
    out = {}
    with celery_worker(tmp, k):
        measure(out, 'Celery+Redis prefork', celery_submit(celery_true), celery_submit(celery_noop),
                f'celery{k}', args)
        celery_chord(f'celery{k}:chordwarm')
        done, gap = celery_chord(f'celery{k}:chord')
        out[f'Celery chord of {CHORD_SIZE}: submit → callback done (ms)'] = done
        out['Celery chord: last task done → callback start (ms)'] = gap
    out[f'Celery broadcast to {args.broadcast_workers} workers: submit → all started (ms)'] = \
        broadcast_round(tmp, k, args)
    for label, cls in RQ_CLASSES:
        with rq_workers(tmp, k, cls):
            measure(out, label, rq_submit('peers.shell_job'), rq_submit('peers.noop_job'), f'rq{k}:{cls}', args)
    for label, argv in RAW_COMMANDS:
        out[f'raw subprocess {label}, 2 procs (jobs/s)'] = raw_rate(argv, args.n)
    return out


# --- interface and report --------------------------------------------------------------------

def add_arguments(ap: argparse.ArgumentParser) -> None:
    """This benchmark's options for one_round (another script may add them to its own parser)."""
    ap.add_argument('--n', type=int, default=2000, help='jobs for throughput and raw (default: 2000)')
    ap.add_argument('--rate', type=float, default=50.0, help='paced jobs per second (default: 50)')
    ap.add_argument('--latency-n', type=int, default=300, help='paced jobs (default: 300)')
    ap.add_argument('--broadcast-workers', type=int, default=20,
                    help='Celery workers a broadcast goes to (default: 20)')
    ap.add_argument('--broadcasts', type=int, default=5,
                    help='measured broadcasts per round, after a warm-up (default: 5)')


def versions() -> str:
    import celery
    redis_server = subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split()[2]
    return (f'Peers: celery {celery.__version__}, rq {rq.__version__}, redis-py {redis.__version__}, '
            f'redis-server {redis_server.removeprefix("v=")}')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeat', type=int, default=3, help='rounds (default: 3)')
    add_arguments(ap)
    args = ap.parse_args(argv)
    if shutil.which('redis-server') is None:
        sys.exit('error: redis-server is not installed (apt-get install redis-server)')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # clean up on SIGTERM as on Ctrl-C
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix='jobz-peers-')
    rounds = []
    try:
        with redis_running(tmp):
            for k in range(args.repeat):
                rounds.append(one_round(tmp, k, args))
                print(f'round {k + 1}/{args.repeat}: ' + ', '.join(f'{v:.1f}' for v in rounds[-1].values()),
                      file=sys.stderr, flush=True)
        problems = common.log_problems(tmp, PROBLEMS, NOISE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    common.print_report(f'Peers: N={args.n} jobs for throughput, {args.latency_n} paced at {args.rate:g}/s, '
                        f'{len(rounds)} round(s), 2 worker processes (broadcast: {args.broadcast_workers}), '
                        f'shell job = subprocess.run(["true"]), loopback', rounds, problems,
                        footer=[versions(), f'Run time: {time.monotonic() - began:.0f} s'])
    return 0


if __name__ == '__main__':
    sys.exit(main())
