"""Start-up, shutdown and outages: bad job files, warm and cold stops, a front end that is down."""
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq

from conftest import ROOT, free_port, http, wait_for
from jobz import ca
from jobz.harness import free_run
from jobz.broker import Broker
from jobz.journal import Journal

PY = sys.executable


@pytest.mark.parametrize('script', ['broker.py', 'worker.py', 'semaphore.py'])
def test_bad_job_file_stops_start_naming_file_job_and_key(tmp_path, script):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('backup:\n  command: "tar czf /b.tgz /etc"\n  timeout: soon\n')
    proc = subprocess.run([PY, os.path.join(ROOT, script), '--jobs', str(bad), '--home', str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f"{bad}: job 'backup': 'timeout' must be a positive number of seconds" in proc.stderr


@pytest.mark.parametrize('script', ['broker.py', 'worker.py', 'semaphore.py'])
def test_help_shows_defaults_and_environment(script):
    proc = subprocess.run([PY, os.path.join(ROOT, script), '--help'], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert 'JOBZ_JOBS' in proc.stdout and 'JOBZ_HOME' in proc.stdout and '(default:' in proc.stdout


SLOW = """
slow:
  command: "sleep 1.5; echo finished >> {out}/slow.txt"
  on_success: "/job_start?job_name=after&tag=%(tag)s"
after:
  command: "echo after >> {out}/after-%(tag)s.txt"
"""


def test_warm_shutdown_lets_running_job_finish(make_stack):
    stack = make_stack(SLOW)
    run = stack.start_job('job_name=slow&tag=warm')
    stack.wait_run(run['run_id'], states=('running',))
    worker = stack.procs['w1']
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert stack.lines('slow.txt') == ['finished']
    assert stack.status(run['run_id'])['workers']['w1']['state'] == 'succeeded'
    # It said goodbye: listed, no longer alive, and not expected for new runs.
    assert wait_for(lambda: stack.get('/workers')[1]['w1']['alive'] is False)
    assert stack.start_job('job_name=slow&tag=later')['workers'] == []
    # Its on_success call went out before the worker left (no worker is left to run `after`).
    wait_for(lambda: [r for r in stack.runs('after') if r['params'] == {'tag': 'warm'}],
             what='the on_success trigger')


def test_cold_shutdown_kills_running_job(make_stack):
    stack = make_stack(SLOW)
    run = stack.start_job('job_name=slow&tag=cold')
    stack.wait_run(run['run_id'], states=('running',))
    worker = stack.procs['w1']
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.1)    # two separate signals, as from a user pressing Ctrl-C twice
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    status = stack.status(run['run_id'])['workers']['w1']
    assert status['state'] == 'failed'
    assert status['reason'].startswith('worker shut down')
    assert stack.lines('slow.txt') == []


def test_handler_call_retried_until_front_end_is_back(make_stack):
    stack = make_stack(SLOW)
    run = stack.start_job('job_name=slow&tag=retry')
    stack.wait_run(run['run_id'], states=('running',))
    stack.stop('mongrel2')
    # The job finishes while the front end is down; its on_success call must wait, not vanish.
    wait_for(lambda: stack.lines('slow.txt'), what='the job to finish')
    assert stack.lines('after-retry.txt') == []
    stack.start_mongrel2()
    assert wait_for(lambda: stack.lines('after-retry.txt'), timeout=20) == ['after']


def test_stack_main_runs_example_jobs_and_stops_cleanly(tmp_path):
    """What `make run` runs: the shipped jobs/ folder, then SIGTERM stops every process.

    With JOBZ_CA it serves HTTPS too, on loopback unless told otherwise, and Mongrel2 (started as
    root) runs as an unprivileged user."""
    port, tls_port = free_run(3), free_port()    # HTTP, then the broker's two ports
    pki = str(tmp_path / 'ca')
    ca.main(['--dir', pki, 'init'])
    ca.main(['--dir', pki, 'server', 'jobz-tls', '--host', '127.0.0.1'])
    env = dict(os.environ, JOBZ_PORT=str(port), JOBZ_HOME=str(tmp_path / 'var'), JOBZ_CA=pki,
               JOBZ_TLS_PORT=str(tls_port), JOBZ_JOBS=os.path.join(ROOT, 'jobs'))
    env.pop('JOBZ_TLS_BIND', None)
    proc = subprocess.Popen([PY, '-m', 'jobz.stack'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_for(lambda: _up(url), timeout=30, what='make run stack')
        status, body = http(url + '/job_start?job_name=hello&date=2026_11_28&wait=20')
        assert status == 200 and body['state'] == 'succeeded'
        assert 'hello from' in list(body['workers'].values())[0]['output_tail']
        children = _children(proc.pid)
        assert len(children) >= 5    # mongrel2 twice, broker, worker, semaphore
        mongrel2 = [c for c in children if open(f'/proc/{c}/comm').read().strip() == 'mongrel2']
        assert len(mongrel2) == 2
        for pid in mongrel2:
            uids = [line.split()[1:] for line in open(f'/proc/{pid}/status') if line.startswith('Uid:')][0]
            assert set(uids) == {str(pwd.getpwnam('nobody').pw_uid)}, uids
        listening = subprocess.run(['ss', '-Hltn', f'sport = :{tls_port}'], capture_output=True, text=True,
                                   timeout=10).stdout.split()
        assert listening[3] == f'127.0.0.1:{tls_port}', listening
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    wait_for(lambda: not any(os.path.exists(f'/proc/{c}') for c in children), what='children gone')


def _up(url):
    try:
        with urllib.request.urlopen(url + '/health', timeout=2) as r:
            import json
            return json.load(r)['workers'] >= 2
    except (OSError, ValueError, KeyError):
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_disconnect_message_is_never_answered(tmp_path):
    """A reply to Mongrel2's disconnect notice makes it loop forever: the broker must stay silent."""
    ctx = zmq.Context()
    ports = [free_port() for _ in range(4)]
    addr = [f'tcp://127.0.0.1:{p}' for p in ports]
    broker = Broker({}, Journal(str(tmp_path / 'j.db')), ctx, m2_recv=addr[0], m2_send=addr[1],
                    m2_ident='t', pub=addr[2], router=addr[3])
    push = ctx.socket(zmq.PUSH)
    push.bind(addr[0])
    replies = ctx.socket(zmq.SUB)
    replies.subscribe(b'')
    replies.bind(addr[1])
    try:
        def message(conn_id: bytes, path: bytes, headers: bytes, body: bytes) -> bytes:
            return b'front ' + conn_id + b' ' + path + b' ' + protocol_ns(headers) + protocol_ns(body)

        def protocol_ns(b: bytes) -> bytes:
            return str(len(b)).encode() + b':' + b + b','

        # A normal request first proves the reply path works, so silence below means something.
        wait_for(lambda: _roundtrip(broker, push, replies, message(
            b'7', b'/health', b'{"METHOD":"GET","PATH":"/health","QUERY":""}', b'')), what='a reply')
        push.send(message(b'8', b'@*', b'{"METHOD":"JSON"}', b'{"type":"disconnect"}'))
        assert broker.m2.reqs.poll(2000)
        broker.step()
        assert replies.poll(300) == 0
    finally:
        push.close(0)
        replies.close(0)
        broker.close()
        ctx.term()


def _roundtrip(broker, push, replies, msg) -> bool:
    push.send(msg)
    if not broker.m2.reqs.poll(1000):
        return False
    broker.step()
    if not replies.poll(1000):
        return False
    return replies.recv().startswith(b'front 1:7, HTTP/1.1 200')
