"""The worker-side link to the broker: handler calls, acknowledgements, STARTED, split semaphores."""
import http.server
import os
import sqlite3
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, free_port, wait_for
from jobz.handlers import fetch


class CountingServer(http.server.ThreadingHTTPServer):
    """A real HTTP/1.1 server on loopback that remembers each connection it accepted."""
    daemon_threads = True

    def __init__(self):
        self.connections = []
        self.silent = False                  # True: requests get no answer (a host gone silent) ...
        self.release = threading.Event()     # ... until this is set

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'    # keep-alive unless told otherwise

            def setup(handler):
                super().setup()
                self.connections.append(handler.connection)

            def do_GET(handler):
                if self.silent:
                    self.release.wait(10)
                body = b'{}'
                handler.send_response(404 if handler.path.startswith('/missing') else 200)
                handler.send_header('Content-Length', str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass
        super().__init__(('127.0.0.1', 0), Handler)


@pytest.fixture
def server():
    srv = CountingServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def call_in_thread(fn):
    """Run fn in a new thread (so it starts with no kept connections) and return its result."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


def test_handler_calls_from_one_thread_share_a_connection(server):
    base = f'http://127.0.0.1:{server.server_address[1]}'
    statuses = call_in_thread(lambda: [fetch(f'{base}/job_start?n={i}') for i in range(5)] + [fetch(f'{base}/missing')])
    assert statuses == [200] * 5 + [404]
    assert len(server.connections) == 1


def test_a_connection_the_server_closed_is_replaced(server):
    base = f'http://127.0.0.1:{server.server_address[1]}'

    def calls():
        first = fetch(f'{base}/a')
        wait_for(lambda: server.connections, what='the connection')
        server.connections[0].shutdown(2)    # the server drops the idle keep-alive connection
        return first, fetch(f'{base}/b')
    assert call_in_thread(calls) == (200, 200)
    assert len(server.connections) == 2


def test_a_kept_connection_gone_silent_costs_one_timeout_and_no_new_connection(server):
    """A front-end host that died keeps its connections open but silent: the call gives up after the
    read timeout (and the caller asks the next front end) instead of waiting again on a new one."""
    base = f'http://127.0.0.1:{server.server_address[1]}'

    def calls():
        first = fetch(f'{base}/a', timeout=0.5)
        server.silent = True
        with pytest.raises(OSError, match='TimeoutError'):
            fetch(f'{base}/b', timeout=0.5)
        return first
    assert call_in_thread(calls) == 200
    assert len(server.connections) == 1


def test_a_handler_call_goes_out_with_the_commit_that_recorded_it(server, tmp_path):
    """Not at the next clock tick, after the turn's spawns: a fan-in's last hop waited for those."""
    import zmq
    from jobz.agent import Agent
    ctx = zmq.Context()
    agent = Agent(ctx, 'w1', ['t'], pub=f'tcp://127.0.0.1:{free_port()}', router=f'tcp://127.0.0.1:{free_port()}',
                  db_path=str(tmp_path / 'worker.db'))
    try:
        agent.handlers.add([f'http://127.0.0.1:{server.server_address[1]}/job_start?job_name=next'])
        assert not server.connections    # recorded, not yet durable: nothing went out
        agent.commit()                   # no tick() anywhere in this test
        wait_for(lambda: server.connections, 5, 'the handler call')
        wait_for(lambda: agent.handlers.done.qsize() == 1, 5, 'the call to end')
    finally:
        agent.close()
        ctx.destroy(0)


def test_unreachable_front_end_is_an_os_error():
    with pytest.raises(OSError):
        fetch(f'http://127.0.0.1:{free_port()}/x')    # nothing listens there


JOBS = '''
quick:
  command: "true"
slow:
  command: "sleep 1.5"
chatty:
  command: "echo out; echo err >&2; head -c 10000 /dev/zero | tr '\\\\0' x; echo; echo last line"
leaves_one_behind:
  command: "(sleep 0.5; echo late; echo survived > {out}/straggler.txt) & echo started"
feed_a:
  command: "true"
  on_success: "/job_start?job_name=gate_a&day=%(day)s"
feed_b:
  command: "true"
  on_success: "/job_start?job_name=gate_b&day=%(day)s"
gate_a:
  semaphore: {count: 2, key: day}
gate_b:
  semaphore: {count: 2, key: day}
'''


def test_results_are_acknowledged_and_leave_the_outbox(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'quick'])], semaphore=False)
    runs = [stack.start_job('job_name=quick')['run_id'] for _ in range(30)]
    for run_id in runs:
        assert stack.wait_run(run_id)['state'] == 'succeeded'
    db = sqlite3.connect(f"file:{os.path.join(stack.home, 'worker-w1.db')}?mode=ro", uri=True)
    try:
        # ACKs come in batches ({"run_ids": [...]}); each acknowledged result leaves the outbox.
        wait_for(lambda: db.execute('SELECT count(*) FROM outbox').fetchone()[0] == 0, 10, 'an empty outbox')
    finally:
        db.close()


def test_a_long_job_is_shown_running_while_it_runs(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'slow'])], semaphore=False)
    run_id = stack.start_job('job_name=slow')['run_id']
    running = stack.wait_run(run_id, states=('running',), timeout=1.2)
    assert running['workers']['w1']['started'] is not None
    assert stack.wait_run(run_id)['state'] == 'succeeded'


def test_semaphores_can_share_the_gates_out_by_topic(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'feed_a,feed_b'])], semaphore=False, start=False)
    stack.start_broker()
    stack.start_worker('w1', '--topics', 'feed_a,feed_b')
    stack.start_semaphore('sa', '--topics', 'gate_a')
    stack.start_semaphore('sb', '--topics', 'gate_b')
    stack.start_mongrel2()
    stack.wait_healthy(30, workers=3)

    def arrivals(feeder: str) -> list[str]:
        runs = [stack.start_job(f'job_name={feeder}&day=d1')['run_id'] for _ in range(2)]
        return [wait_for(lambda r=r: stack.wait_run(r)['children'], what='the arrival')[0] for r in runs]
    a, b = arrivals('feed_a'), arrivals('feed_b')
    for run_id in a:
        assert list(stack.wait_run(run_id)['workers']) == ['sa']
    for run_id in b:
        assert list(stack.wait_run(run_id)['workers']) == ['sb']
    assert any(stack.status(r)['workers']['sa']['output_tail'].endswith('released') for r in a)


def test_semaphore_refuses_a_topic_no_semaphore_job_has(tmp_path):
    jobs = tmp_path / 'jobs.yaml'
    jobs.write_text(JOBS)
    got = subprocess.run([sys.executable, os.path.join(ROOT, 'semaphore.py'), '--jobs', str(jobs),
                          '--home', str(tmp_path), '--topics', 'gate_a,quick'],
                         capture_output=True, text=True, timeout=30)
    assert got.returncode != 0
    assert "no semaphore job has topic quick" in got.stderr


def test_output_tail_keeps_the_last_bytes_of_stdout_and_stderr(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'chatty,quick', '--output-tail', '100'])], semaphore=False)
    result = stack.wait_run(stack.start_job('job_name=chatty')['run_id'])['workers']['w1']
    assert result['state'] == 'succeeded'
    assert len(result['output_tail'].encode()) == 100
    assert result['output_tail'].endswith('x\nlast line\n')
    short = stack.wait_run(stack.start_job('job_name=quick')['run_id'])['workers']['w1']
    assert short['output_tail'] == ''


def test_stderr_is_in_the_output_too(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'chatty', '--output-tail', '20000'])], semaphore=False)
    tail = stack.wait_run(stack.start_job('job_name=chatty')['run_id'])['workers']['w1']['output_tail']
    assert tail.startswith('out\nerr\nxxx') and tail.endswith('\nlast line\n')
    assert len(tail) == len('out\nerr\n') + 10000 + len('\nlast line\n')


def test_a_process_the_command_left_running_is_not_waited_for_nor_cut_off(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'leaves_one_behind'])], semaphore=False)
    run = stack.wait_run(stack.start_job('job_name=leaves_one_behind')['run_id'])
    result = run['workers']['w1']
    assert result['state'] == 'succeeded' and result['output_tail'] == 'started\n'
    assert result['finished'] - result['started'] < 0.4    # reported when the command ended
    # The straggler still writes to the pipe after that; the worker reads and drops it (no SIGPIPE).
    wait_for(lambda: stack.lines('straggler.txt') == ['survived'], 10, 'the straggler to finish')


def test_log_level_warning_leaves_out_the_line_per_run(make_stack):
    stack = make_stack(JOBS, workers=[('w1', ['--topics', 'quick', '--log-level', 'warning']),
                                      ('w2', ['--topics', 'quick'])], semaphore=False)
    run_id = stack.start_job('job_name=quick')['run_id']
    assert stack.wait_run(run_id)['state'] == 'succeeded'

    def logged(name: str) -> bool:
        with open(os.path.join(stack.log_dir, f'{name}.log')) as f:
            return f'run {run_id}: quick succeeded' in f.read()
    wait_for(lambda: logged('w2'), 5, "w2's line for the run")
    assert not logged('w1')


def test_a_bad_log_level_in_the_environment_is_refused(tmp_path):
    got = subprocess.run([sys.executable, os.path.join(ROOT, 'worker.py'), '--help'], capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, JOBZ_LOG_LEVEL='loud'))
    assert got.returncode == 2
    assert "JOBZ_LOG_LEVEL='loud': choose from debug, info, warning, error" in got.stderr
