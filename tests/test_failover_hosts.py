"""Two front ends on one PostgreSQL, each on a host of its own: network namespaces `pg`, `f1`, `f2`
and two worker hosts `wa`, `wb` on one bridge. The active front end's host dies mid-load (every
process SIGKILLed, its link cut); a front end cut off from PostgreSQL alone is fenced."""
import os
import signal
import time

import pytest
import zmq

from conftest import TestStack, assert_each_ran_once, wait_for
from jobz.harness import http_or_down, standing_by
from jobz.postgres import Cluster
from test_failover import JOBS, Client, check_the_load, load
from test_netfaults import free_subnet, in_ns, ip, net  # noqa: F401  (net: the fixture)

pytestmark = pytest.mark.slow    # hosts in network namespaces: `pytest -m 'not slow'` skips them

WORKERS = ('wa', 'wb')


class Hosts:
    """The five hosts on a bridge in our namespace (which reaches them all: the clients live here)."""

    def __init__(self, net, tmp_path):
        prefix = free_subnet()
        bridge = f'jzb{net.tag}'
        ip('link', 'add', bridge, 'type', 'bridge')
        net.undo.append(['link', 'del', bridge])
        ip('addr', 'add', f'{prefix}.1/24', 'dev', bridge)
        ip('link', 'set', bridge, 'up')
        self.ns, self.addr, self.dev = {}, {}, {}
        for i, name in enumerate(('pg', 'f1', 'f2', 'wa', 'wb')):
            ns = self.ns[name] = net.ns(name)
            here, there = f'jz{net.tag}{name}h', f'jz{net.tag}{name}t'
            ip('link', 'add', here, 'type', 'veth', 'peer', 'name', there, 'netns', ns)
            net.undo.append(['link', 'del', here])
            ip('link', 'set', here, 'master', bridge)
            ip('link', 'set', here, 'up')
            self.addr[name], self.dev[name] = f'{prefix}.{10 + i}', there
            ip('-n', ns, 'addr', 'add', f'{self.addr[name]}/24', 'dev', there)
            ip('-n', ns, 'link', 'set', there, 'up')
        self.cluster = Cluster(host=self.addr['pg'], prefix=self.on('pg')).start()
        try:
            journal = self.cluster.new_database()
        except Exception:    # the fixture's stop() never comes: remove the server here
            self.cluster.remove()
            raise
        self.f1, self.f2 = (TestStack(str(tmp_path / name), JOBS, bind=self.addr[name]) for name in ('f1', 'f2'))
        for name, stack in (('f1', self.f1), ('f2', self.f2)):
            stack.journal = journal
            stack.broker_args = ['--front-url', stack.url, '--worker-timeout', '5', '--insecure']
            stack.prefix['broker'] = stack.prefix['mongrel2'] = self.on(name)
        links = ['--pub', f"{self.f1.addr('pub')},{self.f2.addr('pub')}",
                 '--router', f"{self.f1.addr('router')},{self.f2.addr('router')}", '--url', f'{self.f1.url},{self.f2.url}']
        self.f1.links = lambda: links
        for name in WORKERS:
            self.f1.prefix[name] = self.on(name)
        self.f1.prefix['semaphore'] = self.on('wa')

    def on(self, host: str) -> list[str]:
        return ['ip', 'netns', 'exec', self.ns[host]]

    def start(self) -> None:
        self.f1.start_broker()
        self.f1.start_mongrel2()
        for name in WORKERS:
            self.f1.start_worker(name)
        self.f1.start_semaphore()
        self.f1.wait_healthy(60, workers=3)
        self.f2.start_broker()
        self.f2.start_mongrel2()
        wait_for(lambda: http_or_down(self.f2.url + '/health') == (503, standing_by(self.f1.url)), 30, 'f2 standing by')

    def stop(self) -> None:
        self.f1.stop_all()
        self.f2.stop_all()
        self.cluster.remove()


@pytest.fixture
def hosts(net, tmp_path):
    h = Hosts(net, tmp_path)
    try:
        h.start()
        yield h
    finally:
        h.stop()


@pytest.mark.timeout(300)
def test_the_front_end_host_dies_mid_load_and_the_other_carries_on(hosts):
    f1, f2 = hosts.f1, hosts.f2
    queries = load()
    client = Client([f1.url, f2.url], queries, pace=0.01, timeout=2)    # a dead host: no answer at all
    client.start()
    wait_for(lambda: len(client.accepted) >= 60, 30, '60 accepted on f1')
    died = time.monotonic()
    for name in list(f1.procs):    # every process of host f1 (the workers live elsewhere)
        if f1.prefix.get(name) == hosts.on('f1'):
            f1.stop(name, signal.SIGKILL)
    ip('-n', hosts.ns['f1'], 'link', 'set', hosts.dev['f1'], 'down')
    client.join(180)
    assert not client.is_alive() and len(client.accepted) == len(queries), client.statuses
    assert client.first_200[f2.url] - died < 10, 'f2 took triggers within 10 s'
    f1.url = f2.url    # the checks ask the active front end
    check_the_load(f1, client.accepted, WORKERS, timeout=90)


@pytest.mark.timeout(300)
def test_a_front_end_cut_off_from_postgresql_is_fenced_and_rejoins_as_standby(hosts):
    f1, f2 = hosts.f1, hosts.f2
    spy = zmq.Context.instance().socket(zmq.SUB)    # everything f1's broker publishes
    spy.subscribe(b'')
    spy.connect(f1.addr('pub'))
    rule = f'ip saddr {hosts.addr["f1"]} drop'
    try:
        before = f1.start_job('job_name=count')['run_id']
        f1.wait_run(before)
        while spy.poll(200):
            spy.recv_multipart()
        # The partition: PostgreSQL's host drops everything from f1; f1's processes keep running.
        in_ns(hosts.ns['pg'], ['nft', 'add', 'table', 'inet', 'cut'], check=True)
        in_ns(hosts.ns['pg'], ['nft', 'add chain inet cut input { type filter hook input priority 0; }'], check=True)
        in_ns(hosts.ns['pg'], ['nft', f'add rule inet cut input {rule}'], check=True)
        wait_for(lambda: http_or_down(f2.url + '/health')[0] == 200, 20, 'f2 taking over')
        on_f2 = f2.start_job('job_name=count')['run_id']
        # f1, cut off: nothing it is asked to start is accepted.
        answers = [http_or_down(f'{f1.url}/job_start?job_name=count&key=cut{i}', timeout=15) for i in range(3)]
        assert all(status == 503 for status, _ in answers), answers
        wait_for(lambda: 'lost the lease' in open(os.path.join(f1.log_dir, 'broker.log')).read(), 15,
                 'f1 to step down')
        # Standing by while still cut off, it answers at once: connecting again (which waits on a host
        # that does not answer) happens in the background.
        for _ in range(5):
            asked = time.monotonic()
            assert http_or_down(f1.url + '/health', timeout=15)[0] == 503
            assert time.monotonic() - asked < 1.0, 'a 503 waited on a connection attempt'
        # Healed: f1 reaches PostgreSQL again, finds f2 holding the lease and stands by.
        in_ns(hosts.ns['pg'], ['nft', 'delete', 'table', 'inet', 'cut'], check=True)
        wait_for(lambda: http_or_down(f1.url + '/health') == (503, standing_by(f2.url)), 20, 'f1 standing by')
        assert spy.poll(1000) == 0, 'f1 published after it was cut off'
        runs = http_or_down(f2.url + '/runs?job=count&limit=100')[1]['runs']
        assert not [r for r in runs if (r['key'] or '').startswith('cut')], 'f1 committed after it was cut off'
        f1.url = f2.url
        assert_each_ran_once(f1, 'count', [before, on_f2], workers=WORKERS)
    finally:
        spy.close(0)
