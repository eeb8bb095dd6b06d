"""Shared test helpers: free loopback ports, a real stack per test or module, HTTP, waiting."""
import collections
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jobz.stack import Stack  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 15.0, what: str = 'condition', interval: float = 0.02):
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)


def http(url: str, method: str = 'GET', data: bytes | None = None, headers=None, timeout: float = 30.0):
    """(status, parsed JSON body or raw bytes) for one request."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers.get('Content-Type')
    except urllib.error.HTTPError as e:
        status, body, ctype = e.code, e.read(), e.headers.get('Content-Type')
    if ctype == 'application/json' and body:
        return status, json.loads(body)
    return status, body


class TestStack(Stack):
    """A Stack on free ports in a temp folder, with helpers for tests."""
    __test__ = False

    def __init__(self, root, jobs_yaml: str, **kw):
        os.makedirs(os.path.join(root, 'jobs'), exist_ok=True)
        self.out = os.path.join(root, 'out')
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(root, 'jobs', 'jobs.yaml')
        with open(path, 'w') as f:
            f.write(jobs_yaml.replace('{out}', self.out))
        ports = {k: free_port() for k in ('pub', 'router', 'm2_recv', 'm2_send', 'm2_tls_recv', 'm2_tls_send')}
        super().__init__(os.path.join(root, 'home'), [path], port=free_port(), ports=ports,
                         log_dir=os.path.join(root, 'logs'), **kw)

    def get(self, path: str, **kw):
        return http(self.url + path, **kw)

    def start_job(self, query: str) -> dict:
        status, body = self.get('/job_start?' + query)
        assert status == 200, body
        return body

    def status(self, run_id: str) -> dict:
        status, body = self.get('/job_status?run_id=' + run_id)
        assert status == 200, body
        return body

    def wait_run(self, run_id: str, states=('succeeded', 'failed'), timeout: float = 15.0) -> dict:
        return wait_for(lambda: (lambda s: s if s['state'] in states else None)(self.status(run_id)),
                        timeout, f'run {run_id} to reach {states}')

    def runs(self, job: str) -> list:
        return self.get(f'/runs?job={job}&limit=1000')[1]['runs']

    def lines(self, name: str) -> list[str]:
        try:
            with open(os.path.join(self.out, name)) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            with open(os.path.join(self.log_dir, name), errors='replace') as f:
                out.append(f'--- {name}\n' + f.read()[-4000:])
        return '\n'.join(out)


@pytest.fixture
def make_stack(tmp_path):
    """Build and start stacks for one test; every process is stopped afterwards, pass or fail."""
    stacks = []

    def make(jobs_yaml: str, workers=('w1',), semaphore: bool = True, start: bool = True, **kw):
        stack = TestStack(str(tmp_path / f's{len(stacks)}'), jobs_yaml, **kw)
        stacks.append(stack)
        if start:
            stack.start(workers, semaphore)
        return stack

    yield make
    for stack in stacks:
        stack.stop_all()


# -- fault injection -----------------------------------------------------------
FINAL = ('succeeded', 'failed', 'interrupted', 'expired')


class Triggers(threading.Thread):
    """Fires `n` triggers of `query` from a thread; keeps the run ids that were accepted (HTTP 200)."""

    def __init__(self, stack, query, n: int = 0, pace: float = 0.0, timeout: float = 15.0):
        """`query` is one query string sent `n` times, or a list of query strings sent once each."""
        super().__init__(daemon=True)
        queries = [query] * n if isinstance(query, str) else list(query)
        self.urls = [f'{stack.url}/job_start?{q}' for q in queries]
        self.pace, self.timeout = pace, timeout
        self.accepted: list[str] = []
        self.refused = 0       # errors and non-200 answers: not accepted, so not promised
        self.stop = threading.Event()

    def run(self) -> None:
        for url in self.urls:
            if self.stop.is_set():
                return
            try:
                status, body = http(url, timeout=self.timeout)
            except OSError:
                status, body = None, None
            if status == 200:
                self.accepted.append(body['run_id'])
            else:
                self.refused += 1
            if self.pace:
                time.sleep(self.pace)

    def wait_accepted(self, k: int, timeout: float = 30.0) -> None:
        wait_for(lambda: len(self.accepted) >= k or not self.is_alive(), timeout, f'{k} accepted triggers')

    def finish(self, timeout: float = 120.0) -> list[str]:
        self.join(timeout)
        assert not self.is_alive(), 'trigger thread did not finish'
        return self.accepted


def final_states(stack, job: str, run_ids, workers, timeout: float = 60.0) -> dict:
    """Wait until every run has a final state on every worker; return {(run_id, worker): state}."""
    wanted = set(run_ids)

    def collect():
        runs = {r['run_id']: r['workers'] for r in stack.runs(job) if r['run_id'] in wanted}
        states = {(r, w): runs.get(r, {}).get(w) for r in wanted for w in workers}
        return states if all(s in FINAL for s in states.values()) else None
    return wait_for(collect, timeout, f'{len(wanted)} runs of {job} to end on {", ".join(workers)}', 0.2)


def assert_each_ran_once(stack, job: str, run_ids, workers=('w1',), timeout: float = 60.0) -> collections.Counter:
    """Every run ended on every worker, and its command ran exactly once there (never twice).

    The job's command appends its run id to ran-<worker>.txt. An `interrupted` run may have
    started once; an `expired` run never started. Returns how many runs ended in which state."""
    states = final_states(stack, job, run_ids, workers, timeout)
    ran = {w: collections.Counter(stack.lines(f'ran-{w}.txt')) for w in workers}
    for (run_id, worker), state in states.items():
        n = ran[worker][run_id]
        allowed = {'succeeded': (1,), 'interrupted': (0, 1), 'expired': (0,)}.get(state)
        assert allowed is not None, f'run {run_id} {state} on {worker}'
        assert n in allowed, f'run {run_id} ({state}) ran {n} times on {worker}'
    twice = [r for w in workers for r, n in ran[w].items() if n > 1]
    assert not twice, f'ran more than once: {twice[:5]}'
    return collections.Counter(states.values())
