"""CURVE between broker and workers: enrolled keys only, identity from the key, encrypted wire."""
import contextlib
import os
import select
import socket
import subprocess
import sys
import threading

import pytest
import zmq

from conftest import ROOT, free_port, wait_for
from jobz import keys, protocol as p
from jobz.cli import is_loopback

JOBS = """
count:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  topic: a
other:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  topic: b
secret:
  command: "echo %(value)s > /dev/null"
  topic: a
"""


@pytest.fixture
def curve(tmp_path):
    """Keys for the broker, w1 (all topics), w2 (topic a only) and an intruder nobody enrolled."""
    kdir, enrolled = str(tmp_path / 'keys'), str(tmp_path / 'enrolled')
    for name in ('broker', 'w1', 'w2', 'w3', 'intruder', 'fake-broker'):
        keys.main(['new', name, '--dir', kdir])
    keys.main(['enroll', os.path.join(kdir, 'w1.key'), '--enrolled', enrolled])
    keys.main(['enroll', os.path.join(kdir, 'w2.key'), '--enrolled', enrolled, '--topics', 'a'])
    key = lambda name, secret=True: os.path.join(kdir, name + ('.key_secret' if secret else '.key'))  # noqa: E731
    return {'dir': kdir, 'enrolled': enrolled, 'key': key,
            'broker_args': ['--curve-secret', key('broker'), '--enrolled', enrolled]}


def worker_args(curve, name, broker='broker', *extra):
    return ['--curve-secret', curve['key'](name), '--broker-key', curve['key'](broker, False), *extra]


def start_secure(make_stack, curve, workers):
    stack = make_stack(JOBS, start=False)
    stack.broker_args = curve['broker_args']
    stack.start([(name, worker_args(curve, name, *extra)) for name, *extra in workers], semaphore=False)
    return stack


def test_enrolled_worker_runs_jobs_over_curve(make_stack, curve):
    stack = start_secure(make_stack, curve, [('w1',)])
    run = stack.start_job('job_name=count')
    assert run['workers'] == ['w1']
    assert stack.wait_run(run['run_id'])['state'] == 'succeeded'
    assert stack.lines('ran-w1.txt') == [run['run_id']]


def test_unknown_key_or_wrong_broker_key_gets_nothing(make_stack, curve):
    stack = start_secure(make_stack, curve, [('w1',)])
    stack.start_worker('intruder', *worker_args(curve, 'intruder'))
    # w3 has a key pair but pins a broker key that is not the broker's.
    stack.start_worker('w3', *worker_args(curve, 'w3', 'fake-broker'))
    keys.main(['enroll', curve['key']('w3', False), '--enrolled', curve['enrolled']])
    runs = [stack.start_job('job_name=count')['run_id'] for _ in range(5)]
    for run in runs:
        assert stack.wait_run(run)['state'] == 'succeeded'
    # The broker's own view: neither ever registered, so neither is listed nor expected.
    assert set(stack.get('/workers')[1]) == {'w1'}
    assert stack.start_job('job_name=count')['workers'] == ['w1']
    assert stack.lines('ran-intruder.txt') == [] and stack.lines('ran-w3.txt') == []


def _raw_socket(ctx, kind, addr, secret=None, server_key=None, ident=None):
    sock = ctx.socket(kind)
    sock.linger = 0
    if ident:
        sock.routing_id = ident
    if secret:
        from jobz.curve import make_client
        make_client(sock, secret, server_key)
    if kind == zmq.SUB:
        sock.subscribe(b'')
    sock.connect(addr)
    return sock


def test_no_curve_and_unknown_keys_can_neither_read_nor_report(make_stack, curve):
    stack = start_secure(make_stack, curve, [('w1',)])
    run = stack.start_job('job_name=count')['run_id']
    stack.wait_run(run)
    ctx = zmq.Context()
    plain = [_raw_socket(ctx, zmq.DEALER, stack.addr('router'), ident=b'w1'),
             _raw_socket(ctx, zmq.SUB, stack.addr('pub'))]
    unknown = [_raw_socket(ctx, zmq.DEALER, stack.addr('router'), curve['key']('intruder'),
                           curve['key']('broker', False), ident=b'w1'),
               _raw_socket(ctx, zmq.SUB, stack.addr('pub'), curve['key']('intruder'), curve['key']('broker', False))]
    try:
        forged = p.pack({'run_id': run, 'state': 'failed', 'rc': 99, 'reason': 'forged'})
        for dealer in (plain[0], unknown[0]):
            for frames in ([p.RESULT, forged], [p.SYNC, p.pack({'topics': ['a'], 'cursors': {'a': 0}})]):
                # Queued while the handshake runs; once the broker has refused the handshake the
                # socket has no connection to queue on for a moment (Again): refused either way.
                with contextlib.suppress(zmq.Again):
                    dealer.send_multipart(frames, zmq.NOBLOCK)
        later = stack.start_job('job_name=count')['run_id']
        stack.wait_run(later)
        for sock in plain + unknown:
            assert sock.poll(1000) == 0, 'a peer without an enrolled key received something'
        assert stack.status(run)['workers']['w1']['rc'] == 0      # the forged result changed nothing
    finally:
        for sock in plain + unknown:
            sock.close()
        ctx.term()


def test_enrolled_key_cannot_pose_as_another_worker(make_stack, curve):
    stack = start_secure(make_stack, curve, [('w1',)])
    stack.start_worker('w2', *worker_args(curve, 'w1'))    # calls itself w2 but holds w1's key
    log = os.path.join(stack.log_dir, 'broker.log')
    wait_for(lambda: "claiming to be 'w2' from key 'w1'" in open(log).read(), what='the broker to refuse it')
    assert 'w2' not in stack.get('/workers')[1]


def test_topic_permissions(make_stack, curve):
    stack = start_secure(make_stack, curve, [('w1',), ('w2', 'broker', '--topics', 'a,b')])
    on_a = stack.start_job('job_name=count')
    on_b = stack.start_job('job_name=other')
    assert on_a['workers'] == ['w1', 'w2']
    assert on_b['workers'] == ['w1']                  # w2 asked for b, but its key allows only a
    assert stack.wait_run(on_a['run_id'])['state'] == 'succeeded'
    stack.wait_run(on_b['run_id'])
    assert stack.lines('ran-w2.txt') == [on_a['run_id']]
    assert stack.get('/workers')[1]['w2']['topics'] == ['a']


def test_enroll_and_revoke_while_running(make_stack, curve):
    stack = start_secure(make_stack, curve, [('w1',)])
    stack.start_worker('w3', *worker_args(curve, 'w3'))
    first = stack.start_job('job_name=count')
    assert first['workers'] == ['w1']
    keys.main(['enroll', curve['key']('w3', False), '--enrolled', curve['enrolled']])
    wait_for(lambda: stack.get('/workers')[1].get('w3', {}).get('alive'), timeout=20, what='w3 admitted')
    second = stack.start_job('job_name=count')
    assert second['workers'] == ['w1', 'w3']
    stack.wait_run(second['run_id'])
    assert second['run_id'] in stack.lines('ran-w3.txt')
    keys.main(['revoke', 'w3', '--enrolled', curve['enrolled']])
    wait_for(lambda: not stack.get('/workers')[1]['w3']['alive'], timeout=20, what='w3 revoked')
    third = stack.start_job('job_name=count')
    assert third['workers'] == ['w1']
    assert stack.wait_run(third['run_id'])['state'] == 'succeeded'
    # w1 kept everything across the key change: all three runs ran once there.
    assert sorted(stack.lines('ran-w1.txt')) == sorted(r['run_id'] for r in (first, second, third))
    assert third['run_id'] not in stack.lines('ran-w3.txt')


class Tap(threading.Thread):
    """A TCP relay that keeps a copy of every byte that crosses it."""

    def __init__(self, target_port: int):
        super().__init__(daemon=True)
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.seen = bytearray()
        self.stop = threading.Event()

    def run(self):
        pairs = []
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                a, _ = self.listener.accept()
                pairs.append((a, socket.create_connection(('127.0.0.1', self.target))))
            except socket.timeout:
                pass
            socks = [s for pair in pairs for s in pair]
            ready = select.select(socks, [], [], 0.05)[0] if socks else []
            for s in ready:
                for a, b in pairs:
                    if s in (a, b):
                        data = s.recv(65536)
                        if data:
                            self.seen += data
                            (b if s is a else a).sendall(data)
        for s in [s for pair in pairs for s in pair] + [self.listener]:
            s.close()


@pytest.mark.parametrize('secure', [True, False])
def test_payload_is_not_readable_on_the_wire(make_stack, curve, secure):
    stack = make_stack(JOBS, start=False)
    if secure:
        stack.broker_args = curve['broker_args']
    stack.start([], semaphore=False)
    taps = {name: Tap(stack.ports[name]) for name in ('pub', 'router')}
    for tap in taps.values():
        tap.start()
    try:
        stack.spawn('w1', stack.script('worker.py') + [
            '--name', 'w1', '--jobs', *stack.jobs, '--home', stack.home, '--url', stack.url,
            '--pub', f"tcp://127.0.0.1:{taps['pub'].port}", '--router', f"tcp://127.0.0.1:{taps['router'].port}",
            *(worker_args(curve, 'w1') if secure else [])])
        stack.wait_healthy(20, workers=1)
        run = stack.start_job('job_name=secret&value=sekrit-7f3a9')
        assert stack.wait_run(run['run_id'])['state'] == 'succeeded'
        seen = bytes(taps['pub'].seen + taps['router'].seen)
        assert len(seen) > 200     # the traffic did go through the taps
        # Without CURVE the value is plain to read, which shows the tap would catch it.
        assert (b'sekrit-7f3a9' in seen) is not secure
        assert (run['run_id'].encode() in seen) is not secure
    finally:
        stack.stop('w1')
        for tap in taps.values():
            tap.stop.set()
            tap.join(5)


def test_a_peer_claiming_another_workers_routing_id_gets_nothing(make_stack, curve):
    """w2's key, routing id 'w1': before, ROUTER handover gave it w1's slot (w1's direct calls, even on
    topics w2's key may not have) and cut the real w1 off, silently."""
    keys.main(['enroll', curve['key']('w1', False), '--enrolled', curve['enrolled'], '--topics', 'a,b'])
    stack = start_secure(make_stack, curve, [('w1',)])    # limited to a,b: its live calls come directly
    wait_for(lambda: stack.get('/workers')[1]['w1']['topics'] == ['a', 'b'], what='w1 with its topics')
    ctx = zmq.Context()
    thief = _raw_socket(ctx, zmq.DEALER, stack.addr('router'), curve['key']('w2'), curve['key']('broker', False),
                        ident=b'w1')
    try:
        thief.send_multipart([p.SYNC, p.pack({'topics': ['a', 'b'], 'cursors': {}, 'running': 0})])
        log = os.path.join(stack.log_dir, 'broker.log')
        wait_for(lambda: "claiming to be 'w1' from key 'w2'" in open(log).read(), what='the attempt logged')
        runs = [stack.start_job('job_name=other')['run_id'] for _ in range(3)]    # topic b: not w2's
        for run in runs:
            assert stack.wait_run(run)['workers']['w1']['state'] == 'succeeded'
        assert sorted(stack.lines('ran-w1.txt')) == sorted(runs)    # the real w1 kept working
        received = []
        while thief.poll(1000):
            received.append(thief.recv_multipart())
        assert received == [], f'the thief received {received[:2]}'
    finally:
        thief.close()
        ctx.term()


@pytest.mark.parametrize('flag, addr', [('--pub', 'tcp://0.0.0.0:{port}'), ('--router', 'tcp://*:{port}'),
                                        ('--pub', 'tcp://10.9.8.7:{port}')])
def test_the_broker_refuses_plain_zeromq_beyond_loopback(tmp_path, flag, addr):
    """Before: calls readable and results forgeable by anyone who reached the port."""
    jobs = tmp_path / 'jobs.yaml'
    jobs.write_text('quick:\n  command: "true"\n')
    got = subprocess.run([sys.executable, os.path.join(ROOT, 'broker.py'), '--jobs', str(jobs),
                          '--home', str(tmp_path / 'home'), flag, addr.format(port=free_port())],
                         capture_output=True, text=True, timeout=20)
    assert got.returncode == 2 and 'needs CURVE' in got.stderr and '--insecure' in got.stderr, got.stderr


@pytest.mark.parametrize('addr, loopback', [('tcp://127.0.0.1:1', True), ('tcp://127.9.9.9:1', True),
                                            ('tcp://localhost:1', True), ('tcp://[::1]:1', True),
                                            ('ipc:///run/x', True), ('tcp://0.0.0.0:1', False),
                                            ('tcp://*:1', False), ('tcp://eth0:1', False),
                                            ('tcp://front.example:1', False), ('tcp://[::]:1', False)])
def test_what_counts_as_loopback(addr, loopback):
    assert is_loopback(addr) is loopback
