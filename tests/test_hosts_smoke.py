"""Smoke test of tests/hosts.py: containers boot, answer ssh, install offline, reboot, leave nothing."""
import os
import subprocess

import pytest

from conftest import wait_for
from hosts import Hosts

pytestmark = [
    pytest.mark.timeout(900),  # a cold root build downloads and installs a small Debian
    pytest.mark.skipif(os.geteuid() != 0, reason='containers need root'),
    pytest.mark.slow,
]


def leftovers(hosts: Hosts) -> list[str]:
    """What the hosts left behind: namespaces, mounts, processes, links, cgroups."""
    netns = subprocess.run(['ip', 'netns', 'list'], capture_output=True, text=True).stdout
    mounts = subprocess.run(['findmnt', '-rn', '-o', 'TARGET'], capture_output=True, text=True).stdout
    links = subprocess.run(['ip', '-o', 'link', 'show'], capture_output=True, text=True).stdout
    found = []
    for h in hosts:
        found += [h.ns] if h.ns in netns.split() else []
        found += [h.root] if h.root in mounts.split('\n') else []
        found += [f'{h.veth}:'] if f' {h.veth}@' in links or f' {h.veth}:' in links else []
        found += [f'pid {p}' for p in h.processes()]
        found += [d for d in h.cgroups if os.path.exists(d)]
        found += [f'nspawn {h.proc.pid}'] if h.proc and h.proc.poll() is None else []
    found += [f'{hosts.net}.1'] if hosts.net and f' {hosts.net}.1/' in subprocess.run(
        ['ip', '-4', '-o', 'addr', 'show'], capture_output=True, text=True).stdout else []
    return found


def system_state(host) -> str:
    """`systemctl is-system-running` once boot is over (it says starting until then)."""
    state = host.ssh('systemctl is-system-running').stdout.strip()
    return state if state not in ('initializing', 'starting') else ''


def test_hosts_boot_install_offline_reboot_and_clean_up(tmp_path):
    with Hosts(['alpha', 'beta', 'gamma'], str(tmp_path)) as hosts:
        alpha, beta, gamma = hosts
        for h in hosts:
            assert wait_for(lambda: system_state(h), 60, f'{h.name} booted') in ('running', 'degraded'), \
                h.ssh('systemctl --failed --no-legend').stdout
            assert h.ssh('hostname').stdout.strip() == h.name
            assert h.ssh('/usr/bin/python3 -c "import apt, packaging"').returncode == 0
        # The hosts reach each other by name; nothing outside (no route).
        reach = '/usr/bin/python3 -c "import socket; socket.create_connection((\'beta\', 22), 5)"'
        assert alpha.ssh(reach).returncode == 0
        assert 'unreachable' in alpha.ssh('ip route get 1.1.1.1 2>&1').stdout
        # apt works offline from the cached lists and .debs; only that host changes.
        got = alpha.ssh('apt-get install -y mongrel2-core python3-zmq && command -v mongrel2; echo rc=$?')
        assert 'rc=0' in got.stdout, got.stdout + got.stderr
        assert os.path.exists(os.path.join(alpha.root, 'usr/bin/mongrel2'))
        assert beta.ssh('command -v mongrel2').returncode == 1
        # A host powers off and boots again: /run is new, the disk is kept.
        beta.ssh('touch /run/marker /root/marker', check=True)
        beta.poweroff_and_boot()
        assert beta.ssh('test -e /run/marker').returncode == 1
        assert beta.ssh('test -e /root/marker').returncode == 0
        assert wait_for(lambda: system_state(beta), 60, 'beta booted again') in ('running', 'degraded')
        assert gamma.ssh('true').returncode == 0
        inventory = hosts.inventory()
        assert f'ansible_host: {gamma.addr}' in inventory and '/usr/bin/python3' in inventory
        print('timings', hosts.timings, 'reboot', beta.boot_seconds)
    assert leftovers(hosts) == []
    print('teardown', hosts.timings['teardown'])


def test_hosts_clean_up_after_failed_test_and_failed_setup(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with Hosts(['one'], str(tmp_path / 'a')) as hosts:
            1 / 0
    assert leftovers(hosts) == []
    failing = Hosts(['one', 'two'], str(tmp_path / 'b'), boot_timeout=0)  # no time to boot
    with pytest.raises(TimeoutError):
        with failing:
            pass
    assert leftovers(failing) == []
