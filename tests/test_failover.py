"""Two front ends on one PostgreSQL journal: one broker active, the other standing by, taking over
when the active one dies; a paused broker that lost its lease commits and publishes nothing.

Both front ends run on this host (each its own Mongrel2 and broker, on their own ports); the
workers and the semaphore connect to both. test_multihost-style hosts in network namespaces are
in test_failover_hosts.py."""
import collections
import json
import os
import signal
import threading
import time

import pytest
import zmq

from conftest import TestStack, assert_each_ran_once, wait_for
from jobz.harness import TwoFronts, http_or_down, standing_by
from jobz.journal import Journal, LeaseLost
from jobz.postgres import Cluster

JOBS = r"""
count:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
crunch:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  run_on: one
step1:
  command: "echo %(run_id)s >> {out}/ran-$JOBZ_WORKER.txt"
  run_on: one
  on_success: "/job_start?job_name=step2&n=%(n)s"
step2:
  command: "echo %(n)s >> {out}/step2-$JOBZ_WORKER.txt"
  params: {n: '\d+'}
part:
  command: "true"
  run_on: one
  on_success: "/job_start?job_name=gate&batch=%(batch)s"
gate:
  semaphore: {count: 20, key: batch}
  on_success: "/job_start?job_name=after&batch=%(batch)s"
after:
  command: "echo %(batch)s >> {out}/after-$JOBZ_WORKER.txt"
"""
WORKERS = ('w1', 'w2')


get = http_or_down


@pytest.fixture
def fronts(tmp_path, postgres):
    f = TwoFronts(str(tmp_path), JOBS, postgres.new_database(), stack=TestStack)
    try:
        f.start(WORKERS)
        yield f
    finally:
        f.stop()


class Client(threading.Thread):
    """Triggers with keys, each sent to the front end that answered last and, if that one is down or
    standing by, to the other (as jobz with two URLs does; a cron line with two URLs and retries is
    slower but the same); keeps the run ids accepted and when each front end first said 200."""

    def __init__(self, urls: list[str], queries, pace: float, timeout: float = 15.0):
        super().__init__(daemon=True)
        self.urls = list(urls)
        self.queries, self.pace, self.timeout = queries, pace, timeout
        self.accepted: dict[str, str] = {}    # key -> run id
        self.first_200 = {}    # url -> when it first answered 200 (monotonic)
        self.statuses = collections.Counter()

    def run(self) -> None:
        for i, query in enumerate(self.queries):
            key = f'k{i}-{query.split("=")[1].split("&")[0]}'
            deadline = time.monotonic() + 60
            while key not in self.accepted and time.monotonic() < deadline:    # as curl --retry would
                for url in list(self.urls):
                    status, body = get(f'{url}/job_start?{query}&key={key}', timeout=self.timeout)
                    self.statuses[status] += 1
                    if status == 200:
                        self.accepted[key] = body['run_id']
                        self.first_200.setdefault(url, time.monotonic())
                        self.urls.remove(url)
                        self.urls.insert(0, url)    # ask it first next time
                        break
                else:
                    time.sleep(0.1)
            time.sleep(self.pace)


def ran(stack, worker: str) -> collections.Counter:
    return collections.Counter(stack.lines(f'ran-{worker}.txt'))


def load() -> list[str]:
    """The triggers of a failover test: 60 each of a broadcast, a pool call, a chain and a fan-in part."""
    return [q for i in range(60) for q in (f'job_name=count&i={i}', f'job_name=crunch&i={i}',
                                           f'job_name=step1&n={i}', f'job_name=part&batch=x{i // 20}')]


def check_the_load(stack, accepted: dict, workers, timeout: float) -> None:
    """Every accepted trigger of load() ran once: a broadcast call on each worker, a pool call on one
    of them; each step1 led to one step2 on every worker; each fan-in gate of 20 released once.
    `stack` holds the workers' files; its url must be the active front end."""
    by_job = collections.defaultdict(list)
    for key, run_id in accepted.items():
        by_job[key.split('-')[1]].append(run_id)
    assert_each_ran_once(stack, 'count', by_job['count'], workers=workers, timeout=timeout)
    crunch = set(by_job['crunch'])

    def pool() -> collections.Counter:
        return sum((collections.Counter(r for r in ran(stack, w) if r in crunch) for w in workers), collections.Counter())
    wait_for(lambda: set(pool()) == crunch, timeout, 'every pool call')
    assert set(pool().values()) == {1}, pool().most_common(3)
    wait_for(lambda: all(len(stack.lines(f'step2-{w}.txt')) == 60 for w in workers), timeout, 'every step2')
    for w in workers:
        assert sorted(map(int, stack.lines(f'step2-{w}.txt'))) == list(range(60))
        wait_for(lambda: len(stack.lines(f'after-{w}.txt')) == 3, 60, 'three gates released')
        assert sorted(stack.lines(f'after-{w}.txt')) == ['x0', 'x1', 'x2']


def test_the_standby_takes_over_when_the_active_broker_dies_and_nothing_runs_twice(fronts):
    a, b = fronts.a, fronts.b
    queries = load()
    client = Client([a.url, b.url], queries, pace=0.01)
    client.start()
    wait_for(lambda: len(client.accepted) >= 60, 30, '60 accepted on a')
    killed = time.monotonic()
    a.stop('broker', signal.SIGKILL)    # the front end's host dies: its broker and its Mongrel2
    a.stop('mongrel2', signal.SIGKILL)
    client.join(120)
    assert not client.is_alive()
    assert client.first_200.get(b.url), client.statuses
    assert client.first_200[b.url] - killed < 10, 'b took over within 10 s'
    assert len(client.accepted) == len(queries), client.statuses    # every trigger found a front end
    a.url = b.url    # from here on the checks ask b, the active front end
    check_the_load(a, client.accepted, WORKERS, timeout=60)


def test_postgresql_restart_under_load_with_two_front_ends(tmp_path):
    """PostgreSQL crashes and comes back while keyed triggers stream in through both front ends:
    meanwhile both answer 503 at once; the brokers come back by themselves, one active and one
    standing by; every trigger is accepted in the end (the client retries, as curl --retry would)
    and every accepted run ran once."""
    cluster = Cluster().start()    # its own: this test crashes it
    fronts = TwoFronts(str(tmp_path), JOBS, cluster.new_database(), stack=TestStack)
    try:
        fronts.start(WORKERS)
        a, b = fronts.a, fronts.b
        queries = load()
        client = Client([a.url, b.url], queries, pace=0.01)
        client.start()
        wait_for(lambda: len(client.accepted) >= 60, 30, '60 accepted')
        cluster.stop('immediate')    # as a crash: no shutdown checkpoint
        wait_for(lambda: client.statuses[503] >= 20, 10, '503 answers while PostgreSQL is away')
        accepted, refused = len(client.accepted), client.statuses[503]
        cluster.start()
        client.join(120)
        assert not client.is_alive()
        assert client.statuses[503] >= refused and set(client.statuses) <= {200, 503}, client.statuses
        assert len(client.accepted) == len(queries) > accepted, client.statuses
        # Both brokers are still the processes they were: one is active, the other stands by.
        assert a.procs['broker'].poll() is None and b.procs['broker'].poll() is None
        health = {s.url: get(s.url + '/health')[0] for s in (a, b)}
        assert sorted(health.values()) == [200, 503], health
        a.url = next(url for url, status in health.items() if status == 200)    # checks through the active one
        check_the_load(a, client.accepted, WORKERS, timeout=60)
    finally:
        fronts.stop()
        cluster.remove()


def test_a_paused_broker_that_lost_its_lease_commits_and_publishes_nothing_and_stands_by(fronts):
    a, b = fronts.a, fronts.b
    spy = zmq.Context.instance().socket(zmq.SUB)    # everything a's broker publishes
    spy.subscribe(b'')
    spy.connect(a.addr('pub'))
    try:
        before = a.start_job('job_name=count')['run_id']
        a.wait_run(before)
        os.kill(a.procs['broker'].pid, signal.SIGSTOP)    # paused: a long GC, a frozen VM
        wait_for(lambda: get(b.url + '/health')[0] == 200, 15, 'b taking over')
        # Triggers to a while it is paused wait in Mongrel2 for it; b runs others meanwhile.
        waiting = collections.Counter()
        threads = [threading.Thread(target=lambda i=i: waiting.update(
            [json.dumps(get(f'{a.url}/job_start?job_name=count&key=paused{i}', timeout=30))]))
            for i in range(5)]
        for t in threads:
            t.start()
        on_b = b.start_job('job_name=count')['run_id']
        time.sleep(0.5)    # let the five reach a's Mongrel2 (nothing to wait on: a is paused)
        while spy.poll(0):
            spy.recv_multipart()    # what a published before its pause
        os.kill(a.procs['broker'].pid, signal.SIGCONT)
        for t in threads:
            t.join(30)
        answers = [json.loads(k) for k in waiting.elements()]
        assert len(answers) == 5
        for status, body in answers:
            assert status == 503 and body['active'] == b.url, (status, body)
        assert spy.poll(2000) == 0, 'a published after it lost its lease'
        assert get(a.url + '/health') == (503, standing_by(b.url))    # a stands by now
        runs = get(b.url + '/runs?job=count&limit=100')[1]['runs']
        assert not [r for r in runs if (r['key'] or '').startswith('paused')], 'a committed after its lease'
        a.url, on_a = b.url, a.url    # checks through the active front end
        assert_each_ran_once(a, 'count', [before, on_b], workers=WORKERS)
        with open(os.path.join(a.log_dir, 'broker.log')) as f:
            assert 'lost the lease' in f.read()
        # Back from the dead, it rejoins as a standby: kill b, and a takes over again.
        b.stop('broker', signal.SIGKILL)
        wait_for(lambda: get(on_a + '/health')[0] == 200, 15, 'a active again')
    finally:
        spy.close(0)


def test_a_broker_starting_beside_an_active_one_takes_no_lock_it_could_wait_on(postgres):
    """Opening a journal of the current schema while another broker's transaction has written to
    it: the newcomer must not wait (the schema's CREATEs lock tables; with the writer waiting on the
    newcomer in turn, that was a deadlock and the standby died at start)."""
    url = postgres.new_database()
    active = Journal(url)
    assert active.take_lease('a', 'http://a', 30)
    active.begin()
    active.add_run('r1', 'count', 'count', {}, [], 'k1', [])    # rows written, its transaction open
    opened = []
    starting = threading.Thread(target=lambda: opened.append(Journal(url)), daemon=True)
    starting.start()
    starting.join(5)
    try:
        assert opened, 'a broker starting on the journal waited on the active one'
    finally:
        active.commit()
        starting.join(10)
        for j in [active, *opened]:
            j.close()


def test_a_commit_after_the_lease_was_taken_over_is_refused_and_leaves_nothing(postgres):
    """The fence itself, on two journals of one database: a broker whose lease ran out and was taken
    while its transaction was open commits nothing of it."""
    url = postgres.new_database()
    old, new = Journal(url), Journal(url)
    assert old.take_lease('old', 'http://old', 0.5) and not new.take_lease('new', 'http://new', 0.5)
    old.begin()
    old.add_run('r1', 'count', 'count', {}, [], 'k1', [])    # ... and then the broker is paused
    wait_for(lambda: new.take_lease('new', 'http://new', 5.0), 5, 'the lease to run out and be taken')
    with pytest.raises(LeaseLost):
        old.commit()
    old.rollback()
    assert new.run_by_key('k1') is None and new.lease_holder()['url'] == 'http://new'
    with pytest.raises(LeaseLost):    # and it stays lost: nothing more is committed
        old.renew_lease()


def test_a_take_over_waits_for_a_commit_that_proved_the_lease_and_then_finds_it_renewed(postgres):
    """The other order: the active broker proves its lease (the row stays locked until its COMMIT)
    shortly before it would run out; a standby that tries to take over once it has run out waits
    for that commit, then finds the lease renewed, and sees what was committed under it."""
    url = postgres.new_database()
    old, new = Journal(url), Journal(url)
    assert old.take_lease('old', 'http://old', 2.0)    # runs out at T+2 as committed
    old.begin()
    old.add_run('r1', 'count', 'count', {}, [], 'k1', [])
    time.sleep(1.5)
    old._fence()    # what commit() does last: runs out at T+3.5, once committed; the row is locked
    time.sleep(1.0)    # T+2.5: as committed, the lease ran out
    taken = []
    taker = threading.Thread(target=lambda: taken.append(new.take_lease('new', 'http://new', 2.0)))
    taker.start()
    taker.join(0.5)
    assert taker.is_alive(), 'the take-over waits for the lock'
    old.db.commit()    # T+3: before T+3.5
    taker.join(5)
    assert taken == [False] and new.lease_holder()['holder'] == 'old'
    assert new.run_by_key('k1') == 'r1'
