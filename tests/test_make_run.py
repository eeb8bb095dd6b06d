"""`make run` as a newcomer meets it: what it installs, two stacks side by side on one host, quiet
logs, and clear errors when a port or the state folder is taken."""
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, http, wait_for
from jobz.harness import free_run
from jobz.stack import ports_in_use


def dry_run(target: str) -> tuple[set, list]:
    """What `make TARGET` would install on a bare machine: (Debian packages, pip install arguments)."""
    out = subprocess.run(['make', '-n', '-B', target], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         check=True).stdout
    debs = {pair.split(':', 1)[1] for pairs in re.findall(r'for pair in ([^;]*); do', out) for pair in pairs.split()}
    if 'missing="$missing python3-venv"' in out:
        debs.add('python3-venv')
    return debs, re.findall(r'pip install -q -e (\S+)', out)


def test_make_run_installs_only_what_running_needs():
    debs, pip = dry_run('run')
    assert debs == {'mongrel2-core', 'curl', 'python3-venv'}
    assert pip == ['.']    # jobz with pyzmq and PyYAML: no test tools
    debs, pip = dry_run('test')
    assert {'chromium', 'postgresql', 'nftables', 'systemd-container', 'mmdebstrap', 'openssh-client'} <= debs
    assert "'.[test]'" in pip


class MakeRun:
    """`python -m jobz.stack` as `make run` runs it, with JOBZ_PORT and JOBZ_HOME."""

    def __init__(self, port: int, home: str):
        self.port, self.home, self.url = port, home, f'http://127.0.0.1:{port}'
        env = dict(os.environ, JOBZ_PORT=str(port), JOBZ_HOME=home, JOBZ_JOBS=os.path.join(ROOT, 'jobs'))
        for name in ('JOBZ_PUB_PORT', 'JOBZ_ROUTER_PORT', 'JOBZ_TLS_PORT', 'JOBZ_CA'):
            env.pop(name, None)
        self.proc = subprocess.Popen([sys.executable, '-m', 'jobz.stack'], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def up(self) -> bool:
        try:
            return http(self.url + '/health', timeout=2)[1].get('workers', 0) >= 2
        except OSError:
            return False

    def stop(self) -> str:
        """SIGTERM, then everything it said."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=30)[0]


@pytest.fixture
def make_run():
    started = []

    def start(port: int, home: str) -> MakeRun:
        started.append(MakeRun(port, home))
        return started[-1]
    yield start
    for s in started:
        s.stop()


def test_two_stacks_side_by_side_then_clear_errors_for_a_taken_port_or_folder(tmp_path, make_run):
    one, two = make_run(free_run(3), str(tmp_path / 'one')), make_run(free_run(3), str(tmp_path / 'two'))
    wait_for(lambda: one.up() and two.up(), 30, 'both stacks', procs=[one.proc, two.proc])
    for s in (one, two):
        status, run = http(s.url + '/job_start?job_name=hello&date=2026_11_28&wait=20')
        assert status == 200 and run['state'] == 'succeeded', run
        # Its broker's ports follow JOBZ_PORT.
        assert ports_in_use('127.0.0.1', [s.port + 1, s.port + 2]) == [s.port + 1, s.port + 2]
    # A third on the first one's ports, in a folder of its own: refused before it starts anything.
    third = make_run(one.port, str(tmp_path / 'three'))
    assert third.proc.wait(timeout=30) == 1
    said = third.stop()
    assert f'port {one.port}, {one.port + 1}, {one.port + 2} already in use' in said and 'JOBZ_PORT' in said, said
    # A fourth in the first one's folder, on ports of its own: refused too.
    fourth = make_run(free_run(3), one.home)
    assert fourth.proc.wait(timeout=30) == 1
    said = fourth.stop()
    assert f'--home {one.home}: another stack runs there (pid {one.proc.pid}' in said, said
    # Stopped, each said nothing alarming, and kept none of Mongrel2's harmless start-up errors.
    for s in (one, two):
        said = s.stop()
        assert s.proc.returncode == 0, said
        assert 'level=error' not in said and 'level=warning' not in said and '[ERROR]' not in said, said
        with open(os.path.join(s.home, 'mongrel2.out')) as f:
            kept = f.read()
        assert 'All loaded up' in kept and '[ERROR]' not in kept, kept
