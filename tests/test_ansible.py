"""Deploy with Ansible onto three real hosts (systemd-nspawn containers with systemd), then use them.

The front end (Mongrel2, broker, semaphore) and two worker hosts, deployed the secure way: HTTPS
with client certificates from our own CA, CURVE between broker and agents, plain HTTP on the front
end's loopback only. Deploy; deploy again and nothing changes; a trigger over HTTPS runs on both
worker hosts and chains into a fan-in semaphore; a killed worker is restarted by systemd and
catches up; a rebooted host comes back.
"""
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, wait_for
from hosts import Hosts
from jobz import ca, keys

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
pytestmark = pytest.mark.timeout(900)


def playbook(inventory: str, wheel: str, log: str) -> dict:
    """Run site.yml; return the recap per host: {host: {'changed': n, 'failed': n, ...}}."""
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING='False', ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0',
               ANSIBLE_PIPELINING='True',    # one ssh round trip per task, not three or four
               ANSIBLE_RETRY_FILES_ENABLED='False', PATH=os.path.dirname(sys.executable) + ':' + os.environ['PATH'])
    done = subprocess.run([ANSIBLE, '-i', inventory, os.path.join(ROOT, 'ansible', 'site.yml'),
                           '-e', f'jobz_wheel={wheel}'], capture_output=True, text=True, env=env, timeout=600)
    with open(log, 'a') as f:
        f.write(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    recap = {}
    for host, counts in re.findall(r'^(\S+)\s+:\s+(ok=.*)$', done.stdout, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r'(\w+)=(\d+)', counts)}
    return recap


@pytest.fixture(scope='module')
def deployed(tmp_path_factory):
    work = tmp_path_factory.mktemp('deploy')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', str(work / 'dist'), ROOT],
                   check=True, capture_output=True, timeout=300)
    wheel = str(next((work / 'dist').glob('jobz-*.whl')))
    (work / 'catalog').mkdir()
    (work / 'catalog' / 'jobs.yaml').write_text(CATALOG)
    with Hosts(['front', 'node1', 'node2'], str(work / 'hosts')) as hosts:
        front = hosts['front']
        pki, kdir = str(work / 'ca'), str(work / 'keys')
        agents = ['node1', 'node2', 'front-semaphore']
        ca.main(['--dir', pki, 'init'])
        ca.main(['--dir', pki, 'server', 'jobz-tls', '--host', front.addr])
        for name in agents + ['tester']:
            ca.main(['--dir', pki, 'client', name])
        for name in ['broker'] + agents:
            keys.main(['new', name, '--dir', kdir])
        inventory = {'all': {
            'vars': {'ansible_user': 'root', 'ansible_ssh_private_key_file': hosts.key,
                     'ansible_python_interpreter': '/usr/bin/python3',
                     'ansible_ssh_common_args': '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null',
                     'ansible_control_path_dir': hosts.control_dir,
                     'jobz_apt_update': False,        # the hosts have no route to a mirror
                     'jobz_ca_dir': pki, 'jobz_curve_keys': kdir,
                     'jobz_front_jobs_dir': str(work / 'catalog'),
                     'jobz_semaphore_jobs_dir': str(work / 'catalog')},
            'children': {
                'jobz_front': {'hosts': {'front': {'ansible_host': front.addr, 'jobz_front_zmq_bind': front.addr,
                                                   'jobz_front_clients': ['tester']}}},
                'jobz_semaphores': {'hosts': {'front': {}}},
                'jobz_workers': {'hosts': {
                    name: {'ansible_host': hosts[name].addr,
                           'jobz_workers': [{'name': name, 'jobs': [str(work / 'catalog' / 'jobs.yaml')]}]}
                    for name in ('node1', 'node2')}}}}}
        path = str(work / 'inventory.yml')
        with open(path, 'w') as f:
            yaml.safe_dump(inventory, f)
        first = playbook(path, wheel, str(work / 'ansible.log'))
        second = playbook(path, wheel, str(work / 'ansible.log'))
        context = ssl.create_default_context(cafile=f'{pki}/ca.crt')
        context.load_cert_chain(f'{pki}/clients/tester.crt', f'{pki}/clients/tester.key')
        yield {'hosts': hosts, 'url': f'https://{front.addr}:6443', 'context': context,
               'pki': pki, 'first': first, 'second': second}


def test_second_deploy_changes_nothing(deployed):
    assert set(deployed['second']) == {'front', 'node1', 'node2'}
    assert all(r['changed'] == 0 and r['failed'] == 0 for r in deployed['second'].values()), \
        f"{deployed['second']}\n{journals(deployed['hosts'])}"
    assert all(r['changed'] > 0 for r in deployed['first'].values())


def test_trigger_runs_on_both_hosts_and_fans_in(deployed):
    hosts = deployed['hosts']
    try:
        wait_for(lambda: _workers_alive(deployed) >= {'node1', 'node2', 'front-semaphore'}, timeout=60,
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
    assert release['job'] == 'finish' and release['triggered_by'] == 'front-semaphore'


def test_what_operators_see_on_the_deployment(deployed):
    """The status page, /metrics and the jobz command line over HTTPS; logfmt records in journald."""
    request = urllib.request.Request(deployed['url'] + '/', headers={'Accept': 'text/html'})
    with urllib.request.urlopen(request, timeout=30, context=deployed['context']) as r:
        assert r.headers['Content-Type'].startswith('text/html') and r.read().startswith(b'<!doctype html>')
    with urllib.request.urlopen(deployed['url'] + '/metrics', timeout=30, context=deployed['context']) as r:
        samples = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    assert samples['jobz_workers_connected'] >= 3
    pki = deployed['pki']
    cli = subprocess.run([sys.executable, '-m', 'jobz.client', '--url', deployed['url'],
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


def test_rebooted_host_comes_back(deployed):
    node1 = deployed['hosts']['node1']
    node1.poweroff_and_boot()
    wait_for(lambda: node1.ssh('systemctl is-active jobz-worker@node1').stdout.strip() == 'active',
             timeout=120, what='the worker to start at boot')
    wait_for(lambda: 'node1' in _workers_alive(deployed), timeout=60, what='node1 back at the broker')
    status, run = get(deployed, '/job_start?job_name=where&tag=t3&wait=60')
    assert status == 200 and run['state'] == 'succeeded'
    assert 't3 node1' in _lines(node1, 'where.txt')


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
    """GET over HTTPS with the tester's client certificate: (status, JSON)."""
    try:
        with urllib.request.urlopen(deployed['url'] + path, timeout=timeout, context=deployed['context']) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


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
