"""The front end under attack: idle and unfinished connections, held waits, the handler sockets,
other sites' pages and rebound names, requests framed two ways. Real Mongrel2, real broker."""
import os
import resource
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import ROOT, free_port, http, wait_for
from jobz import ca

JOBS = """
quick:
  command: "echo %(run_id)s >> {out}/quick.txt"
block:
  command: "while [ ! -e {out}/go ]; do sleep 0.05; done"
"""
MIN_PING = 4    # Mongrel2's limits.min_ping in these tests (mongrel2.conf has 10): the same rule, sooner


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('pki'))
    ca.main(['--dir', root, 'init'])
    ca.main(['--dir', root, 'server', 'jobz-tls', '--host', '127.0.0.1'])
    ca.main(['--dir', root, 'client', 'alice'])
    return root


@pytest.fixture(scope='module')
def stack(tmp_path_factory, pki):
    from conftest import TestStack
    root = tmp_path_factory.mktemp('front')
    with open(os.path.join(ROOT, 'mongrel2.conf')) as f:
        conf = f.read()
    assert "'limits.min_ping': 10," in conf    # what ships: idle connections go within seconds
    quick_conf = root / 'mongrel2.conf'
    quick_conf.write_text(conf.replace("'limits.min_ping': 10,", f"'limits.min_ping': {MIN_PING},"))
    s = TestStack(str(root), JOBS, mongrel2_conf=str(quick_conf), tls=pki, tls_port=free_port())
    try:
        s.start(['w1'])
        yield s
    finally:
        with open(os.path.join(s.out, 'go'), 'w'):
            pass    # any `block` run still going ends, so its worker stops warm
        s.stop_all()


@pytest.fixture(autouse=True)
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 20000), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def tls_get(stack, pki: str, path: str, timeout: float) -> int:
    ctx = ssl.create_default_context(cafile=f'{pki}/ca.crt')
    ctx.load_cert_chain(f'{pki}/clients/alice.crt', f'{pki}/clients/alice.key')
    import urllib.request
    with urllib.request.urlopen(stack.tls_url + path, timeout=timeout, context=ctx) as r:
        return r.status


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b''
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def metric(stack, name: str) -> float:
    _, text = stack.get('/metrics')
    for line in text.decode().splitlines():
        if line.startswith(name + ' '):
            return float(line.split()[1])
    raise AssertionError(f'{name} not in /metrics')


# -- 4. idle and unfinished connections ------------------------------------------------

def test_thousands_of_idle_connections_do_not_keep_real_clients_out(stack, pki):
    idle = []
    try:
        for k in range(2000):    # 1,500 on the plain port, 500 TLS connections that never shake hands
            port = stack.port if k < 1500 else stack.tls_port
            idle.append(socket.create_connection(('127.0.0.1', port), timeout=5))
        unfinished = idle[0]
        unfinished.sendall(b'GET /health HTTP/1.1\r\nHost: local')    # a request that never ends
        started = time.monotonic()
        while time.monotonic() - started < 3:
            # Each real request is answered within a second while they all sit there.
            assert http(stack.url + '/health', timeout=1.0)[0] == 200
            assert tls_get(stack, pki, '/health', timeout=1.0) == 200
        # Then Mongrel2 closes them, the unfinished one included: nobody holds them for long.
        # (Mongrel2 closes them a few at a time, each tick of limits.tick_timer.)
        deadline = time.monotonic() + 4 * MIN_PING + 5
        for sock in idle:
            assert closed_by_server(sock, max(0.1, deadline - time.monotonic())), \
                f'an idle connection was still open {4 * MIN_PING + 5} s later'
    finally:
        for sock in idle:
            sock.close()


def test_a_held_wait_outlives_min_ping_and_ends_with_its_run(stack):
    answer = []
    waiter = threading.Thread(target=lambda: answer.append(
        http(stack.url + '/job_start?job_name=block&wait=60', timeout=60)))
    waiter.start()
    try:
        wait_for(lambda: metric(stack, 'jobz_http_waiting') == 1, what='the wait to be held')
        # An idle connection made now is closed by min_ping, twice over: the held one stays.
        for _ in range(2):
            with socket.create_connection(('127.0.0.1', stack.port), timeout=5) as idle:
                assert closed_by_server(idle, MIN_PING + 8)
        assert waiter.is_alive(), f'the held request ended before its run: {answer}'
    finally:
        with open(os.path.join(stack.out, 'go'), 'w'):
            pass
        waiter.join(30)
        os.unlink(os.path.join(stack.out, 'go'))
    status, body = answer[0]
    assert status == 200 and body['state'] == 'succeeded'


# -- 5. held waits are freed when their client goes ------------------------------------

def hold_wait(stack, job: str = 'block') -> socket.socket:
    sock = socket.create_connection(('127.0.0.1', stack.port), timeout=5)
    sock.sendall(f'GET /job_start?job_name={job}&wait=3600 HTTP/1.1\r\nHost: localhost\r\n\r\n'.encode())
    return sock


def test_waits_of_clients_that_left_are_freed_and_one_client_cannot_take_them_all(stack):
    socks = [hold_wait(stack) for _ in range(100)]
    try:
        wait_for(lambda: metric(stack, 'jobz_http_waiting') == 100, what='100 held waits')
        # One client (here plain:127.0.0.1) holds at most 100: the next one is told at once.
        status, body = http(stack.url + '/job_start?job_name=block&wait=3600', timeout=5)
        assert status == 503 and 'requests waiting already' in body['error']
    finally:
        for sock in socks:
            sock.close()
    # Mongrel2 tells the broker each client went; their places are free again.
    wait_for(lambda: metric(stack, 'jobz_http_waiting') == 0, timeout=10, what='the waits to be freed')
    status, body = http(stack.url + '/job_start?job_name=block&wait=0.5', timeout=30)
    assert status == 504 and body['state'] in ('pending', 'running')    # held again, not refused
    with open(os.path.join(stack.out, 'go'), 'w'):
        pass    # let the block runs end
    wait_for(lambda: not [r for r in stack.runs('block') if r['state'] != 'succeeded'], what='block runs to end')
    os.unlink(os.path.join(stack.out, 'go'))


# -- 8. the handler sockets are for Mongrel2 and the broker only ------------------------

def test_another_local_user_cannot_reach_the_handler_sockets(stack):
    path = stack.addr('m2_recv')[len('ipc://'):]
    assert os.path.exists(path)
    probe = ('import socket, sys\n'
             's = socket.socket(socket.AF_UNIX)\n'
             'try:\n'
             '    s.connect(sys.argv[1])\n'
             'except PermissionError:\n'
             '    print("refused")\n'
             'else:\n'
             '    print("connected")\n')
    # `daemon` (uid 1): a local account that is neither Mongrel2's (nobody here) nor the broker's.
    got = subprocess.run(['runuser', '-u', 'daemon', '--', '/usr/bin/python3', '-c', probe, path],
                         capture_output=True, text=True, timeout=30)
    assert got.stdout.strip() == 'refused', got.stdout + got.stderr
    # And no handler socket listens on TCP any more, where every local user could connect.
    listening = subprocess.run(['ss', '-Hltnp'], capture_output=True, text=True, timeout=10).stdout
    mongrel2_pids = {str(p.pid) for n, p in stack.procs.items() if n.startswith('mongrel2')}
    ports = {line.split()[3].rsplit(':', 1)[1] for line in listening.splitlines()
             if any(f'pid={pid},' in line for pid in mongrel2_pids)}
    assert ports == {str(stack.port), str(stack.tls_port)}, listening


# -- 9. other sites' pages and rebound host names --------------------------------------

@pytest.mark.parametrize('headers', [
    {'Origin': 'http://attacker.example'},
    {'Sec-Fetch-Site': 'cross-site'},
    {'Origin': 'null'},
])
def test_a_page_on_another_site_cannot_start_jobs_or_add_notes(stack, headers):
    before = len(stack.runs('quick'))
    status, body = http(stack.url + '/job_start?job_name=quick', headers=headers)
    assert status == 403 and 'another site' in body['error']
    form = b'job_name=quick'
    status, _ = http(stack.url + '/job_start', method='POST', data=form,
                     headers={**headers, 'Content-Type': 'application/x-www-form-urlencoded'})
    assert status == 403
    run_id = stack.start_job('job_name=quick')['run_id']
    status, _ = http(stack.url + f'/job_note?run_id={run_id}&note=hi', headers=headers)
    assert status == 403
    assert len(stack.runs('quick')) == before + 1    # only our own trigger


def test_our_own_page_may_still_start_jobs(stack):
    port = stack.port
    status, body = http(stack.url + '/job_start?job_name=quick',
                        headers={'Origin': f'http://127.0.0.1:{port}', 'Sec-Fetch-Site': 'same-origin'})
    assert status == 200, body


def test_a_rebound_host_name_is_not_served(stack):
    # A page at attacker.example whose name now points at us sends its own name as Host.
    for path in ('/runs', '/job_output?run_id=x', '/health'):
        status, body = http(stack.url + path, headers={'Host': f'attacker.example:{stack.port}'})
        assert status == 403 and 'not served here' in body['error']
    assert http(stack.url + '/runs', headers={'Host': f'localhost:{stack.port}'})[0] == 200


# -- 12. requests framed in two ways ----------------------------------------------------

def raw_request(stack, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(('127.0.0.1', stack.port), timeout=5) as sock:
        sock.sendall(data)
        head = b''
        while b'\r\n\r\n' not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b' ', 2)[1]), head


@pytest.mark.parametrize('headers', [
    b'Content-Length: 14\r\nContent-Length: 0\r\n',
    b'Content-Length: 14\r\nTransfer-Encoding: chunked\r\n',
    b'Content-Length: -14\r\n',
    b'Content-Length: 99999999999999999999\r\n',
])
def test_a_request_framed_two_ways_starts_nothing(stack, headers):
    before = len(stack.runs('quick'))
    status, _ = raw_request(stack, b'POST /job_start HTTP/1.1\r\nHost: localhost\r\n'
                                   b'Content-Type: application/x-www-form-urlencoded\r\n' + headers +
                            b'\r\njob_name=quick')
    assert status == 400
    # The broker takes requests in order: once this one is answered, that one was handled.
    assert http(stack.url + '/health')[0] == 200
    assert len(stack.runs('quick')) == before


def test_a_request_with_method_json_is_answered(stack):
    started = time.monotonic()
    status, _ = raw_request(stack, b'JSON /job_start?job_name=quick HTTP/1.1\r\nHost: localhost\r\n\r\n')
    assert status == 405 and time.monotonic() - started < 5
