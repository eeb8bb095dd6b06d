"""Links between runs that a client must not forge: idempotency keys, gate arrivals, built-in values.

Each test performs the attack through the real front end and shows it refused."""
import pytest

from conftest import TestStack, http, started, wait_for

JOBS = r"""
feed:
  command: "while [ ! -e {out}/go-%(date)s ]; do sleep 0.05; done"
  on_success: "/job_start?job_name=gate&date=%(date)s"
gate:
  semaphore: {count: 2, key: date}
  on_success: "/job_start?job_name=report&date=%(date)s"
report:
  command: "echo %(date)s >> {out}/report.txt"
step:
  command: "true"
  on_success: "/job_start?job_name=next&tag=%(tag)s"
next:
  command: "echo %(tag)s >> {out}/next.txt"
other:
  command: "true"
"""


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    with started(TestStack(str(tmp_path_factory.mktemp('links')), JOBS)) as s:
        yield s


def go(stack, date: str) -> None:
    with open(f'{stack.out}/go-{date}', 'w'):
        pass


def test_a_key_is_bound_to_its_job(stack):
    first = stack.start_job('job_name=other&key=nightly-1')
    again = stack.start_job('job_name=other&key=nightly-1')
    assert again['existing'] and again['run_id'] == first['run_id']
    status, body = stack.get('/job_start?job_name=next&tag=x&key=nightly-1')
    assert status == 409 and 'already used by a run of job other' in body['error']


def test_a_gates_release_key_cannot_be_taken_first(stack):
    # Before: the unrelated run got the key, and the gate's real release was then `existing`.
    status, body = stack.get('/job_start?job_name=other&key=semaphore.gate.2031_01_01')
    assert status == 403 and 'releases of semaphores' in body['error']
    feeds = [stack.start_job('job_name=feed&date=2031_01_01')['run_id'] for _ in range(2)]
    go(stack, '2031_01_01')
    for run_id in feeds:
        assert stack.wait_run(run_id)['state'] == 'succeeded'
    wait_for(lambda: '2031_01_01' in stack.lines('report.txt'), what='the gate to release its report')
    gate = wait_for(lambda: [g for g in stack.get('/gates?job=gate')[1]['gates'] if g['value'] == '2031_01_01'
                             and g['released']], what='the gate released')[0]
    assert stack.status(gate['released'])['job'] == 'report'


def test_a_semaphore_job_counts_only_handler_calls_of_its_feeders(stack):
    # Before: any client could trigger the gate twice and release it with nothing done.
    for query in ('job_name=gate&date=2031_02_02', 'job_name=gate&date=2031_02_02&key=mine'):
        status, body = stack.get('/job_start?' + query)
        assert status == 403 and 'semaphore job' in body['error']
    # A real run of a job that does not feed the gate cannot be used either.
    step = stack.start_job('job_name=step&tag=t0')['run_id']
    stack.wait_run(step)
    status, body = stack.get(f'/job_start?job_name=gate&date=2031_02_02&parent={step}&key={step}.w1.succeeded')
    assert status == 403 and 'does not start gate' in body['error']
    assert not [g for g in stack.get('/gates?job=gate')[1]['gates'] if g['value'] == '2031_02_02']


def test_a_gate_arrival_waits_for_the_run_to_finish_and_counts_once(stack):
    date = '2031_03_03'
    feeds = [stack.start_job(f'job_name=feed&date={date}')['run_id'] for _ in range(2)]
    for run_id in feeds:
        stack.wait_run(run_id, states=('running',))
    # Forged arrivals for runs still running: before, each counted at once and the gate released
    # with nothing done. Now the broker holds them until the run's result is in.
    for run_id in feeds:
        with pytest.raises(OSError):    # no answer within the second: held
            http(f'{stack.url}/job_start?job_name=gate&date={date}&parent={run_id}&key={run_id}.w1.succeeded',
                 timeout=1)
    assert [r for r in stack.runs('gate') if r['params'].get('date') == date] == []
    go(stack, date)
    for run_id in feeds:
        assert stack.wait_run(run_id)['state'] == 'succeeded'
    wait_for(lambda: date in stack.lines('report.txt'), what='the release')
    arrivals = [r for r in stack.runs('gate') if r['params'].get('date') == date]
    assert sorted(r['parent'] for r in arrivals) == sorted(feeds)    # each finished feed counted once
    assert stack.lines('report.txt').count(date) == 1


def test_built_in_values_cannot_be_given(stack):
    for name in ('run_id', 'worker', 'rc', 'state'):
        status, body = stack.get(f'/job_start?job_name=other&{name}=x')
        assert status == 400 and 'built-in' in body['error'], body


def test_a_handler_key_needs_its_own_run_as_parent(stack):
    step = stack.start_job('job_name=step&tag=t1')['run_id']
    stack.wait_run(step)
    wait_for(lambda: 't1' in stack.lines('next.txt'), what='the chain')
    other = stack.start_job('job_name=other')['run_id']
    for query in (f'job_name=next&tag=evil&key={step}.w1.failed',                      # no parent
                  f'job_name=next&tag=evil&key={step}.w1.failed&parent={other}'):      # someone else's run
        status, body = stack.get('/job_start?' + query)
        assert status == 403, body
    status, body = stack.get('/job_start?job_name=next&tag=evil&parent=20990101-000000-000000000000')
    assert status == 400 and 'unknown parent run' in body['error']
    assert 'evil' not in stack.lines('next.txt')
