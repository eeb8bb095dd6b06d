"""What operators see besides a run's status: full output, chains and gates, /metrics, log records."""
import json
import os
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import TestStack, started, wait_for

JOBS = r"""
talk:
  # A line, then a pause the test ends, then more than the status's output tail.
  command: "echo first line; while [ ! -e {out}/go-%(tag)s ]; do sleep 0.02; done; seq 1 3000; echo done >&2; exit %(code)s"
  defaults: {code: '0'}
small:
  command: "seq 1 1000"
  topic: small
a:
  command: "true"
  on_success: "/job_start?job_name=b&tag=%(tag)s"
b:
  command: "true"
part:
  command: "while [ ! -e {out}/go-%(date)s-%(n)s ]; do sleep 0.02; done"
  on_success: "/job_start?job_name=gate3&date=%(date)s"
gate3:
  semaphore: {count: 3, key: date}
  on_success: "/job_start?job_name=after&date=%(date)s"
after:
  command: "echo after %(date)s"
"""


@pytest.fixture(scope='module', params=['sqlite', 'postgresql'])
def stack(tmp_path_factory, request):
    """One stack for the module, whose broker journals in SQLite, then one on PostgreSQL."""
    s = TestStack(str(tmp_path_factory.mktemp('views')), JOBS)
    if request.param == 'postgresql':
        s.journal = request.getfixturevalue('postgres').new_database()
    # w2 keeps only 500 characters of output per run.
    with started(s, [('w1', ['--topics', 'talk,a,b,part,after']),
                     ('w2', ['--topics', 'small', '--output-max', '500', '--output-tail', '100'])]):
        yield s


def go(stack, name):
    open(os.path.join(stack.out, name), 'w').close()


def output(stack, run_id, **q):
    query = '&'.join(f'{k}={v}' for k, v in q.items())
    status, body = stack.get(f'/job_output?run_id={run_id}&{query}')
    assert status == 200, body
    return body


def test_output_comes_live_and_whole(stack):
    run_id = stack.start_job('job_name=talk&tag=live')['run_id']
    live = wait_for(lambda: (lambda b: b if b['workers']['w1']['output'] else None)(output(stack, run_id)),
                    10, 'the first line while the command runs')
    w1 = live['workers']['w1']
    assert live['state'] in ('pending', 'running') and w1['output'] == 'first line\n' and not w1['complete']
    go(stack, 'go-live')
    assert stack.wait_run(run_id)['state'] == 'succeeded'
    whole = output(stack, run_id)['workers']['w1']
    expected = 'first line\n' + ''.join(f'{i}\n' for i in range(1, 3001)) + 'done\n'
    assert whole['complete'] and whole['dropped'] == 0
    assert whole['output'] == expected           # all of it, far beyond the status's tail
    assert len(stack.status(run_id)['workers']['w1']['output_tail']) <= 4096
    # From an offset: only what came after it.
    rest = output(stack, run_id, offset=whole['next'] - 5)['workers']['w1']
    assert rest['output'] == '3000\ndone\n'[-5:] and rest['next'] == whole['next']
    assert output(stack, run_id, offset=whole['next'])['workers']['w1']['output'] == ''


def test_output_is_bounded_by_the_workers_setting(stack):
    run_id = stack.start_job('job_name=small')['run_id']
    stack.wait_run(run_id)
    w2 = output(stack, run_id)['workers']['w2']
    full = ''.join(f'{i}\n' for i in range(1, 1001))
    assert w2['complete'] and w2['output'] == full[-500:]
    assert w2['dropped'] == len(full) - 500 and w2['next'] == len(full)
    assert stack.status(run_id)['workers']['w2']['output_tail'] == full[-100:]


def test_output_and_chain_refuse_bad_requests(stack):
    assert stack.get('/job_output')[0] == 400
    assert stack.get('/job_output?run_id=nope')[0] == 404
    run_id = stack.start_job('job_name=small')['run_id']
    status, body = stack.get(f'/job_output?run_id={run_id}&offset=-1')
    assert status == 400 and 'offset' in body['error']
    assert stack.get(f'/job_output?run_id={run_id}&worker=w9')[0] == 404
    assert stack.get('/chain?run_id=nope')[0] == 404
    status, body = stack.get('/gates?job=a')
    assert status == 404 and "'a'" in body['error']


def test_a_chain_holds_its_runs_and_a_stuck_gate_names_what_is_missing(stack):
    a = stack.start_job('job_name=a&tag=c1')['run_id']
    b = wait_for(lambda: stack.status(a)['children'], 10, 'the chain to go on')[0]
    chain = stack.get(f'/chain?run_id={b}')[1]
    assert chain['root'] == a and set(chain['runs']) == {a, b} and not chain['truncated']
    assert chain['runs'][a]['children'] == [b] and chain['runs'][b]['parent'] == a

    parts = [stack.start_job(f'job_name=part&date=d9&n={n}')['run_id'] for n in range(3)]
    go(stack, 'go-d9-0')
    go(stack, 'go-d9-1')
    gate = wait_for(lambda: [g for g in stack.get('/gates?job=gate3&open=1')[1]['gates']
                             if g['value'] == 'd9' and g['arrived'] == 2], 10, 'two arrivals at the gate')[0]
    assert gate['need'] == 3 and gate['missing'] == 1 and gate['released'] is None
    assert [w['run_id'] for w in gate['waiting']] == [parts[2]]     # the blocked part, by name
    assert {a['from'] for a in gate['arrivals']} == set(parts[:2])
    chain = stack.get(f'/chain?run_id={parts[0]}')[1]
    assert set(parts) <= set(chain['runs'])                          # the other inputs, through the gate
    assert chain['gates']['gate3:d9']['waiting'][0]['run_id'] == parts[2]

    go(stack, 'go-d9-2')
    gate = wait_for(lambda: [g for g in stack.get('/gates?job=gate3')[1]['gates']
                             if g['value'] == 'd9' and g['released']], 10, 'the gate to release')[0]
    assert gate['arrived'] == 3 and gate['missing'] == 0 and gate['waiting'] == []
    assert stack.wait_run(gate['released'])['job'] == 'after'
    assert not [g for g in stack.get('/gates?open=1')[1]['gates'] if g['value'] == 'd9']
    chain = stack.get(f'/chain?run_id={parts[1]}')[1]
    assert gate['released'] in chain['runs']


def metrics(stack) -> dict:
    status, body = stack.get('/metrics')
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):    # the reference parser
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_parse_and_count(stack):
    before = metrics(stack)
    ok = stack.start_job('job_name=talk&tag=m1')['run_id']
    bad = stack.start_job('job_name=talk&tag=m2&code=4')['run_id']
    go(stack, 'go-m2')
    assert stack.wait_run(bad)['state'] == 'failed'
    during = metrics(stack)
    assert during[('jobz_runs_open', (('job', 'talk'), ('state', 'running')))] >= 1    # `ok` still waits

    go(stack, 'go-m1')
    stack.wait_run(ok)
    m = metrics(stack)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m.get(key, 0) - before.get(key, 0)
    assert grew('jobz_runs_started_total', job='talk') == 2
    assert grew('jobz_runs_finished_total', job='talk', state='succeeded') == 1
    assert grew('jobz_runs_finished_total', job='talk', state='failed') == 1
    assert grew('jobz_run_duration_seconds_count', job='talk') == 2
    assert m[('jobz_run_duration_seconds_bucket', (('job', 'talk'), ('le', '+Inf')))] == \
        m[('jobz_run_duration_seconds_count', (('job', 'talk'),))]
    assert m[('jobz_workers_connected', ())] == 3
    assert m[('jobz_worker_up', (('worker', 'w2'),))] == 1
    assert ('jobz_worker_lag', (('topic', 'small'), ('worker', 'w2'))) in m
    runs = len(stack.get('/runs?limit=1000')[1]['runs'])
    assert m[('jobz_journal_runs', ())] == runs and m[('jobz_journal_bytes', ())] > 0


LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)')


def parse_logfmt(line: str) -> dict:
    pairs = LOGFMT.findall(line)
    assert ' '.join(f'{k}={v}' for k, v in pairs) == line, f'not one logfmt record: {line!r}'
    return {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def test_log_records_are_one_line_each_and_name_the_run(stack):
    run_id = stack.start_job('job_name=small')['run_id']
    stack.wait_run(run_id)

    def records():
        out = []
        for name in ('broker.log', 'w2.log', 'semaphore.log'):
            with open(os.path.join(stack.log_dir, name)) as f:
                out += [parse_logfmt(line.rstrip('\n')) for line in f]
        return out
    about = wait_for(lambda: [r for r in records() if r.get('run') == run_id and r['who'] == 'worker:w2'],
                     10, 'the worker to log the run')
    assert about[0]['job'] == 'small' and about[0]['level'] == 'info' and 'succeeded' in about[0]['msg']
    assert [r for r in records() if r.get('run') == run_id and r['who'] == 'broker' and r.get('job') == 'small']
    assert all(re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z', r['ts']) for r in records())


def test_the_page_for_browsers_and_json_for_the_rest(stack):
    status, body = stack.get('/', headers={'Accept': 'text/html,application/xhtml+xml'})
    assert status == 200 and body.startswith(b'<!doctype html>')
    with urllib.request.urlopen(urllib.request.Request(stack.url + '/', headers={'Accept': 'text/html'})) as r:
        csp = r.headers['Content-Security-Policy']
        assert r.headers['Content-Type'].startswith('text/html')
    assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp and 'http' not in csp
    status, body = stack.get('/')
    assert status == 200 and body['service'] == 'jobz' and '/metrics' in body['paths']
