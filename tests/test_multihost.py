"""A worker on another host: its own network namespace, reaching the broker over a veth link."""
import os
import random
import subprocess

import pytest

from conftest import TestStack, wait_for

pytestmark = pytest.mark.slow    # hosts in network namespaces: `pytest -m 'not slow'` skips them

JOBS = """
where:
  command: "ip -4 -o addr show > {out}/where-%(tag)s.txt"
  on_success: "/job_start?job_name=after&tag=%(tag)s"
after:
  command: "echo after %(tag)s >> {out}/after.txt"
"""


def ip(*args: str) -> None:
    subprocess.run(['ip', *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def remote_host():
    """A namespace `host` with address .2 linked to .1 on our side; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip('network namespaces need root')
    tag = f'{os.getpid() % 10000}{random.randrange(100)}'
    ns, here, there = f'jobz-t{tag}', f'jzh{tag}', f'jzn{tag}'
    net = f'10.231.{random.randrange(1, 250)}'
    ip('netns', 'add', ns)
    try:
        ip('link', 'add', here, 'type', 'veth', 'peer', 'name', there)
        ip('link', 'set', there, 'netns', ns)
        ip('addr', 'add', f'{net}.1/30', 'dev', here)
        ip('link', 'set', here, 'up')
        ip('-n', ns, 'addr', 'add', f'{net}.2/30', 'dev', there)
        ip('-n', ns, 'link', 'set', there, 'up')
        ip('-n', ns, 'link', 'set', 'lo', 'up')
        yield ns, f'{net}.1', f'{net}.2'
    finally:
        subprocess.run(['ip', 'link', 'del', here], capture_output=True, timeout=10)
        ip('netns', 'del', ns)


def test_worker_in_another_namespace_runs_jobs_and_chains(make_stack, remote_host):
    ns, broker_addr, worker_addr = remote_host
    stack = make_stack(JOBS, start=False, bind=broker_addr)
    stack.broker_args = ['--insecure']    # plain ZeroMQ beyond loopback: a test network of our own
    stack.start_broker()
    stack.start_mongrel2()
    # The worker connects out from its own host; it listens on nothing there.
    stack.spawn('remote', ['ip', 'netns', 'exec', ns] + stack.script('worker.py') + [
        '--name', 'remote', '--jobs', *stack.jobs, '--home', os.path.join(stack.home, 'remote'),
        *stack.links()])
    stack.wait_healthy(30, workers=1)
    run = stack.start_job('job_name=where&tag=far')
    assert run['workers'] == ['remote']
    assert stack.wait_run(run['run_id'])['state'] == 'succeeded'
    assert any(worker_addr in line for line in stack.lines('where-far.txt'))
    assert wait_for(lambda: stack.lines('after.txt')) == ['after far']
    listening = subprocess.run(['ip', 'netns', 'exec', ns, 'ss', '-Htln'], capture_output=True,
                               text=True, timeout=10).stdout
    assert listening.strip() == ''
