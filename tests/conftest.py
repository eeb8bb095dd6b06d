"""Shared test helpers: free loopback ports, a real stack per test or module, HTTP, waiting."""
import json
import os
import socket
import sys
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
        ports = {k: free_port() for k in ('pub', 'router', 'm2_recv', 'm2_send')}
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
