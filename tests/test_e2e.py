"""End to end through the real Mongrel2, broker, workers and semaphore, on loopback."""
import http.client
import os

import pytest

from conftest import TestStack, started, wait_for

JOBS = r"""
write:
  command: "echo %(value)s >> {out}/write-$JOBZ_WORKER.txt"
ok:
  command: "true"
slow:
  command: "sleep 2"
fails:
  command: "echo boom; exit 7"
  on_failure: "/job_start?job_name=record&what=%(job_name)s-%(state)s-%(rc)s&tag=%(tag)s"
dated:
  command: "echo %(date)s >> {out}/dated.txt"
  params:
    date: '\d{4}_\d{2}_\d{2}'
needs:
  command: "echo %(first)s %(second)s"
chain1:
  command: "echo 1 >> {out}/chain-%(tag)s.txt"
  on_success: "/job_start?job_name=chain2&tag=%(tag)s"
chain2:
  command: "echo 2 >> {out}/chain-%(tag)s.txt"
  on_success: "/job_start?job_name=chain3&tag=%(tag)s"
chain3:
  command: "echo 3 >> {out}/chain-%(tag)s.txt"
record:
  command: "echo %(what)s >> {out}/record-%(tag)s.txt"
hang:
  # The inner shell ignores TERM: only the process-group KILL after the grace ends it.
  command: "sh -c 'trap \"\" TERM; echo $$ > {out}/orphan-%(tag)s.pid; while :; do sleep 1; done' & sleep 60"
  timeout: 1
  on_failure: "/job_start?job_name=record&what=%(job_name)s-%(state)s&tag=%(tag)s"
env:
  command: "env | grep ^JOBZ_ | sort > {out}/env-%(run_id)s.txt"
note:
  command: "curl -fsS \"$JOBZ_URL/job_note?run_id=$JOBZ_RUN_ID&worker=$JOBZ_WORKER&note=half-way\""
both:
  command: "echo %(value)s >> {out}/both-$JOBZ_WORKER.txt"
elsewhere:
  command: "true"
  topic: other
otherwise:
  command: "true"
  topic: otherwise
part:
  command: "true"
  on_success: "/job_start?job_name=gate10&date=%(date)s"
gate10:
  semaphore: {count: 10, key: date}
  on_success: "/job_start?job_name=record&what=released-%(date)s&tag=gate10-%(date)s"
piece:
  command: "true"
  on_success: "/job_start?job_name=gate3&date=%(date)s"
gate3:
  semaphore: {count: 3, key: date}
  on_success: "/job_start?job_name=record&what=released&tag=gate3-%(date)s"
"""

# w2 has job files of its own: a different command for `both`, and none for `elsewhere`.
W2_JOBS = """
both:
  command: "echo %(value)s >> {out}/both-w2-own.txt"
"""


@pytest.fixture(scope='module', params=['sqlite', 'postgresql'])
def stack(tmp_path_factory, request):
    """One stack for the module, whose broker journals in SQLite, then one on PostgreSQL."""
    root = tmp_path_factory.mktemp('e2e')
    s = TestStack(str(root), JOBS)
    if request.param == 'postgresql':
        s.journal = request.getfixturevalue('postgres').new_database()
    w2_jobs = os.path.join(str(root), 'jobs-w2.yaml')
    with open(w2_jobs, 'w') as f:
        f.write(W2_JOBS.replace('{out}', s.out))
    s.worker_args = ['--kill-grace', '1']
    with started(s, [('w1', ['--concurrency', '2']), ('w2', ['--jobs', w2_jobs, '--topics', 'both,other'])]):
        yield s


def test_command_writes_interpolated_value(stack):
    run = stack.start_job('job_name=write&value=hello-1')
    assert run['workers'] == ['w1']
    assert stack.wait_run(run['run_id'])['state'] == 'succeeded'
    assert 'hello-1' in stack.lines('write-w1.txt')


def test_status_shows_worker_result(stack):
    run = stack.start_job('job_name=fails&tag=status')
    status = stack.wait_run(run['run_id'])
    w1 = status['workers']['w1']
    assert status['state'] == 'failed'
    assert (w1['state'], w1['rc'], w1['reason']) == ('failed', 7, 'exit code 7')
    assert 'boom' in w1['output_tail']
    assert w1['finished'] >= w1['started'] > 0


def test_wait_success_is_200(stack):
    status, body = stack.get('/job_start?job_name=ok&wait=10')
    assert (status, body['state']) == (200, 'succeeded')


def test_wait_failure_is_500(stack):
    status, body = stack.get('/job_start?job_name=fails&tag=wait&wait=10')
    assert (status, body['state']) == (500, 'failed')


def test_wait_running_out_is_504(stack):
    status, body = stack.get('/job_start?job_name=slow&wait=0.3')
    assert status == 504
    assert body['state'] in ('pending', 'running')


def test_chain_of_three(stack):
    stack.start_job('job_name=chain1&tag=c3')
    wait_for(lambda: len(stack.lines('chain-c3.txt')) == 3, what='three chain steps')
    assert stack.lines('chain-c3.txt') == ['1', '2', '3']


def test_on_failure_fires_on_nonzero_exit(stack):
    stack.start_job('job_name=fails&tag=nz')
    assert wait_for(lambda: stack.lines('record-nz.txt')) == ['fails-failed-7']


def test_timeout_kills_process_group_and_fires_on_failure(stack):
    run = stack.start_job('job_name=hang&tag=to')
    status = stack.wait_run(run['run_id'], timeout=20)
    w1 = status['workers']['w1']
    assert w1['state'] == 'failed'
    assert w1['reason'].startswith('timeout')
    assert wait_for(lambda: stack.lines('record-to.txt')) == ['hang-failed']
    pid = int(wait_for(lambda: stack.lines('orphan-to.pid'))[0])
    # The TERM-proof grandchild must be gone too (a zombie awaiting its reaper counts as gone).
    wait_for(lambda: not _alive(pid), timeout=10, what=f'orphan {pid} to die')


def _alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_commands_get_jobz_environment(stack):
    run = stack.start_job('job_name=env&some_param=abc')
    stack.wait_run(run['run_id'])
    env = dict(line.split('=', 1) for line in stack.lines(f"env-{run['run_id']}.txt"))
    assert env['JOBZ_RUN_ID'] == run['run_id']
    assert env['JOBZ_JOB'] == 'env'
    assert env['JOBZ_WORKER'] == 'w1'
    assert env['JOBZ_URL'] == stack.url
    assert env['JOBZ_PARAM_SOME_PARAM'] == 'abc'


def test_progress_note_from_a_running_command(stack):
    run = stack.start_job('job_name=note')
    status = stack.wait_run(run['run_id'])
    assert status['state'] == 'succeeded'
    assert [(n['worker'], n['note']) for n in status['notes']] == [('w1', 'half-way')]


def test_two_workers_on_one_topic_both_run_their_own_command(stack):
    run = stack.start_job('job_name=both&value=twice')
    assert run['workers'] == ['w1', 'w2']
    status = stack.wait_run(run['run_id'])
    assert status['state'] == 'succeeded'
    assert 'twice' in stack.lines('both-w1.txt')
    assert 'twice' in stack.lines('both-w2-own.txt')


def test_worker_without_command_reports_failure(stack):
    run = stack.start_job('job_name=elsewhere')
    status = stack.wait_run(run['run_id'])
    assert status['workers']['w1']['state'] == 'succeeded'
    assert status['workers']['w2']['state'] == 'failed'
    assert "no command for job 'elsewhere' on worker w2" in status['workers']['w2']['reason']


def test_topic_is_not_matched_by_prefix(stack):
    """w2 subscribes to `other`; a call on `otherwise` must not reach it (SUB matches prefixes)."""
    run = stack.start_job('job_name=otherwise')
    assert run['workers'] == ['w1']
    # A later call that w2 does get: once it reported that, it has seen everything published before.
    later = stack.start_job('job_name=elsewhere')
    stack.wait_run(later['run_id'])
    status = stack.wait_run(run['run_id'])
    assert list(status['workers']) == ['w1'] and status['state'] == 'succeeded'


def test_fan_in_of_ten_releases_once(stack):
    for _ in range(12):    # two more than the gate needs: they must not release it again
        stack.start_job('job_name=part&date=2026_01_01')
    gate_runs = wait_for(lambda: (lambda r: r if len(r) == 12 and all(x['state'] == 'succeeded' for x in r)
                                  else None)(stack.runs('gate10')), what='12 gate arrivals')
    outputs = [stack.status(r['run_id'])['workers']['semaphore']['output_tail'] for r in gate_runs]
    assert sum('released' in o for o in outputs) == 1
    assert wait_for(lambda: stack.lines('record-gate10-2026_01_01.txt')) == ['released-2026_01_01']
    record_runs = [r for r in stack.runs('record') if r['params'].get('tag') == 'gate10-2026_01_01']
    assert len(record_runs) == 1


def test_semaphore_keeps_two_keys_apart(stack):
    for date in ('2026_02_01', '2026_02_02', '2026_02_01', '2026_02_02', '2026_02_01'):
        stack.start_job(f'job_name=piece&date={date}')
    assert wait_for(lambda: stack.lines('record-gate3-2026_02_01.txt')) == ['released']
    wait_for(lambda: len([r for r in stack.runs('gate3') if r['state'] == 'succeeded']) == 5,
             what='five gate arrivals')
    assert stack.lines('record-gate3-2026_02_02.txt') == []    # only two of three so far
    stack.start_job('job_name=piece&date=2026_02_02')
    assert wait_for(lambda: stack.lines('record-gate3-2026_02_02.txt')) == ['released']


def test_idempotent_key_starts_once(stack):
    first = stack.start_job('job_name=write&value=keyed&key=k-123')
    again = stack.start_job('job_name=write&value=other&key=k-123')
    assert again['run_id'] == first['run_id']
    assert (first['existing'], again['existing']) == (False, True)
    stack.wait_run(first['run_id'])
    assert stack.lines('write-w1.txt').count('keyed') == 1
    assert 'other' not in stack.lines('write-w1.txt')


@pytest.mark.parametrize('value', [
    '$(touch {out}/pwned)', '`touch {out}/pwned`', 'a;touch {out}/pwned', 'a|touch {out}/pwned',
    'a&&touch {out}/pwned', 'a\ntouch {out}/pwned', "a' ; touch {out}/pwned ; '", '%24%28id%29',
])
def test_injection_is_stripped_and_reported(stack, value):
    from urllib.parse import quote
    value = value.replace('{out}', stack.out)
    run = stack.start_job('job_name=write&value=' + quote(value, safe='%'))
    assert run['sanitized'] == ['value']
    stack.wait_run(run['run_id'])
    assert not os.path.exists(os.path.join(stack.out, 'pwned'))
    assert run['params']['value'] in stack.lines('write-w1.txt')


def test_job_status_of_unknown_run_is_404(stack):
    status, body = stack.get('/job_status?run_id=nope')
    assert status == 404 and 'nope' in body['error']


@pytest.mark.parametrize('path, method, code, words', [
    ('/job_start?job_name=nosuchjob', 'GET', 404, "unknown job 'nosuchjob'"),
    ('/no/such/path', 'GET', 404, 'unknown path'),
    ('/job_start', 'GET', 400, "missing parameter 'job_name'"),
    ('/job_start?job_name=needs&first=a', 'GET', 400, "placeholder 'second'"),
    ('/job_start?job_name=dated&date=yesterday', 'GET', 400, "parameter 'date' does not match"),
    ('/job_start?job_name=dated&date=2026_01_01;x', 'GET', 400, "parameter 'date' does not match"),
    ('/job_start?job_name=write&value=;;;', 'GET', 400, "'value' is empty"),
    ('/job_start?job_name=ok&wait=soon', 'GET', 400, "'wait' must be a number"),
    ('/jobs', 'DELETE', 405, 'method DELETE not allowed'),
    ('/job_status?run_id=x', 'POST', 405, 'method POST not allowed'),
])
def test_errors_are_json_with_status(stack, path, method, code, words):
    status, body = stack.get(path, method=method)
    assert status == code
    assert words in body['error']


def test_oversized_body_is_413_json(stack):
    status, body = stack.get('/job_start?job_name=ok', method='POST', data=b'a=' + b'x' * 70000,
                             headers={'Content-Type': 'application/x-www-form-urlencoded'})
    assert status == 413 and 'over' in body['error']


def test_post_form_triggers(stack):
    status, body = stack.get('/job_start', method='POST', data=b'job_name=dated&date=2026_03_03',
                             headers={'Content-Type': 'application/x-www-form-urlencoded'})
    assert status == 200
    stack.wait_run(body['run_id'])
    assert '2026_03_03' in stack.lines('dated.txt')


def test_head_has_headers_only(stack):
    conn = http.client.HTTPConnection('127.0.0.1', stack.port, timeout=10)
    conn.request('HEAD', '/health')
    resp = conn.getresponse()
    assert resp.status == 200 and int(resp.getheader('Content-Length')) > 0
    assert resp.read() == b''
    # HEAD never starts a job: a link checker or monitor must not trigger anything.
    conn.request('HEAD', '/job_start?job_name=ok')
    resp = conn.getresponse()
    assert resp.status == 405 and resp.read() == b''
    conn.close()


def test_listing_endpoints(stack):
    assert stack.get('/health')[1]['ok'] is True
    jobs = stack.get('/jobs')[1]
    assert jobs['dated']['params'] == {'date': r'\d{4}_\d{2}_\d{2}'}
    assert jobs['gate10']['semaphore'] == {'count': 10, 'key': 'date'}
    workers = stack.get('/workers')[1]
    assert set(workers) == {'w1', 'w2', 'semaphore'}
    assert workers['w2']['topics'] == ['both', 'other'] and workers['w2']['alive']
    run = stack.start_job('job_name=dated&date=2026_04_04')
    listed = stack.get('/runs?job=dated&limit=1')[1]['runs']
    assert [r['run_id'] for r in listed] == [run['run_id']]


def test_concurrency_limit(stack):
    runs = [stack.start_job('job_name=slow')['run_id'] for _ in range(3)]
    statuses = [stack.wait_run(r, timeout=20)['workers']['w1'] for r in runs]
    spans = sorted((s['started'], s['finished']) for s in statuses)
    # With --concurrency 2 the third run starts only after one of the first two ended.
    assert spans[2][0] >= min(spans[0][1], spans[1][1]) - 0.05
    assert spans[1][0] < spans[0][1]    # ... while the first two did overlap
