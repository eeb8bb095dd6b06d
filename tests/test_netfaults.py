"""Network faults between hosts (network namespaces): a link cut with no RST, and workers behind a firewall."""
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import assert_each_ran_once, free_port, triggers, wait_for

pytestmark = pytest.mark.slow    # hosts in network namespaces: `pytest -m 'not slow'` skips them

JOBS = """
count:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  topic: everyone
"""
OUTAGE = 6.0    # seconds the link stays down: past the worker's 3 s heartbeat timeout and the broker's 5 s


def ip(*args: str) -> str:
    return subprocess.run(['ip', *args], check=True, capture_output=True, text=True, timeout=10).stdout


def in_ns(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(['ip', 'netns', 'exec', ns, *argv], capture_output=True, text=True, timeout=15, **kw)


class Net:
    """Namespaces and veth links made for one test; `cleanup` removes them all, newest first."""

    def __init__(self):
        self.tag = f'{os.getpid() % 10000}{random.randrange(100):02d}'
        self.undo: list[list[str]] = []

    def ns(self, suffix: str) -> str:
        name = f'jobz-nf{self.tag}{suffix}'
        ip('netns', 'add', name)
        self.undo.append(['netns', 'del', name])
        ip('-n', name, 'link', 'set', 'lo', 'up')
        return name

    def link(self, suffix: str, ns_a: str | None, addr_a: str, ns_b: str, addr_b: str) -> tuple[str, str]:
        """A veth pair between two namespaces (None: ours), each end addressed and up."""
        dev_a, dev_b = f'jz{self.tag}{suffix}a', f'jz{self.tag}{suffix}b'
        ip('link', 'add', dev_a, *(['netns', ns_a] if ns_a else []), 'type', 'veth',
           'peer', 'name', dev_b, 'netns', ns_b)
        self.undo.append([*(['-n', ns_a] if ns_a else []), 'link', 'del', dev_a])
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            where = ['-n', ns] if ns else []
            ip(*where, 'addr', 'add', addr, 'dev', dev)
            ip(*where, 'link', 'set', dev, 'up')
        return dev_a, dev_b

    def cleanup(self) -> None:
        for args in reversed(self.undo):
            # A link is already gone when its peer's namespace went first: not an error.
            subprocess.run(['ip', *args], capture_output=True, timeout=10)


def free_subnet() -> str:
    """A 10.232.N prefix that no address in our namespace uses (parallel runs pick their own)."""
    used = ip('-4', '-o', 'addr', 'show')
    for _ in range(100):
        prefix = f'10.232.{random.randrange(1, 255)}'
        if f' {prefix}.' not in used:
            return prefix
    raise RuntimeError('no free 10.232.N.0/24 prefix')


@pytest.fixture
def net():
    if os.geteuid() != 0:
        pytest.skip('network namespaces need root')
    missing = [t for t in ('ip', 'nft', 'ss') if shutil.which(t) is None]
    if missing:
        pytest.skip(f'missing tools: {", ".join(missing)}')
    n = Net()
    try:
        yield n
    finally:
        n.cleanup()


def log_of(stack, name: str) -> str:
    with open(os.path.join(stack.log_dir, name + '.log'), errors='replace') as f:
        return f.read()


def worker_argv(stack, name: str, ns: str, broker: str) -> list[str]:
    """A worker in namespace `ns` that reaches the broker and Mongrel2 at `broker` (an IP address)."""
    return ['ip', 'netns', 'exec', ns] + stack.script('worker.py') + [
        '--name', name, '--jobs', *stack.jobs, '--home', stack.home,
        '--pub', f'tcp://{broker}:{stack.ports["pub"]}', '--router', f'tcp://{broker}:{stack.ports["router"]}',
        '--url', f'http://{broker}:{stack.port}']


def connections_to(ns: str, host: str, ports) -> list[str]:
    """Established TCP connections from namespace `ns` to host:port for any of `ports`."""
    out = in_ns(ns, ['ss', '-Htn', 'state', 'established']).stdout
    return [line for line in out.splitlines() if any(f'{host}:{port} ' in line + ' ' for port in ports)]


def connect(ns: str, host: str, port: int) -> str:
    """Try a TCP connection from namespace `ns`: 'connected', 'timeout', or the error."""
    code = (f'import socket\ntry:\n    socket.create_connection(("{host}", {port}), timeout=1.5)\n'
            f'    print("connected")\nexcept TimeoutError:\n    print("timeout")\n'
            f'except OSError as e:\n    print(e)\n')
    return in_ns(ns, [sys.executable, '-c', code]).stdout.strip()


def test_network_cut_without_rst(net, make_stack):
    prefix = free_subnet()
    broker, worker = f'{prefix}.1', f'{prefix}.2'
    ns = net.ns('w')
    _, dev = net.link('c', None, f'{broker}/30', ns, f'{worker}/30')
    stack = make_stack(JOBS, start=False, bind=broker)
    stack.broker_args = ['--insecure']    # plain ZeroMQ beyond loopback: a test network of our own
    stack.prefix['w1'] = ['ip', 'netns', 'exec', ns]
    stack.start_broker()
    stack.start_mongrel2()
    stack.start_worker('w1')
    stack.wait_healthy(30, workers=1)
    broker_ports = (stack.ports['pub'], stack.ports['router'])
    wait_for(lambda: len(connections_to(ns, broker, broker_ports)) == 2, 10, 'w1 connected to pub and router')

    # Paced so that triggers arrive before, during and after the cut (200 take 10 s at least).
    sender = triggers(stack, 'job_name=count', 200, pace=0.05)
    sender.start()
    sender.wait_accepted(30)
    assert 'broker silent' not in log_of(stack, 'w1')
    before = len(sender.accepted)
    # Link down on the worker's side: its packets go nowhere, the broker's side loses carrier.
    # Neither end sees a FIN or RST; only heartbeats can tell the connection is dead.
    cut = time.monotonic()
    ip('-n', ns, 'link', 'set', dev, 'down')
    # Silence past 3 s is logged; its last answer came at most a sync interval (1 s) before the cut.
    wait_for(lambda: 'broker silent' in log_of(stack, 'w1'), 5.0, 'w1 to notice the broker is silent')
    # The ZMTP heartbeat (timeout 3 s) closed the dead connections; the kernel alone would keep them for minutes.
    wait_for(lambda: not connections_to(ns, broker, broker_ports), cut + OUTAGE - 0.2 - time.monotonic(),
             'the heartbeat to drop the dead connections')
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - cut)))    # the outage itself
    during = len(sender.accepted) - before
    ip('-n', ns, 'link', 'set', dev, 'up')
    # Link down keeps the IPv4 address but drops its route; link up restores the route. Make sure.
    if worker not in ip('-n', ns, '-4', '-o', 'addr', 'show', 'dev', dev):
        ip('-n', ns, 'addr', 'add', f'{worker}/30', 'dev', dev)
    wait_for(lambda: dev in ip('-n', ns, 'route', 'get', broker), 5, 'the route to the broker')
    assert sender.is_alive(), 'triggers ended before the link came back; the test no longer covers reconnecting'
    restored = len(sender.accepted)

    accepted = sender.finish()
    assert len(accepted) == 200 and not sender.refused    # the front end never depended on the worker
    assert during > 0 and len(accepted) > restored, (before, during, restored)
    states = assert_each_ran_once(stack, 'count', accepted, workers=('w1',), timeout=90)
    assert states == {'succeeded': len(accepted)}, states
    wait_for(lambda: 'broker answering again' in log_of(stack, 'w1'), 15, 'w1 to hear the broker again')


def test_workers_behind_inbound_drop_get_every_call(net, make_stack):
    prefix = free_subnet()
    a, b, c = net.ns('a'), net.ns('b'), net.ns('c')
    net.link('r', None, f'{prefix}.1/30', a, f'{prefix}.2/30')     # us to A: we trigger over it
    net.link('b', a, f'{prefix}.5/30', b, f'{prefix}.6/30')
    net.link('c', a, f'{prefix}.9/30', c, f'{prefix}.10/30')
    workers = {'w1': (b, f'{prefix}.6', f'{prefix}.5'), 'w2': (c, f'{prefix}.10', f'{prefix}.9')}

    # Each worker host drops every new inbound connection; its own outbound ones still get replies.
    port = free_port()
    listeners = []
    try:
        for name, (ns, addr, _) in workers.items():
            listeners.append(subprocess.Popen(
                ['ip', 'netns', 'exec', ns, sys.executable, '-c',
                 f'import socket, sys; s = socket.socket(); s.bind(("0.0.0.0", {port})); s.listen(); '
                 f'sys.stdin.read()'], stdin=subprocess.PIPE))
            wait_for(lambda: connect(a, addr, port) == 'connected', 10, f'A to reach a listener on {name}')
            in_ns(ns, ['nft', 'add', 'table', 'inet', 'f'], check=True)
            in_ns(ns, ['nft', 'add chain inet f input { type filter hook input priority 0; policy accept; }'],
                  check=True)
            in_ns(ns, ['nft', 'add', 'rule', 'inet', 'f', 'input', 'ct', 'state', 'new', 'drop'], check=True)
            # Silently dropped (a timeout), not refused: the same listener answered a moment ago.
            assert connect(a, addr, port) == 'timeout', name
    finally:
        for proc in listeners:
            proc.kill()
            proc.wait()

    stack = make_stack(JOBS, start=False, bind='0.0.0.0')
    stack.broker_args = ['--insecure']    # plain ZeroMQ beyond loopback: a test network of our own
    stack.url = f'http://{prefix}.2:{stack.port}'
    stack.prefix['broker'] = stack.prefix['mongrel2'] = ['ip', 'netns', 'exec', a]
    stack.start_broker()
    stack.start_mongrel2()
    for name, (ns, _, broker) in workers.items():
        stack.spawn(name, worker_argv(stack, name, ns, broker))
    stack.wait_healthy(30, workers=2)
    for name, (ns, _, _) in workers.items():    # they connect out and listen on nothing
        assert in_ns(ns, ['ss', '-Htln']).stdout.strip() == '', name

    answers = [stack.start_job('job_name=count') for _ in range(100)]
    assert [r for r in answers if r['workers'] != ['w1', 'w2']] == []
    run_ids = [r['run_id'] for r in answers]
    states = assert_each_ran_once(stack, 'count', run_ids, workers=('w1', 'w2'), timeout=60)
    assert states == {'succeeded': 2 * len(run_ids)}, states
