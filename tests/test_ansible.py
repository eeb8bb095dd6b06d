"""Deploy with Ansible onto five real hosts (systemd-nspawn containers with systemd), then use them.

Two front ends (Mongrel2 and a broker each) on one PostgreSQL journal on a third host, and two
worker hosts (the semaphore on the first), deployed the secure way the example inventory shows: HTTPS with client certificates from our own CA, CURVE between broker and
agents, plain HTTP on the front end's loopback only; the playbook makes the CA, certificates and
keys itself. Deploy; deploy again and nothing changes; a trigger over HTTPS runs on both worker
hosts and chains into a fan-in semaphore; a killed worker is restarted by systemd and catches up;
a rebooted host comes back; the active front end loses its power and the other takes over. Then the attacks the secure layout is for: the plain ports from another
host, the jobz user against what root reads, a local user against the handler sockets, one
source opening too many connections, an inventory asking for plain HTTP on the network, the
journal's password from another host or without TLS.
"""
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, wait_for
from hosts import Hosts

CATALOG = """
where:                     # runs on every worker host: each notes where it ran
  command: "echo %(tag)s $(hostname) >> /var/lib/jobz/where.txt"
  on_success: "/job_start?job_name=both_done&tag=%(tag)s"
both_done:                 # fan-in: one release once every expected worker has reported
  semaphore: {count: all}
  on_success: "/job_start?job_name=finish&tag=%(tag)s"
finish:
  command: "echo finished %(tag)s >> /var/lib/jobz/finish.txt"
"""
ANSIBLE = os.path.join(os.path.dirname(sys.executable), 'ansible-playbook')
# Building the Debian root (cold: about 25 s) and two deploys take longer than the usual bound.
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]
LIMIT = 20     # jobz_front_conn_limit here: connections at once per source address and port


def playbook(inventory: str, wheel: str, log: str, *args: str, ok: bool = True) -> tuple[dict, str]:
    """Run site.yml (with more ansible-playbook `args`); return the recap per host and the output.

    The recap: {host: {'changed': n, 'failed': n, ...}}. With ok=False the run must fail."""
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING='False', ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0',
               ANSIBLE_PIPELINING='True',    # one ssh round trip per task, not three or four
               ANSIBLE_RETRY_FILES_ENABLED='False', PATH=os.path.dirname(sys.executable) + ':' + os.environ['PATH'])
    done = subprocess.run([ANSIBLE, '-i', inventory, os.path.join(ROOT, 'ansible', 'site.yml'),
                           '-e', f'jobz_wheel={wheel}', *args], capture_output=True, text=True, env=env, timeout=600)
    with open(log, 'a') as f:
        f.write(done.stdout + done.stderr)
    assert (done.returncode == 0) == ok, done.stdout[-4000:] + done.stderr[-2000:]
    recap = {}
    for host, counts in re.findall(r'^(\S+)\s+:\s+(ok=.*)$', done.stdout, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', counts)}
    return recap, done.stdout


@pytest.fixture(scope='module')
def deployed(tmp_path_factory):
    work = tmp_path_factory.mktemp('deploy')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(work / 'dist'), ROOT],
                   check=True, capture_output=True, timeout=300)
    wheel = str(next((work / 'dist').glob('jobz-*.whl')))
    (work / 'catalog').mkdir()
    (work / 'catalog' / 'jobs.yaml').write_text(CATALOG)
    with Hosts(['front', 'front2', 'pg', 'node1', 'node2'], str(work / 'hosts')) as hosts:
        fronts = {name: {'ansible_host': hosts[name].addr, 'jobz_front_tls_bind': hosts[name].addr,
                         'jobz_front_zmq_bind': hosts[name].addr, 'jobz_front_clients': ['tester'],
                         'jobz_front_conn_limit': LIMIT} for name in ('front', 'front2')}
        # The example inventory's settings; the playbook makes the CA, certificates and keys in jobz_pki_dir.
        inventory = {'all': {
            'vars': {'ansible_user': 'root', 'ansible_ssh_private_key_file': hosts.key,
                     'ansible_python_interpreter': '/usr/bin/python3',
                     'ansible_ssh_common_args': '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null',
                     'ansible_control_path_dir': hosts.control_dir,
                     'jobz_apt_update': False,        # the hosts have no route to a mirror
                     'jobz_pki_dir': str(work / 'pki'),
                     'jobz_front_jobs_dir': str(work / 'catalog'),
                     'jobz_semaphore_jobs_dir': str(work / 'catalog')},
            'children': {
                'jobz_front': {'hosts': fronts},
                'jobz_postgresql': {'hosts': {'pg': {'ansible_host': hosts['pg'].addr}}},
                'jobz_semaphores': {'hosts': {'node1': {}}},
                'jobz_workers': {'hosts': {
                    name: {'ansible_host': hosts[name].addr,
                           'jobz_workers': [{'name': name, 'jobs': [str(work / 'catalog' / 'jobs.yaml')]}]}
                    for name in ('node1', 'node2')}}}}}
        path = str(work / 'inventory.yml')
        with open(path, 'w') as f:
            yaml.safe_dump(inventory, f)
        log = str(work / 'ansible.log')
        first, _ = playbook(path, wheel, log)
        second, _ = playbook(path, wheel, log)
        pki = str(work / 'pki' / 'ca')
        context = ssl.create_default_context(cafile=f'{pki}/ca.crt')
        context.load_cert_chain(f'{pki}/clients/tester.crt', f'{pki}/clients/tester.key')
        yield {'hosts': hosts, 'urls': [f'https://{hosts[n].addr}:6443' for n in fronts], 'context': context,
               'work': work,
               'pki': pki, 'first': first, 'second': second,
               'rerun': lambda *args, ok=True: playbook(path, wheel, log, *args, ok=ok)}


def test_second_deploy_changes_nothing(deployed):
    assert set(deployed['second']) == {'localhost', 'front', 'front2', 'pg', 'node1', 'node2'}
    assert all(r['changed'] == 0 and r['failed'] == 0 for r in deployed['second'].values()), \
        f"{deployed['second']}\n{journals(deployed['hosts'])}"
    assert all(r['changed'] > 0 for r in deployed['first'].values())    # localhost: it made the PKI
    pki = deployed['work'] / 'pki'
    assert sorted(p.name for p in (pki / 'keys').glob('*.key_secret')) == [
        'broker.key_secret', 'node1-semaphore.key_secret', 'node1.key_secret', 'node2.key_secret']
    assert sorted(p.name for p in (pki / 'ca' / 'clients').glob('*.crt')) == [
        'node1-semaphore.crt', 'node1.crt', 'node2.crt', 'tester.crt']
    assert sorted(p.name for p in (pki / 'ca' / 'servers').glob('*.crt')) == ['front.crt', 'front2.crt', 'pg.crt']


def test_trigger_runs_on_both_hosts_and_fans_in(deployed):
    hosts = deployed['hosts']
    try:
        wait_for(lambda: _workers_alive(deployed) >= {'node1', 'node2', 'node1-semaphore'}, timeout=60,
                 what='workers')
    except AssertionError as e:
        raise AssertionError(f'{e}\n{journals(hosts)}') from None
    status, run = get(deployed, '/job_start?job_name=where&tag=t1&wait=60')
    assert status == 200, run
    assert sorted(run['workers']) == ['node1', 'node2'] and run['triggered_by'] == 'tester'
    # Only the enrolled certificate gets in; the plain front end stays on the front host's loopback.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{hosts['front'].addr}:6769/health", timeout=5)
    for name in ('node1', 'node2'):        # the files are in each container's own root
        assert 't1 ' + name in _lines(hosts[name], 'where.txt')
    # The semaphore released `finish` once both had reported; it runs on both hosts too.
    wait_for(lambda: all('finished t1' in _lines(hosts[n], 'finish.txt') for n in ('node1', 'node2')),
             timeout=60, what='the fan-in')
    assert sum(_lines(hosts[n], 'finish.txt').count('finished t1') for n in ('node1', 'node2')) == 2
    # The chain went through HTTPS with each agent's own certificate, over CURVE.
    children = get(deployed, '/job_status?run_id=' + run['run_id'])[1]['children']
    assert len(children) == 2     # each worker's on_success call reached the semaphore
    for child in [get(deployed, '/job_status?run_id=' + c)[1] for c in children]:
        assert child['job'] == 'both_done' and child['triggered_by'] in ('node1', 'node2')
    releases = [r for c in children for r in get(deployed, '/job_status?run_id=' + c)[1]['children']]
    assert len(releases) == 1
    release = get(deployed, '/job_status?run_id=' + releases[0])[1]
    assert release['job'] == 'finish' and release['triggered_by'] == 'node1-semaphore'


def test_what_operators_see_on_the_deployment(deployed):
    """The status page, /metrics and the jobz command line over HTTPS; logfmt records in journald."""
    url = active(deployed)
    request = urllib.request.Request(url + '/', headers={'Accept': 'text/html'})
    with urllib.request.urlopen(request, timeout=30, context=deployed['context']) as r:
        assert r.headers['Content-Type'].startswith('text/html') and r.read().startswith(b'<!doctype html>')
    with urllib.request.urlopen(url + '/metrics', timeout=30, context=deployed['context']) as r:
        samples = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    assert samples['jobz_workers_connected'] >= 3
    pki = deployed['pki']
    cli = subprocess.run([sys.executable, '-m', 'jobz.client', '--url', ','.join(deployed['urls']),
                          '--cert', f'{pki}/clients/tester.crt', '--key', f'{pki}/clients/tester.key',
                          '--ca', f'{pki}/ca.crt', 'start', 'where', 'tag=t9', '--wait', '--timeout', '60'],
                         capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    node1 = deployed['hosts']['node1']
    records = node1.ssh("journalctl -u 'jobz-worker@node1' -o cat --no-pager", check=True).stdout.splitlines()
    assert any(r.startswith('ts=') and 'who=worker:node1' in r and 'job=where' in r and ' run=' in r
               for r in records), records[-5:]


def test_killed_worker_is_restarted_and_catches_up(deployed):
    node2 = deployed['hosts']['node2']
    before = _restarts(node2)
    node2.ssh('systemctl kill -s KILL jobz-worker@node2', check=True)
    # Published while node2's worker is down: it must still run there once systemd restarts it.
    status, run = get(deployed, '/job_start?job_name=where&tag=t2')
    assert status == 200
    wait_for(lambda: _restarts(node2) > before, timeout=30, what='systemd to restart the worker')
    wait_for(lambda: 't2 node2' in _lines(node2, 'where.txt'), timeout=60, what='the worker to catch up')
    assert _lines(node2, 'where.txt').count('t2 node2') == 1

# Run on a host with python3: try each (host, port) and print {"port": "open" | error name}.
CONNECT = """
import json, socket, sys
out = {}
for port in map(int, sys.argv[2:]):
    try:
        socket.create_connection((sys.argv[1], port), timeout=5).close()
        out[port] = 'open'
    except OSError as e:
        out[port] = type(e).__name__
print(json.dumps(out))
"""


def connect(host, addr: str, *ports: int) -> dict:
    done = host.ssh(f'python3 -c {shlex.quote(CONNECT)} {addr} {" ".join(map(str, ports))}', check=True)
    return {int(k): v for k, v in json.loads(done.stdout).items()}


def test_only_https_and_curve_ports_reach_other_hosts(deployed):
    hosts = deployed['hosts']
    front, standby = _active_and_standby(deployed)
    # Mongrel2's plain server is bound to the front end's loopback: refused from the network.
    assert connect(hosts['node1'], front.addr, 6769, 6443, 6770, 6771) == {
        6769: 'ConnectionRefusedError', 6443: 'open', 6770: 'open', 6771: 'open'}
    # The standby answers HTTPS (503, naming the active one) and binds no worker port.
    assert connect(hosts['node1'], standby.addr, 6769, 6443, 6770, 6771) == {
        6769: 'ConnectionRefusedError', 6443: 'open', 6770: 'ConnectionRefusedError', 6771: 'ConnectionRefusedError'}
    assert connect(front, '127.0.0.1', 6769) == {6769: 'open'}
    # Nothing on the network is Mongrel2's handler sockets any more: they are files in its chroot.
    listening = front.ssh('ss -Htln', check=True).stdout
    assert not re.search(r':677[2-5]\b', listening), listening
    # The broker's ports serve only CURVE: a plain ZeroMQ client gets no answer at all.
    probe = """
import zmq
s = zmq.Context().socket(zmq.DEALER); s.linger = 0; s.connect('tcp://%s:6771')
s.send_multipart([b'SYNC', b'{}']); print(s.poll(3000))
""" % front.addr
    assert hosts['node1'].ssh(f'python3 -c {shlex.quote(probe)}', check=True).stdout.strip() == '0'


# Run as the jobz user on the front end: try to change what root reads, print what happened to each.
AS_JOBZ = """
import json, os
def attempt(what, path):
    try:
        if what == 'append':
            open(path, 'ab').close()
        elif what == 'create':
            open(path, 'xb').close()
        else:
            os.rename(path, path + '.moved')
        return 'done'
    except OSError as e:
        return type(e).__name__
print(json.dumps({f'{what} {path}': attempt(what, path) for what, path in [
    ('append', '/etc/jobz/mongrel2/config.sqlite'), ('append', '/etc/jobz/mongrel2/mongrel2.conf'),
    ('create', '/etc/jobz/mongrel2/planted'), ('append', '/etc/jobz/mongrel2/certs/ca.crt'),
    ('create', '/etc/jobz/mongrel2/certs/planted'),
    ('create', '/var/lib/jobz-mongrel2/planted'), ('rename', '/var/lib/jobz-mongrel2/certs'),
    ('rename', '/var/lib/jobz-mongrel2/run'), ('create', '/var/lib/jobz-mongrel2/run/mongrel2.pid.x'),
    ('create', '/var/lib/jobz-mongrel2/logs/planted'), ('create', '/var/lib/jobz-mongrel2/tmp/planted'),
    ('create', '/var/lib/jobz-mongrel2/certs/planted'), ('append', '/var/lib/jobz-mongrel2/certs/jobz-tls.key'),
    ('append', '/etc/jobz/broker.env'), ('create', '/etc/jobz/keys/planted'),
    ('append', '/etc/jobz/keys/broker.key_secret'), ('create', '/etc/jobz/jobs/planted.yaml'),
    ('append', '/etc/systemd/system/jobz-mongrel2.service'), ('append', '/etc/jobz/firewall.nft'),
    ('create', '/var/lib/jobz/planted')]}))
"""
# Connect to a unix socket, print 'connected' or the error.
UNIX = """
import socket, sys
for path in sys.argv[1:]:
    try:
        socket.socket(socket.AF_UNIX).connect(path)
        print('connected')
    except OSError as e:
        print(type(e).__name__)
"""


def test_jobz_user_and_local_users_cannot_reach_what_they_should_not(deployed):
    front = deployed['hosts']['front']
    tried = json.loads(front.ssh(f'runuser -u jobz -- python3 -c {shlex.quote(AS_JOBZ)}', check=True).stdout)
    assert tried.pop('create /var/lib/jobz/planted') == 'done'    # it is the jobz user, and it can write its own
    assert tried and all(v == 'PermissionError' for v in tried.values()), tried
    # More generally: as jobz, nothing it could write in the folders root reads or runs from, but
    # Mongrel2's handler sockets (which it must reach) and jobz's own state.
    # (It may list the chroot's certs/ and handlers/ only: the chroot itself is 0711, the rest Mongrel2's.)
    writable = front.ssh('runuser -u jobz -- find /etc/jobz /etc/systemd/system /opt/jobz /var/lib/jobz-mongrel2 '
                         '/var/lib/jobz-mongrel2/certs /var/lib/jobz-mongrel2/handlers -writable 2>/dev/null; true'
                         ).stdout.split()
    sockets = [f'/var/lib/jobz-mongrel2/handlers/{n}' for n in ('jobz.req', 'jobz.rep', 'tls.req', 'tls.rep')]
    assert sorted(writable) == sorted(['/var/lib/jobz-mongrel2/handlers'] + sockets)
    node1 = deployed['hosts']['node1']    # a worker host: its keys, job files, environment and unit too
    assert node1.ssh('runuser -u jobz -- find /etc/jobz /etc/systemd/system /opt/jobz -writable 2>/dev/null; true'
                     ).stdout.split() == []
    assert node1.ssh('runuser -u jobz -- cat /etc/jobz/keys/node1.key_secret /etc/jobz/tls/node1.key >/dev/null'
                     ).returncode == 0    # which it can read
    # Both Mongrel2 processes run as their own user, not root and not jobz.
    users = front.ssh('ps -o user:32= -C mongrel2', check=True).stdout.split()
    assert users == ['jobz-mongrel2', 'jobz-mongrel2'], users
    # ... each with the unit's open-files limit (65536, or the most this host allows): Mongrel2 would
    # cap it at 10240 without superpoll.max_fd.
    out = front.ssh('ulimit -Hn; for p in $(pgrep -x mongrel2); do grep "open files" /proc/$p/limits; done',
                    check=True).stdout.splitlines()
    assert [int(line.split()[3]) for line in out[1:]] == [min(65536, int(out[0]))] * 2, out
    # Another local user cannot take requests off the handler sockets; the broker's user can.
    front.ssh('id eve || useradd -M eve', check=True)
    args = f'python3 -c {shlex.quote(UNIX)} ' + ' '.join(sockets)
    assert front.ssh(f'runuser -u eve -- {args}', check=True).stdout.split() == ['PermissionError'] * 4
    assert front.ssh(f'runuser -u jobz -- {args}', check=True).stdout.split() == ['connected'] * 4


HOLD = """
import json, socket, sys
held, refused, other = [], 0, []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((sys.argv[1], 6443))
        held.append(s)
    except ConnectionRefusedError:
        refused += 1
    except OSError as e:
        other.append(repr(e))
print(json.dumps({'held': len(held), 'refused': refused, 'other': other}), flush=True)
sys.stdin.read()     # hold them until the test closes our input
"""


def test_one_source_cannot_take_all_connections(deployed):
    hosts = deployed['hosts']
    front = hosts['front']
    assert f'ct count over {LIMIT}' in front.ssh('nft list table inet jobz', check=True).stdout
    # node1 opens more connections than the limit and holds them (Mongrel2 closes them after 10 s idle).
    hold = subprocess.Popen(hosts['node1'].ssh_argv(f'python3 -c {shlex.quote(HOLD)} {front.addr} {LIMIT + 5}'),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        counts = json.loads(hold.stdout.readline() or '{}')
        # node1's worker may hold an HTTPS connection of its own (its handler calls): it counts too.
        assert counts.get('other') == [] and LIMIT - 2 <= counts['held'] <= LIMIT and \
            counts['held'] + counts['refused'] == LIMIT + 5, counts
        # Others are not affected: node2 connects, and a real request from here gets its answer.
        assert connect(hosts['node2'], front.addr, 6443) == {6443: 'open'}
        assert get(deployed, '/health', timeout=10)[0] == 200
    finally:
        hold.stdin.close()
        hold.wait(timeout=30)
    # Once they are closed node1 connects again.
    wait_for(lambda: connect(hosts['node1'], front.addr, 6443) == {6443: 'open'}, timeout=20, what='node1 again')


def test_roles_refuse_plain_http_beyond_loopback(deployed):
    front = deployed['hosts']['front']
    before = front.ssh('md5sum /etc/jobz/mongrel2/mongrel2.conf /etc/jobz/broker.env', check=True).stdout
    recap, out = deployed['rerun']('--limit', 'front', '-e', f'jobz_front_http_bind={front.addr}', ok=False)
    assert 'the plain HTTP front end has no authentication' in out, out[-3000:]
    assert recap['front']['failed'] == 1 and recap['front']['changed'] == 0, recap
    # The same for the broker's ports (on the front end's address here) without CURVE keys.
    recap, out = deployed['rerun']('--limit', 'front', '-e', 'jobz_curve_keys=', ok=False)
    assert f'jobz_front_zmq_bind={front.addr} without CURVE keys' in out, out[-3000:]
    assert recap['front']['failed'] == 1 and recap['front']['changed'] == 0, recap
    # Two front ends without a shared PostgreSQL journal (each would keep its own).
    recap, out = deployed['rerun']('--limit', 'front', '-e', 'jobz_journal_url=', ok=False)
    assert 'jobz_front has 2 hosts: they must share one journal in PostgreSQL' in out, out[-3000:]
    assert recap['front']['failed'] == 1 and recap['front']['changed'] == 0, recap
    # Nothing changed, and the deployment still works as before.
    assert front.ssh('md5sum /etc/jobz/mongrel2/mongrel2.conf /etc/jobz/broker.env', check=True).stdout == before
    assert connect(deployed['hosts']['node2'], front.addr, 6769) == {6769: 'ConnectionRefusedError'}
    assert get(deployed, '/health', timeout=10)[0] == 200


def test_rebooted_host_comes_back(deployed):
    node1 = deployed['hosts']['node1']
    node1.poweroff_and_boot()
    wait_for(lambda: node1.ssh('systemctl is-active jobz-worker@node1').stdout.strip() == 'active',
             timeout=120, what='the worker to start at boot')
    wait_for(lambda: 'node1' in _workers_alive(deployed), timeout=60, what='node1 back at the broker')
    status, run = get(deployed, '/job_start?job_name=where&tag=t3&wait=60')
    assert status == 200 and run['state'] == 'succeeded'
    assert 't3 node1' in _lines(node1, 'where.txt')


# Run on a front end as the jobz user: connect to the journal at $URL, print 'connected' or the error.
PSQL = """
import os, psycopg
try:
    psycopg.connect(os.environ['URL'], connect_timeout=5).close()
    print('connected')
except psycopg.OperationalError as e:
    print(str(e).strip().splitlines()[-1])
"""


def test_the_journal_lets_in_only_the_front_ends_over_tls(deployed):
    hosts = deployed['hosts']
    front = hosts['front']
    # The journal's password is in the broker's environment file, which only root reads.
    assert front.ssh('stat -c %a:%U /etc/jobz/broker.env', check=True).stdout.split() == ['600:root']
    front.ssh('id eve || useradd -M eve', check=True)
    assert 'Permission denied' in front.ssh('runuser -u eve -- cat /etc/jobz/broker.env').stderr
    env = dict(line.split('=', 1) for line in front.ssh('cat /etc/jobz/broker.env', check=True).stdout.splitlines()
               if '=' in line and not line.startswith('#'))
    url = env['JOBZ_JOURNAL']
    assert url.startswith("postgresql://jobz:") and f"@{hosts['pg'].addr}:5432/jobz?sslmode=verify-full" in url

    def attempt(host, url):
        return host.ssh(f'URL={shlex.quote(url)} runuser -u jobz -w URL -- '
                        f'/opt/jobz/venv/bin/python -c {shlex.quote(PSQL)}', check=True).stdout.strip()

    assert attempt(front, url) == 'connected'
    # With the password, but without TLS: refused (hostssl lines only).
    plain = url.split('?')[0] + '?sslmode=disable'
    assert 'no pg_hba.conf entry' in attempt(front, plain) and 'no encryption' in attempt(front, plain)
    # With the password and TLS, from a host that is not a front end (this machine): refused.
    here = url.split('sslrootcert=')[0] + 'sslrootcert=' + deployed['pki'] + '/ca.crt'
    with pytest.raises(psycopg.OperationalError, match='no pg_hba.conf entry for host'):
        psycopg.connect(here, connect_timeout=5)
    # A wrong password from a front end: refused.
    wrong = re.sub(r'(jobz:)[^@]*@', r'\1wrong@', url)
    assert 'password authentication failed' in attempt(front, wrong)


def test_powering_off_the_active_front_end(deployed):
    """The plug is pulled on the active front end's host: the other takes over; back, it stands by."""
    hosts = deployed['hosts']
    wait_for(lambda: _workers_alive(deployed) >= {'node1', 'node2', 'node1-semaphore'}, timeout=60, what='workers')
    dead, other = _active_and_standby(deployed)
    before = f'https://{dead.addr}:6443'
    standby = f'https://{other.addr}:6443'
    assert _direct(deployed, standby + '/health') == (503, before)
    dead.pull_plug()
    cut = time.monotonic()
    wait_for(lambda: _workers_alive(deployed) >= {'node1', 'node2', 'node1-semaphore'} and deployed['active'] == standby,
             timeout=60, what='the other front end to take over, with every worker')
    print(f'takeover with every worker: {time.monotonic() - cut:.1f} s')
    status, run = get(deployed, '/job_start?job_name=where&tag=t4&wait=60', timeout=30)
    assert status == 200 and sorted(run['workers']) == ['node1', 'node2'], run
    # The chain's handler calls go to the front end that is left: the fan-in releases once.
    wait_for(lambda: all('finished t4' in _lines(hosts[n], 'finish.txt') for n in ('node1', 'node2')),
             timeout=60, what='the fan-in through the other front end')
    assert sum(_lines(hosts[n], 'finish.txt').count('finished t4') for n in ('node1', 'node2')) == 2
    # Powered on again, the old front end's broker stands by and names the active one.
    dead.plug_in()
    wait_for(lambda: _direct(deployed, before + '/health') == (503, standby), timeout=60,
             what='the old front end to stand by')
    assert get(deployed, '/health', timeout=10)[0] == 200 and deployed['active'] == standby


def _direct(deployed, url: str) -> tuple[int, str | None]:
    """GET one front end's URL only: (status, the active front end it names if it stands by)."""
    try:
        with urllib.request.urlopen(url, timeout=10, context=deployed['context']) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, json.load(e).get('active')
    except OSError:
        return 0, None


def journals(hosts) -> str:
    """The jobz units' recent logs on every host, for a failure message."""
    return '\n'.join(f'--- {h.name}\n' + h.ssh("journalctl -u 'jobz-*' -n 40 --no-pager").stdout for h in hosts)


def _lines(host, name: str) -> list[str]:
    try:
        with open(os.path.join(host.root, 'var/lib/jobz', name)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _restarts(host) -> int:
    out = host.ssh('systemctl show -p NRestarts --value jobz-worker@' + host.name, check=True).stdout
    return int(out.strip() or 0)


def get(deployed, path: str, timeout: float = 90) -> tuple[int, dict]:
    """GET over HTTPS with the tester's client certificate: (status, JSON), from the active front end.

    As a client given both URLs does: the one that answered last first; a standby's 503 or a front
    end that is down sends it to the other."""
    urls = sorted(deployed['urls'], key=lambda u: u != deployed.get('active'))
    for i, url in enumerate(urls):
        last = i == len(urls) - 1
        try:
            with urllib.request.urlopen(url + path, timeout=timeout, context=deployed['context']) as r:
                deployed['active'] = url
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            if e.code != 503 or last:
                return e.code, json.load(e)
        except OSError:
            if last:
                raise


def active(deployed) -> str:
    """The URL of the front end whose broker is active now."""
    status, _ = get(deployed, '/health', timeout=10)
    assert status == 200
    return deployed['active']


def _active_and_standby(deployed):
    """The front-end hosts: (the active one, the one standing by)."""
    url, hosts = active(deployed), deployed['hosts']
    one, two = hosts['front'], hosts['front2']
    return (one, two) if url == f'https://{one.addr}:6443' else (two, one)


def _workers_alive(deployed) -> set:
    try:
        status, workers = get(deployed, '/workers', timeout=5)
    except OSError:
        return set()
    return {n for n, w in workers.items() if w['alive']} if status == 200 else set()


def test_ansible_lint_production_profile():
    lint = os.path.join(os.path.dirname(sys.executable), 'ansible-lint')
    done = subprocess.run([lint, '--offline', '--profile', 'production', '--nocolor'],
                          cwd=os.path.join(ROOT, 'ansible'), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PATH=os.path.dirname(sys.executable) + ':' + os.environ['PATH']))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
