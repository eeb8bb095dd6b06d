#!/usr/bin/env python3
"""jobz on the benchmark's work: throughput, latency, fan-in and broadcast.

Each round starts a fresh stack (Mongrel2, broker, workers w1 and w2 with --concurrency, two
semaphores) on free loopback ports in a temp folder. Triggers are HTTP GETs of /job_start
through Mongrel2; every figure comes from the broker's journal (read-only): the start and end
times a worker recorded for each run, and a check that each run succeeded exactly once.

- throughput: --n triggers alternating bench_a (topic a, w1) and bench_b (topic b, w2), each
  running the shell command `true`, sent over 32 keep-alive connections; jobs/s =
  n / (last command finished - first trigger sent).
- no-op throughput: the same with noop_a / noop_b, jobs that expire a microsecond after their
  trigger: the same path (trigger, journal, publish, take, record durably, report `expired`,
  acknowledge) without a process spawned.
- latency: --latency-n triggers of bench_a/bench_b paced at --rate/s from one connection:
  trigger sent -> command started (p50, p99), and the HTTP answer time.
- fan-in: 100 fan_part runs (50 per worker) whose on_success counts at the fan_gate semaphore
  (count 100, one gate per batch), which then triggers fan_done: first trigger sent ->
  fan_done finished, and last part finished -> fan_done started. Median of --fan-ins (5) after a
  warm-up.
- CPU per job: user + system time of every process of the stack (Mongrel2, broker, workers
  with the commands they ran, semaphores; not the benchmark's client) over the throughput runs
  and the fan-ins, per job (a fan-in part is its job plus its arrival at the gate). Two cores
  cannot run more than 2000 / (CPU per job in ms) jobs a second: the floor the figures meet.
- broadcast: 20 more workers on topic bcast (--concurrency 1 each); one trigger of bcast:
  trigger sent -> the last of the 20 commands started. Median of 5 after one warm-up.

Usage: .venv/bin/python bench/dispatch.py [--n 2000] [--rate 50] [--latency-n 300] [--repeat 3]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile

import common
import stacks
from jobz.harness import wait_for

FAN_IN = 100
BROADCAST = 20
BROADCAST_TRIES = 5
JOBS_YAML = f"""
bench_a: {{command: "true", topic: a}}
bench_b: {{command: "true", topic: b}}
noop_a: {{command: "true", topic: noop_a, expires: 0.000001}}
noop_b: {{command: "true", topic: noop_b, expires: 0.000001}}
fan_part_a:
  command: "true"
  topic: fan_a
  params: {{batch: '\\w+'}}
  on_success: "/job_start?job_name=fan_gate&batch=%(batch)s"
fan_part_b:
  command: "true"
  topic: fan_b
  params: {{batch: '\\w+'}}
  on_success: "/job_start?job_name=fan_gate&batch=%(batch)s"
fan_gate:
  semaphore: {{count: {FAN_IN}, key: batch}}
  on_success: "/job_start?job_name=fan_done&batch=%(batch)s"
fan_done:
  command: "true"
  topic: fan_a
  params: {{batch: '\\w+'}}
bcast: {{command: "true", topic: bcast}}
"""
WORKERS = {'w1': 'a,fan_a,noop_a', 'w2': 'b,fan_b,noop_b'}
SEMAPHORES = {'semaphore1': 'fan_gate'}


def cpu_ms(stack, jobs: int, work) -> tuple:
    """(what work() returns, CPU ms per job used meanwhile by all of the stack's processes and their commands)."""
    before = sum(common.cpu_seconds(p.pid) for p in stack.procs.values())
    result = work()
    return result, (sum(common.cpu_seconds(p.pid) for p in stack.procs.values()) - before) * 1000 / jobs


def throughput(stack, jobs: tuple[str, str], n: int, state: str = 'succeeded') -> float:
    """n triggers alternating the two jobs as fast as the front end takes them; jobs/s end to end."""
    sent = stacks.blast(stack.port, [f'job_name={jobs[i % 2]}' for i in range(n)])
    results = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), max(60.0, n / 20), state=state)
    return n / (max(r[0][2] for r in results.values()) - min(sent.values()))


def latency(stack, n: int, rate: float) -> dict[str, float]:
    sent, answer_ms = stacks.send_paced(stack, [f'job_name=bench_{"ab"[i % 2]}' for i in range(n)], rate)
    results = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), 60.0)
    start_ms = [(results[run_id][0][1] - t) * 1000 for run_id, t in sent.items()]
    return {'trigger → command start p50 (ms)': common.percentile(start_ms, 50),
            'trigger → command start p99 (ms)': common.percentile(start_ms, 99),
            'trigger answered p50 (ms)': common.percentile(answer_ms, 50),
            'trigger answered p99 (ms)': common.percentile(answer_ms, 99)}


def fan_in(stack, batch: str) -> tuple[float, float]:
    """(first trigger -> fan_done finished, last part finished -> fan_done started), in ms."""
    sent = stacks.blast(stack.port, [f'job_name=fan_part_{"ab"[i % 2]}&batch={batch}' for i in range(FAN_IN)])
    parts = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), 60.0)
    last_part = max(r[0][2] for r in parts.values())

    def done_run():
        with stacks.open_ro(stacks.journal(stack)) as db:
            return db.execute("SELECT run_id FROM runs WHERE job = 'fan_done' AND params = ?",
                              (f'{{"batch": "{batch}"}}',)).fetchall()
    found = wait_for(done_run, 60.0, 'fan_done triggered', 0.01, stack.procs.values())
    if len(found) != 1:
        raise RuntimeError(f'fan_done of batch {batch} ran {len(found)} times')
    (worker, started, finished), = stacks.wait_final(stacks.journal(stack), [found[0][0]],
                                                     stack.procs.values(), 60.0)[found[0][0]]
    return (finished - min(sent.values())) * 1000, (started - last_part) * 1000


def broadcast(stack) -> float:
    """Median over BROADCAST_TRIES of trigger sent -> the last of the BROADCAST workers started, in ms."""
    names = [f'b{k:02d}' for k in range(BROADCAST)]
    for name in names:
        stack.start_worker(name, '--topics', 'bcast', '--concurrency', '1')
    try:
        stack.wait_healthy(60.0, workers=len(WORKERS) + len(SEMAPHORES) + BROADCAST)
        times = []
        for k in range(BROADCAST_TRIES + 1):
            (run_id, sent), = stacks.send_paced(stack, ['job_name=bcast'], 1.0)[0].items()
            results = stacks.wait_final(stacks.journal(stack), [run_id], stack.procs.values(), 30.0,
                                        per_run=BROADCAST)[run_id]
            if k:    # the first is a warm-up
                times.append((max(r[1] for r in results) - sent) * 1000)
        return statistics.median(times)
    finally:
        for name in names:
            stack.stop(name)


def measure(tmp: str, args, journal=None) -> dict[str, float]:
    """One round, in a subfolder of tmp; journal() gives a PostgreSQL URL for the broker (default: SQLite)."""
    stack = stacks.make_stack(tempfile.mkdtemp(dir=tmp), JOBS_YAML, args.concurrency)
    if journal:
        stack.journal = journal()
    out = {}
    try:
        stacks.start(stack, WORKERS, SEMAPHORES)
        throughput(stack, ('bench_a', 'bench_b'), 100)    # warm-up: connections, caches
        out['throughput `true` (jobs/s)'], out['CPU per job, `true` (ms)'] = cpu_ms(
            stack, args.n, lambda: throughput(stack, ('bench_a', 'bench_b'), args.n))
        out['throughput no-op (jobs/s)'], out['CPU per job, no-op (ms)'] = cpu_ms(
            stack, args.n, lambda: throughput(stack, ('noop_a', 'noop_b'), args.n, 'expired'))
        out.update(latency(stack, args.latency_n, args.rate))
        fan_in(stack, 'warm')
        fans, out['CPU per fan-in part, job + arrival (ms)'] = cpu_ms(
            stack, args.fan_ins * FAN_IN, lambda: [fan_in(stack, f'measured{k}') for k in range(args.fan_ins)])
        out[f'fan-in of {FAN_IN}: submit → follow-up done (ms)'] = statistics.median(f[0] for f in fans)
        out['fan-in: last job done → follow-up start (ms)'] = statistics.median(f[1] for f in fans)
        out[f'broadcast to {BROADCAST}: trigger → all started (ms)'] = broadcast(stack)
    finally:
        stack.stop_all()
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument('--n', type=int, default=2000, help='jobs for throughput (default: 2000)')
    ap.add_argument('--rate', type=float, default=50.0, help='paced triggers per second (default: 50)')
    ap.add_argument('--latency-n', type=int, default=300, help='paced triggers (default: 300)')
    ap.add_argument('--log-level', default='warning', choices=('info', 'warning'),
                    help="jobz's log level, as JOBZ_LOG_LEVEL for every process (default: warning, the "
                         "level the peers run at; jobz's own default, info, writes a line per run)")
    ap.add_argument('--fan-ins', type=int, default=5,
                    help='fan-ins measured per round: the median counts, their CPU is added up (default: 5)')
    ap.add_argument('--concurrency', type=int, default=4,
                    help='commands at once per worker (default: 4; a worker on its own defaults to the CPU count)')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument('--repeat', type=int, default=3, help='rounds (default: 3)')
    args = ap.parse_args(argv)
    os.environ['JOBZ_LOG_LEVEL'] = args.log_level    # read by every jobz process the stacks start
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    rounds, problems = common.run_rounds('jobz-dispatch-', args.repeat, lambda tmp, k: measure(tmp, args),
                                         stacks.M2_NOISE)
    common.print_report(f'jobz: {args.repeat} round(s), workers w1, w2 with --concurrency {args.concurrency}, '
                        f'--log-level {args.log_level}, plain HTTP on loopback', rounds, problems)
    return 0


if __name__ == '__main__':
    sys.exit(main())
