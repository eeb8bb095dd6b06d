"""Shared test fixtures: a real stack per test or module (jobz.harness), and fault-injection checks."""
import collections
import contextlib
import os
import signal
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jobz import protocol as p  # noqa: E402
from jobz.harness import LocalStack, Triggers, final_states, free_port, http, wait_for  # noqa: E402,F401
from jobz.postgres import Cluster  # noqa: E402


class TestStack(LocalStack):
    __test__ = False    # a stack, not a test class


@contextlib.contextmanager
def started(stack, workers=('w1',), semaphore: bool = True):
    """The stack, started with these workers; every process it started is stopped on the way out."""
    try:
        stack.start(workers, semaphore)
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture(scope='session')
def postgres():
    """A throwaway PostgreSQL cluster for the whole session (jobz/postgres.py), removed at the end."""
    cluster = Cluster().start()
    yield cluster
    cluster.remove()


def pytest_generate_tests(metafunc):
    """A test marked `both_journals` runs twice: its stacks' broker on SQLite, then on PostgreSQL."""
    if metafunc.definition.get_closest_marker('both_journals'):
        for name in ('make_stack', 'journal_at'):
            if name in metafunc.fixturenames:
                metafunc.parametrize(name, ['sqlite', 'postgresql'], indirect=True)


@pytest.fixture
def journal_at(request, tmp_path):
    """Where a journal of this test lives: a SQLite file, or a new PostgreSQL database."""
    return journal_where(request, str(tmp_path / 'journal.db'))


def journal_where(request, sqlite_path: str) -> str:
    if getattr(request, 'param', 'sqlite') == 'postgresql':
        return request.getfixturevalue('postgres').new_database()
    return sqlite_path


@pytest.fixture
def make_stack(tmp_path, request):
    """Build and start stacks for one test; every process is stopped afterwards, pass or fail."""
    stacks = []

    def make(jobs_yaml: str, workers=('w1',), semaphore: bool = True, start: bool = True, **kw):
        stack = TestStack(str(tmp_path / f's{len(stacks)}'), jobs_yaml, **kw)
        if getattr(request, 'param', 'sqlite') == 'postgresql':
            stack.journal = journal_where(request, '')
        stacks.append(stack)
        if start:
            stack.start(workers, semaphore)
        return stack

    yield make
    for stack in stacks:
        stack.stop_all()


def kill_leftovers(stack) -> None:
    """Commands of a SIGKILLed worker run on as orphans; end their process groups."""
    for name in os.listdir(stack.out):
        if name.startswith('pid-'):
            try:
                os.killpg(int(stack.lines(name)[0]), signal.SIGKILL)
            except (ProcessLookupError, IndexError, ValueError):
                pass


def triggers(stack, query, n: int = 0, pace: float = 0.0, timeout: float = 15.0) -> Triggers:
    """Triggers of `query` n times (or of each query in a list), one every `pace` seconds."""
    queries = [query] * n if isinstance(query, str) else list(query)
    return Triggers(stack.url, queries, rate=1 / pace if pace else 0.0, timeout=timeout)


def assert_each_ran_once(stack, job: str, run_ids, workers=('w1',), timeout: float = 60.0) -> collections.Counter:
    """Every run ended on every worker, and its command ran exactly once there (never twice).

    The job's command appends its run id to ran-<worker>.txt. An `interrupted` run may have
    started once; an `expired` run never started. Returns how many runs ended in which state."""
    states = final_states(stack.url, run_ids, workers, timeout)
    open_ = {k: s for k, s in states.items() if s not in p.FINAL_STATES}
    assert not open_, f'{len(open_)} (run, worker) pairs of {job} not final after {timeout}s: {list(open_.items())[:5]}'
    ran = {w: collections.Counter(stack.lines(f'ran-{w}.txt')) for w in workers}
    for (run_id, worker), state in states.items():
        n = ran[worker][run_id]
        allowed = {p.SUCCEEDED: (1,), p.INTERRUPTED: (0, 1), p.EXPIRED: (0,)}.get(state)
        assert allowed is not None, f'run {run_id} {state} on {worker}'
        assert n in allowed, f'run {run_id} ({state}) ran {n} times on {worker}'
    twice = [r for w in workers for r, n in ran[w].items() if n > 1]
    assert not twice, f'ran more than once: {twice[:5]}'
    return collections.Counter(states.values())
