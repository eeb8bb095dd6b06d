"""Fault injection: kill, stop and restart the parts under load; no accepted run is lost or run twice."""
import os
import signal
import subprocess
import time

import pytest

from conftest import assert_each_ran_once, final_states, kill_leftovers, triggers, wait_for
from jobz.journal import Journal
from jobz.postgres import Cluster

JOBS = """
count:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
slow:
  command: "echo $$ > {out}/pid-%(run_id)s; echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt; sleep 3"
retried:
  command: "echo $$ > {out}/pid-%(run_id)s; echo %(run_id)s >> {out}/retried.txt; sleep 2"
  retry: {count: 1, backoff: 0}
stale:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  expires: 1
  on_failure: "/job_start?job_name=record&what=%(state)s&tag=stale"
record:
  command: "echo %(what)s >> {out}/record-%(tag)s.txt"
part:
  command: "true"
  on_success: "/job_start?job_name=gate&date=%(date)s"
gate:
  semaphore: {count: 10, key: date}
  on_success: "/job_start?job_name=record&what=released&tag=%(date)s"
bcast:
  command: "true"
  on_success: "/job_start?job_name=gate_all"
gate_all:
  semaphore: {count: all}
  on_success: "/job_start?job_name=record&what=released-%(run_id)s&tag=all"
"""


def test_worker_killed_while_idle_catches_up(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    sender = triggers(stack, 'job_name=count', 200, pace=0.005)
    sender.start()
    sender.wait_accepted(50)
    stack.stop('w1', signal.SIGKILL)
    sender.wait_accepted(120)    # these are published while w1 is dead
    stack.start_worker('w1')
    states = assert_each_ran_once(stack, 'count', sender.finish())
    assert set(states) <= {'succeeded', 'interrupted'} and states['interrupted'] <= 1
    assert sum(states.values()) == len(sender.accepted) >= 195


def test_worker_killed_mid_job_reports_interrupted_never_reruns(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    try:
        run = stack.start_job('job_name=slow')['run_id']
        retried = stack.start_job('job_name=retried')['run_id']
        stack.wait_run(run, states=('running',))
        stack.wait_run(retried, states=('running',))
        wait_for(lambda: stack.lines('retried.txt'), what='the retried job to start')
        stack.stop('w1', signal.SIGKILL)
        stack.start_worker('w1')
        status = stack.wait_run(run)['workers']['w1']
        assert status['state'] == 'interrupted'
        assert stack.lines('ran-w1.txt') == [run]          # started once, never again
        # A job with `retry:` opts in to running an interrupted call again.
        assert stack.wait_run(retried, timeout=20)['workers']['w1']['state'] == 'succeeded'
        assert stack.lines('retried.txt') == [retried, retried]
    finally:
        kill_leftovers(stack)


@pytest.mark.both_journals
def test_broker_killed_right_after_answering(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    # A request Mongrel2 had handed to the killed broker is never answered: it times out, unaccepted.
    sender = triggers(stack, 'job_name=count', 300, pace=0.003, timeout=4)
    sender.start()
    sender.wait_accepted(100)
    stack.stop('broker', signal.SIGKILL)    # lands just after the 100th answer (or a few more)
    stack.start_broker()
    states = assert_each_ran_once(stack, 'count', sender.finish())
    assert states == {'succeeded': len(sender.accepted)}
    assert len(sender.accepted) >= 100


@pytest.mark.both_journals
def test_broker_restart_remembers_workers(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    stack.stop('broker', signal.SIGKILL)
    stack.start_broker()
    wait_for(lambda: _get_ok(stack, '/health'), what='broker back')
    # At once, before w1's next heartbeat: the registry on disk says whom to expect.
    assert stack.start_job('job_name=count')['workers'] == ['w1']


def _get_ok(stack, path):
    try:
        return stack.get(path, timeout=2)[0] == 200
    except OSError:
        return False


def test_mongrel2_restart(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    sender = triggers(stack, 'job_name=count', 300, pace=0.003, timeout=5)
    sender.start()
    sender.wait_accepted(100)
    stack.stop('mongrel2')
    stack.start_mongrel2()
    states = assert_each_ran_once(stack, 'count', sender.finish())
    assert states == {'succeeded': len(sender.accepted)}


def test_stalled_worker_with_tiny_high_water_mark(make_stack):
    stack = make_stack(JOBS, semaphore=False, start=False)
    stack.broker_args = ['--pub-hwm', '2']
    stack.start([('w1', ['--rcvhwm', '2'])], semaphore=False)
    worker = stack.procs['w1']
    worker.send_signal(signal.SIGSTOP)
    try:
        sender = triggers(stack, 'job_name=count', 200)
        sender.start()
        accepted = sender.finish()
        # /workers shows how far behind the stalled worker is.
        assert stack.get('/workers')[1]['w1']['lag']['count'] == len(accepted)
    finally:
        worker.send_signal(signal.SIGCONT)
    states = assert_each_ran_once(stack, 'count', accepted)
    assert states == {'succeeded': 200}
    wait_for(lambda: stack.get('/workers')[1]['w1']['lag']['count'] == 0, what='lag back to 0')


@pytest.mark.both_journals
def test_duplicate_triggers_with_same_key_start_once(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    senders = [triggers(stack, [f'job_name=count&key=dup-{k}' for k in range(10)]) for _ in range(20)]
    for s in senders:
        s.start()
    answers = [s.finish() for s in senders]
    assert all(len(a) == 10 for a in answers)
    distinct = {run for a in answers for run in a}
    assert len(distinct) == 10
    assert assert_each_ran_once(stack, 'count', distinct) == {'succeeded': 10}
    assert len(stack.runs('count')) == 10


@pytest.mark.both_journals
def test_semaphore_killed_mid_count_releases_once(make_stack):
    stack = make_stack(JOBS)
    dates = [f'2026_05_{d:02d}' for d in range(1, 21)]
    sender = triggers(stack, [f'job_name=part&date={d}' for _ in range(10) for d in dates], pace=0.002)
    sender.start()
    sender.wait_accepted(60)
    stack.stop('semaphore', signal.SIGKILL)
    sender.wait_accepted(120)
    stack.start_semaphore()
    assert len(sender.finish()) == 200
    # Every gate got all ten arrivals, then released exactly once.
    gate_runs = wait_for(lambda: (lambda r: r if len(r) == 200 and all(x['state'] == 'succeeded' for x in r)
                                  else None)(stack.runs('gate')), timeout=60, what='200 gate arrivals')
    assert len(gate_runs) == 200
    for d in dates:
        assert wait_for(lambda: stack.lines(f'record-{d}.txt')) == ['released']
    records = [r for r in stack.runs('record')]
    assert sorted(r['params']['tag'] for r in records) == sorted(dates)


@pytest.mark.both_journals
def test_hung_broker_is_noticed_and_caught_up(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    before = stack.start_job('job_name=count')['run_id']
    broker = stack.procs['broker']
    broker.send_signal(signal.SIGSTOP)
    try:
        log = os.path.join(stack.log_dir, 'w1.log')
        wait_for(lambda: 'broker silent' in open(log).read(), timeout=10, what='the worker to notice')
        sender = triggers(stack, 'job_name=count', 20, timeout=30)
        sender.start()    # Mongrel2 holds these until the broker answers again
    finally:
        broker.send_signal(signal.SIGCONT)
    accepted = sender.finish()
    assert assert_each_ran_once(stack, 'count', [before] + accepted) == {'succeeded': 1 + len(accepted)}
    wait_for(lambda: 'broker answering again' in open(log).read(), what='the worker to see the broker back')


@pytest.mark.both_journals
def test_expired_call_is_reported_not_run(make_stack):
    stack = make_stack(JOBS, semaphore=False)
    stack.stop('w1', signal.SIGKILL)
    run = stack.start_job('job_name=stale')['run_id']
    expires = stack.status(run)['expires']
    wait_for(lambda: time.time() > expires + 0.2, what='the deadline to pass')
    stack.start_worker('w1')
    assert final_states(stack.url, [run], ['w1'], 60) == {(run, 'w1'): 'expired'}
    assert stack.lines('ran-w1.txt') == []
    assert wait_for(lambda: stack.lines('record-stale.txt')) == ['expired']    # on_failure fired


@pytest.mark.both_journals
def test_count_all_waits_for_every_expected_worker(make_stack):
    stack = make_stack(JOBS, workers=('w1', ('w2', ['--topics', 'bcast'])))
    runs = [stack.start_job('job_name=bcast')['run_id'] for _ in range(3)]
    for run in runs:
        assert stack.status(run)['workers'].keys() == {'w1', 'w2'}
    lines = wait_for(lambda: (lambda x: x if len(x) == 3 else None)(stack.lines('record-all.txt')),
                     what='three releases')
    gates = {r['run_id']: stack.status(r['run_id']) for r in stack.runs('gate_all')}
    # One gate per parent run, released by its second arrival.
    assert sorted(g['parent'] for g in gates.values()) == sorted(runs * 2)
    tails = sorted(g['workers']['semaphore']['output_tail'].split(' for ')[0] for g in gates.values())
    assert tails == ['1 of 2'] * 3 + ['2 of 2'] * 3
    assert sorted(lines) == sorted(f'released-{g}' for g, s in gates.items()
                                   if s['workers']['semaphore']['output_tail'].endswith('released'))


@pytest.mark.both_journals
def test_journal_is_pruned(make_stack):
    stack = make_stack(JOBS, semaphore=False, start=False)
    stack.broker_args = ['--keep-days', '0.00003']    # about 2.6 s
    stack.start(['w1'], semaphore=False)
    runs = [stack.start_job('job_name=count')['run_id'] for _ in range(30)]
    assert_each_ran_once(stack, 'count', runs)
    # Everything old and taken goes, except the newest run, which carries the sequence on.
    remaining = wait_for(lambda: (lambda r: r if len(r) == 1 else None)(stack.runs('count')),
                         timeout=20, what='pruning')
    assert remaining[0]['run_id'] == runs[-1]
    later = stack.start_job('job_name=count')['run_id']
    assert stack.status(later)['seq'] == 31


@pytest.mark.both_journals
def test_prune_waits_for_the_slowest_cursor(journal_at):
    journal = Journal(journal_at)
    if journal.shared:    # PostgreSQL: only the lease's holder commits (jobz/lease.py)
        journal.take_lease('test', 'http://test', 60.0)
    journal.begin()
    for i in range(5):
        journal.add_run(f'r{i}', 'count', 'count', {}, [], None, [])
    journal.commit()
    # Created just now: nothing is old enough yet.
    assert journal.prune(time.time() - 60, {}) == 0
    journal.begin()
    assert journal.prune(time.time() + 1, {'count': 2}) == 2    # a worker has taken only up to 2
    journal.commit()
    assert [c['run_id'] for c in journal.calls_after('count', 0, 10)] == ['r2', 'r3', 'r4']
    journal.begin()
    assert journal.prune(time.time() + 1, {}) == 2              # the newest (r4) always stays
    journal.commit()
    assert [c['run_id'] for c in journal.calls_after('count', 0, 10)] == ['r4']


def test_a_burst_whose_commit_fails_leaves_no_trace(make_stack, tmp_path):
    """The journal's disk fills up under a burst of triggers: for any run the journal does not hold,
    no client got 200, no call was published (nothing ran), and /metrics counts nothing.

    Before: the counters behind /metrics kept the runs of the failed commit."""
    small = tmp_path / 'small'
    small.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', str(small)], check=True, timeout=10)
    try:
        stack = make_stack(JOBS, start=False)
        stack.broker_args = ['--home', str(small / 'broker')]    # the journal, on a disk of 512 KiB
        stack.start([('w1', ['--topics', 'count'])], semaphore=False)
        big = 'x' * 2000    # about 2 KB of journal per run: a few hundred fill the disk
        sender = triggers(stack, f'job_name=count&v={big}', 400)
        sender.start()
        accepted = sender.finish()
        assert sender.refused[500] > 0 and accepted, (sender.refused, len(accepted))    # it did fill up
        # Room again: the broker carries on by itself (its results and heartbeats commit again).
        subprocess.run(['mount', '-o', 'remount,size=64m', str(small)], check=True, timeout=10)
        journaled = {r['run_id'] for r in stack.runs('count')}
        assert set(accepted) <= journaled    # every 200 is in the journal
        _, text = stack.get('/metrics')
        started = [line for line in text.decode().splitlines() if line.startswith('jobz_runs_started_total{')]
        assert started == [f'jobz_runs_started_total{{job="count"}} {len(journaled)}'], started
        states = final_states(stack.url, journaled, ['w1'], 60)
        assert set(states.values()) == {'succeeded'}
        ran = stack.lines('ran-w1.txt')
        assert sorted(ran) == sorted(journaled)    # each journaled run ran once; nothing else ran
    finally:
        for stack_proc in ('mongrel2', 'w1', 'broker'):
            stack.stop(stack_proc)
        subprocess.run(['umount', str(small)], check=True, timeout=30)


def test_postgresql_restart_under_load_loses_nothing_answered(make_stack):
    """PostgreSQL crashes and comes back while triggers stream in: while it is away every trigger is
    answered 503 at once (no hang, no 200), the broker connects again by itself, and every trigger
    answered 200 before, during or after is in the journal and runs once."""
    cluster = Cluster().start()    # its own: this test crashes it
    try:
        stack = make_stack(JOBS, start=False)
        stack.journal = cluster.new_database()
        stack.start([('w1', ['--topics', 'count'])], semaphore=False)
        sender = triggers(stack, 'job_name=count', 800, pace=0.01, timeout=10)
        sender.start()
        sender.wait_accepted(100)
        cluster.stop('immediate')    # as a crash: no shutdown checkpoint
        wait_for(lambda: sender.refused[503] >= 20, timeout=10, what='503 answers while PostgreSQL is away')
        before = len(sender.accepted)
        cluster.start()
        wait_for(lambda: len(sender.accepted) > before + 20, timeout=20, what='triggers accepted again')
        accepted = sender.finish()
        assert set(sender.refused) == {503}, sender.refused    # refused at once: no timeouts, no 500
        assert_each_ran_once(stack, 'count', accepted)
        with open(os.path.join(stack.log_dir, 'broker.log')) as f:
            assert 'the journal is reachable again' in f.read()
    finally:
        cluster.remove()
