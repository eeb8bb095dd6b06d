"""Work pools (run_on: one): each call is started by exactly one worker, whatever dies or pauses when."""
import collections
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, http, kill_leftovers, wait_for

pytestmark = pytest.mark.both_journals    # the pool's tables and their conditional updates, on both engines

JOBS = r"""
nap:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt; sleep %(secs)s"
  run_on: one
  params: {secs: '\d+(\.\d+)?'}
hold:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt; echo $$ > {out}/pid-%(run_id)s; while [ ! -e {out}/go ]; do sleep 0.05; done"
  run_on: one
again:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt; echo $$ > {out}/pid-%(run_id)s; while [ ! -e {out}/go ]; do sleep 0.05; done"
  run_on: one
  retry: {count: 1, backoff: 1}
part:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  run_on: one
  on_success: "/job_start?job_name=gate&batch=%(batch)s"
gate:
  semaphore: {count: 100, key: batch}
  on_success: "/job_start?job_name=after&batch=%(batch)s"
after:
  command: "echo %(batch)s >> {out}/after.txt"
"""
FAST = ['--worker-timeout', '3']    # the broker gives up on a silent worker after 3 s (default 30)


def ran(stack, workers) -> collections.Counter:
    """How many times each run id was started, over all the given workers."""
    return collections.Counter(r for w in workers for r in stack.lines(f'ran-{w}.txt'))


def jobz(stack, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'jobz.client', '--url', stack.url, *args], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def ended(stack, run_ids, timeout: float = 30.0) -> dict:
    return {r: stack.wait_run(r, timeout=timeout) for r in run_ids}


def pool_stack(make_stack, workers, **kw):
    stack = make_stack(JOBS, start=False, **kw)
    stack.broker_args = FAST
    stack.start(workers)
    return stack


def test_each_call_runs_once_spread_over_the_pool(make_stack):
    workers = ['w1', 'w2', 'w3']
    stack = pool_stack(make_stack, [(w, ['--concurrency', '2']) for w in workers])
    runs = [stack.start_job('job_name=nap&secs=0.5')['run_id'] for _ in range(30)]
    # Six slots: about 3 s; one worker at a time would need 15 s, a broadcast would run 90 commands.
    statuses = ended(stack, runs, timeout=12)
    assert all(s['state'] == 'succeeded' and len(s['workers']) == 1 for s in statuses.values())
    counts = ran(stack, workers)
    assert sorted(counts) == sorted(runs) and set(counts.values()) == {1}
    per_worker = collections.Counter(next(iter(s['workers'])) for s in statuses.values())
    assert set(per_worker) == set(workers) and min(per_worker.values()) >= 5, per_worker


def test_a_fast_worker_takes_more_than_a_slow_one(make_stack):
    stack = pool_stack(make_stack, [('slow', ['--concurrency', '1']), ('fast', ['--concurrency', '4'])])
    runs = [stack.start_job('job_name=nap&secs=0.2')['run_id'] for _ in range(50)]
    statuses = ended(stack, runs)
    per_worker = collections.Counter(next(iter(s['workers'])) for s in statuses.values())
    assert 2.5 <= per_worker['fast'] / per_worker['slow'] <= 8, per_worker    # about 4 to 1
    assert set(ran(stack, ['slow', 'fast']).values()) == {1}


def test_calls_wait_for_a_worker_and_run_once_one_joins(make_stack):
    stack = pool_stack(make_stack, [])
    answer = stack.start_job('job_name=nap&secs=0')
    assert answer['workers'] == [] and answer['queued'] is True
    status = stack.status(answer['run_id'])
    assert status['state'] == 'pending' and status['queued'] is True
    assert [r['queued'] for r in stack.runs('nap')] == [True]
    _, text = stack.get('/metrics')
    assert 'jobz_pool_queued{topic="nap"} 1' in text.decode()
    assert 'jobz_pool_oldest_queued_seconds{topic="nap"} ' in text.decode()
    told = jobz(stack, 'start', 'nap', 'secs=0')
    assert "queued for a free worker of topic 'nap'" in told.stdout and told.stderr == ''
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(
        http(f"{stack.url}/job_start?job_name=nap&secs=0&wait=30", timeout=40)))
    waiter.start()
    cli = subprocess.Popen([sys.executable, '-m', 'jobz.client', '--url', stack.url, 'start', 'nap', 'secs=0',
                            '--wait', '--timeout', '30'], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stack.start_worker('w1', '--concurrency', '2')
        waiter.join(40)
        assert waited[0][0] == 200 and list(waited[0][1]['workers']) == ['w1']
        assert cli.wait(40) == 0 and 'succeeded on w1' in cli.stdout.read()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    status = stack.wait_run(answer['run_id'])
    assert status['state'] == 'succeeded' and list(status['workers']) == ['w1'] and not status['queued']
    workers = stack.get('/workers')[1]
    assert workers['w1']['slots'] == 2 and workers['w1']['free_slots'] == 2


def test_calls_given_to_a_worker_killed_before_it_took_them_run_elsewhere(make_stack):
    stack = pool_stack(make_stack, [('w1', ['--concurrency', '2'])])
    stack.procs['w1'].send_signal(signal.SIGSTOP)    # alive for the broker a few seconds more
    try:
        runs = [stack.start_job('job_name=nap&secs=0')['run_id'] for _ in range(4)]
        assert stack.get('/workers')[1]['w1']['pool_calls'] == 2    # given to w1: its two slots
    finally:
        stack.stop('w1', signal.SIGKILL)
    stack.start_worker('w2', '--concurrency', '2')
    statuses = ended(stack, runs)
    assert all(list(s['workers']) == ['w2'] and s['state'] == 'succeeded' for s in statuses.values())
    assert ran(stack, ['w1', 'w2']) == collections.Counter({r: 1 for r in runs})
    assert stack.lines('ran-w1.txt') == []


def test_a_paused_worker_that_wakes_after_others_took_its_calls_starts_none(make_stack):
    stack = pool_stack(make_stack, [('w1', ['--concurrency', '2'])])
    stack.procs['w1'].send_signal(signal.SIGSTOP)
    try:
        runs = [stack.start_job('job_name=nap&secs=0')['run_id'] for _ in range(4)]
        stack.start_worker('w2', '--concurrency', '2')
        statuses = ended(stack, runs)    # w1's two went back to the queue once it fell silent
        assert all(list(s['workers']) == ['w2'] for s in statuses.values())
    finally:
        stack.procs['w1'].send_signal(signal.SIGCONT)
    # Awake, w1 reads its ASSIGNs, asks for them (TAKE) and is refused: it starts none.
    log = os.path.join(stack.log_dir, 'broker.log')
    wait_for(lambda: open(log).read().count('is not for w1') >= 2, what='w1 refused its old calls')
    wait_for(lambda: stack.get('/workers')[1]['w1']['alive'], what='w1 back')
    assert stack.lines('ran-w1.txt') == []
    assert ran(stack, ['w1', 'w2']) == collections.Counter({r: 1 for r in runs})


def test_a_worker_killed_mid_command_reports_it_interrupted_and_retry_runs_it_elsewhere_once(make_stack):
    stack = pool_stack(make_stack, [('w1', ['--concurrency', '2'])])
    plain, retried = stack.start_job('job_name=hold')['run_id'], stack.start_job('job_name=again')['run_id']
    for run_id in (plain, retried):
        stack.wait_run(run_id, states=('running',))
    stack.start_worker('w2', '--concurrency', '2')
    wait_for(lambda: stack.get('/workers')[1].get('w2', {}).get('alive'), what='w2 in the pool')
    stack.stop('w1', signal.SIGKILL)
    kill_leftovers(stack)
    stack.start_worker('w1', '--concurrency', '2')    # back: it finds both started, and says so
    assert stack.wait_run(plain)['workers']['w1']['state'] == 'interrupted'
    status = wait_for(lambda: (lambda s: s if s['state'] == 'running' and 'w1' not in s['workers'] else None)(
        stack.status(retried)), what='the retry to start on another worker')
    with open(os.path.join(stack.out, 'go'), 'w'):
        pass
    status = stack.wait_run(retried)
    assert status['state'] == 'succeeded' and list(status['workers']) == ['w2']
    assert 'attempt 1 on w1 was interrupted' in status['notes'][0]['note']
    assert status['workers']['w2']['started'] >= status['notes'][0]['at'] + 1.0    # after the backoff
    assert ran(stack, ['w1', 'w2'])[retried] == 2 and ran(stack, ['w1', 'w2'])[plain] == 1


def test_a_broker_killed_with_calls_queued_and_given_runs_each_once_after_restart(make_stack):
    stack = pool_stack(make_stack, [('w1', ['--concurrency', '1'])])
    runs = [stack.start_job('job_name=nap&secs=0.3')['run_id'] for _ in range(6)]
    stack.stop('broker', signal.SIGKILL)    # one running on w1, the others queued
    stack.start_broker()
    statuses = ended(stack, runs)
    assert all(s['state'] == 'succeeded' for s in statuses.values())
    assert ran(stack, ['w1']) == collections.Counter({r: 1 for r in runs})


def test_a_fan_in_of_pool_calls_releases_once(make_stack):
    stack = pool_stack(make_stack, [('w1', ['--concurrency', '4']), ('w2', ['--concurrency', '4'])])
    runs = [stack.start_job('job_name=part&batch=b1')['run_id'] for _ in range(100)]
    ended(stack, runs)
    wait_for(lambda: stack.lines('after.txt'), timeout=30, what='the release')
    gate = [g for g in stack.get('/gates?job=gate')[1]['gates'] if g['value'] == 'b1'][0]
    assert gate['arrived'] == 100 and gate['released']
    assert len([r for r in stack.runs('after') if r['params']['batch'] == 'b1']) == 1
