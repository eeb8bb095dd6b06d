"""Deploy with Ansible onto three real hosts (systemd-nspawn containers with systemd), then use them.

The front end (Mongrel2, broker, semaphore) and two worker hosts. Deploy; deploy again and
nothing changes; a trigger over HTTP runs on both worker hosts and chains into a fan-in
semaphore; a killed worker is restarted by systemd and catches up; a rebooted host comes back.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, http, wait_for
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
pytestmark = pytest.mark.timeout(900)


def playbook(inventory: str, wheel: str, log: str) -> dict:
    """Run site.yml; return the recap per host: {host: {'changed': n, 'failed': n, ...}}."""
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING='False', ANSIBLE_NOCOLOR='1', ANSIBLE_FORCE_COLOR='0',
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
        inventory = {'all': {
            'vars': {'ansible_user': 'root', 'ansible_ssh_private_key_file': hosts.key,
                     'ansible_python_interpreter': '/usr/bin/python3',
                     'ansible_ssh_common_args': '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null',
                     'ansible_control_path_dir': hosts.control_dir,
                     'jobz_apt_update': False,        # the hosts have no route to a mirror
                     'jobz_front_jobs_dir': str(work / 'catalog'),
                     'jobz_semaphore_jobs_dir': str(work / 'catalog')},
            'children': {
                'jobz_front': {'hosts': {'front': {'ansible_host': front.addr, 'jobz_front_http_bind': front.addr,
                                                   'jobz_front_zmq_bind': front.addr}}},
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
        yield {'hosts': hosts, 'url': f'http://{front.addr}:6769', 'first': first, 'second': second}


def test_second_deploy_changes_nothing(deployed):
    assert set(deployed['second']) == {'front', 'node1', 'node2'}
    assert all(r['changed'] == 0 and r['failed'] == 0 for r in deployed['second'].values()), deployed['second']
    assert all(r['changed'] > 0 for r in deployed['first'].values())


def test_trigger_runs_on_both_hosts_and_fans_in(deployed):
    url, hosts = deployed['url'], deployed['hosts']
    wait_for(lambda: _workers_alive(url) >= {'node1', 'node2', 'front-semaphore'}, timeout=60, what='workers')
    status, run = http(url + '/job_start?job_name=where&tag=t1&wait=60')
    assert status == 200, run
    assert sorted(run['workers']) == ['node1', 'node2']
    for name in ('node1', 'node2'):        # the files are in each container's own root
        assert 't1 ' + name in _lines(hosts[name], 'where.txt')
    # The semaphore released `finish` once both had reported; it runs on both hosts too.
    wait_for(lambda: all('finished t1' in _lines(hosts[n], 'finish.txt') for n in ('node1', 'node2')),
             timeout=60, what='the fan-in')
    assert sum(_lines(hosts[n], 'finish.txt').count('finished t1') for n in ('node1', 'node2')) == 2


def test_killed_worker_is_restarted_and_catches_up(deployed):
    url, node2 = deployed['url'], deployed['hosts']['node2']
    before = _restarts(node2)
    node2.ssh('systemctl kill -s KILL jobz-worker@node2', check=True)
    # Published while node2's worker is down: it must still run there once systemd restarts it.
    status, run = http(url + '/job_start?job_name=where&tag=t2')
    assert status == 200
    wait_for(lambda: _restarts(node2) > before, timeout=30, what='systemd to restart the worker')
    wait_for(lambda: 't2 node2' in _lines(node2, 'where.txt'), timeout=60, what='the worker to catch up')
    assert _lines(node2, 'where.txt').count('t2 node2') == 1


def test_rebooted_host_comes_back(deployed):
    url, node1 = deployed['url'], deployed['hosts']['node1']
    node1.poweroff_and_boot()
    wait_for(lambda: node1.ssh('systemctl is-active jobz-worker@node1').stdout.strip() == 'active',
             timeout=120, what='the worker to start at boot')
    wait_for(lambda: 'node1' in _workers_alive(url), timeout=60, what='node1 back at the broker')
    status, run = http(url + '/job_start?job_name=where&tag=t3&wait=60')
    assert status == 200 and run['state'] == 'succeeded'
    assert 't3 node1' in _lines(node1, 'where.txt')


def _lines(host, name: str) -> list[str]:
    try:
        with open(os.path.join(host.root, 'var/lib/jobz', name)) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _restarts(host) -> int:
    out = host.ssh('systemctl show -p NRestarts --value jobz-worker@' + host.name, check=True).stdout
    return int(out.strip() or 0)


def _workers_alive(url: str) -> set:
    try:
        status, workers = http(url + '/workers', timeout=5)
    except OSError:
        return set()
    return {n for n, w in workers.items() if w['alive']} if status == 200 else set()


def test_ansible_lint_production_profile():
    lint = os.path.join(os.path.dirname(sys.executable), 'ansible-lint')
    done = subprocess.run([lint, '--offline', '--profile', 'production', '--nocolor'],
                          cwd=os.path.join(ROOT, 'ansible'), capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PATH=os.path.dirname(sys.executable) + ':' + os.environ['PATH']))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
