"""Stacks for the tests and the benchmarks, and what both do with them.

A LocalStack runs the real processes on free loopback ports, with its job file, state and logs
in one folder of its own. Around it: waiting on a condition with a deadline, HTTP in one call,
triggers fired from a thread, and the final state of every run on every worker.
"""
import collections
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request

from .protocol import FINAL_STATES, RUN_ENDED
from .stack import Stack


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all bound at once, then released).

    Drawn below the kernel's range for outgoing connections (ip_local_port_range, 32768 and up
    here): a port from that range can be taken by any client's connection (to PostgreSQL, say)
    between our check and the server's bind."""
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            try:
                socks.append(socket.create_server(('127.0.0.1', random.randrange(20000, 32000))))
            except OSError:
                continue    # taken: draw again
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def free_run(n: int) -> int:
    """A free loopback port P with P+1 .. P+n-1 free too (a stack's ports follow its HTTP port)."""
    while True:
        socks: list[socket.socket] = []
        start = random.randrange(20000, 32000 - n)
        try:
            for port in range(start, start + n):
                socks.append(socket.create_server(('127.0.0.1', port)))
            return start
        except OSError:
            continue    # one of them is taken: draw again
        finally:
            for s in socks:
                s.close()


class TimedOut(AssertionError):
    """A condition did not come true in time (an AssertionError: a test that waited fails)."""


def wait_for(condition, timeout: float = 15.0, what: str = 'condition', interval: float = 0.02, procs=()):
    """Poll `condition` until it returns something truthy and return that; give up after `timeout`
    seconds, or at once when one of `procs` (processes it needs) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if any(proc.poll() is not None for proc in procs):
            raise TimedOut(f'{what}: a process it needs exited (see its log)')
        if time.monotonic() > deadline:
            raise TimedOut(f'timed out after {timeout:g}s waiting for {what}')
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


class LocalStack(Stack):
    """A Stack in `folder`: its job file (`{out}` in it: folder/out), state in home/, logs in logs/."""

    def __init__(self, folder: str, jobs_yaml: str, **kw):
        self.out = os.path.join(folder, 'out')
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(folder, 'jobs', 'jobs.yaml')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(jobs_yaml.replace('{out}', self.out))
        port, pub, router = free_ports(3)
        kw.setdefault('log_dir', os.path.join(folder, 'logs'))
        super().__init__(os.path.join(folder, 'home'), [path], port=port, ports={'pub': pub, 'router': router}, **kw)

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

    def wait_run(self, run_id: str, states=RUN_ENDED, timeout: float = 15.0) -> dict:
        def reached():
            try:
                code, status = self.get('/job_status?run_id=' + run_id)
            except OSError:    # a request on its way when the broker went (a restart): ask again
                return None
            if code == 503:    # a restarted broker standing by until its old lease runs out (PostgreSQL)
                return None
            assert code == 200, status
            return status if status['state'] in states else None
        return wait_for(reached, timeout, f'run {run_id} to reach {states}')

    def runs(self, job: str) -> list:
        return self.get(f'/runs?job={job}&limit=1000')[1]['runs']

    def lines(self, name: str) -> list[str]:
        """The lines of out/NAME (commands write there), [] while it does not exist."""
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


class TwoFronts:
    """Two front ends (Mongrel2 and broker each) on one PostgreSQL journal: a starts first and is
    active, b stands by. Workers and semaphores, connected to both, live in a's folder."""

    def __init__(self, folder: str, jobs_yaml: str, journal: str, stack=LocalStack):
        self.a = stack(os.path.join(folder, 'a'), jobs_yaml)
        self.b = stack(os.path.join(folder, 'b'), jobs_yaml)
        for s in (self.a, self.b):
            s.journal = journal
            s.broker_args = ['--front-url', s.url, '--worker-timeout', '5']
        links = ['--pub', f"{self.a.addr('pub')},{self.b.addr('pub')}",
                 '--router', f"{self.a.addr('router')},{self.b.addr('router')}", '--url', f'{self.a.url},{self.b.url}']
        self.a.links = lambda: links

    def start(self, workers=('w1', 'w2'), semaphore: bool = True) -> None:
        self.a.start(workers, semaphore)    # a's broker comes first: it takes the lease
        self.start_front(self.b, active=self.a)

    @staticmethod
    def start_front(stack: LocalStack, active: LocalStack) -> None:
        """Start a front end (again) and wait until it stands by, naming `active`."""
        stack.start_broker()
        stack.start_mongrel2()
        last = {}

        def stands_by() -> bool:
            last['answer'] = http_or_down(stack.url + '/health')
            return last['answer'] == (503, standing_by(active.url))
        try:
            wait_for(stands_by, 15, f'{stack.url} standing by')
        except TimedOut as e:    # say what it answered instead, and what its processes logged
            raise TimedOut(f"{e}; it answered {last.get('answer')}\n{stack.logs()}") from None

    def stop(self) -> None:
        self.a.stop_all()
        self.b.stop_all()


def standing_by(active: str) -> dict:
    """What a standby answers every request (with 503)."""
    return {'error': 'this front end is standing by; ask the active one', 'active': active}


def http_or_down(url: str, timeout: float = 10.0) -> tuple:
    """(status, JSON body) of a GET, or ('down', None) when nothing answers."""
    try:
        return http(url, timeout=timeout)
    except OSError:
        return 'down', None


class Triggers(threading.Thread):
    """Fires triggers from a thread, `rate` a second (0: each as soon as the last is answered).

    Keeps the run ids accepted (HTTP 200) and counts the others by status or error name:
    what was refused was never promised."""

    def __init__(self, url: str, queries, rate: float = 0.0, timeout: float = 15.0):
        super().__init__(daemon=True)
        self.url, self.queries, self.rate, self.timeout = url, queries, rate, timeout
        self.accepted: list[str] = []
        self.refused: collections.Counter = collections.Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        for query in self.queries:
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return
            if self.rate:
                due = max(due, time.monotonic()) + 1 / self.rate    # after a stall, no catch-up burst
            try:
                status, body = http(f'{self.url}/job_start?{query}', timeout=self.timeout)
            except OSError as e:
                status, body = type(getattr(e, 'reason', e)).__name__, None
            if status == 200:
                self.accepted.append(body['run_id'])
            else:
                self.refused[status] += 1

    def wait_accepted(self, k: int, timeout: float = 30.0) -> None:
        wait_for(lambda: len(self.accepted) >= k or not self.is_alive(), timeout, f'{k} accepted triggers')

    def finish(self, timeout: float = 120.0) -> list[str]:
        self.join(timeout)
        assert not self.is_alive(), 'trigger thread did not finish'
        return self.accepted


def final_states(url: str, run_ids, workers, timeout: float) -> dict[tuple[str, str], str | None]:
    """{(run_id, worker): state} once every run is final on every worker, or what is known when time
    runs out (None: that worker has no state for that run)."""
    states, waiting = {}, set(run_ids)
    deadline = time.monotonic() + timeout
    while waiting:
        for run_id in sorted(waiting):
            try:
                _, status = http(f'{url}/job_status?run_id={run_id}', timeout=10.0)
            except OSError:
                status = None
            found = status.get('workers', {}) if isinstance(status, dict) else {}
            for w in workers:
                states[run_id, w] = found.get(w, {}).get('state')
            if all(states[run_id, w] in FINAL_STATES for w in workers):
                waiting.discard(run_id)
        if not waiting or time.monotonic() > deadline:
            return states
        time.sleep(0.2)
    return states
