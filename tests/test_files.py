"""Where jobz keeps state and secrets: folders of its own, files only it can read, no writing
through links someone else planted, and folders re-read without tripping on a file just removed."""
import os
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, wait_for
from jobz import ca, keys

JOBS = 'quick:\n  command: "true"\ngate:\n  semaphore: {count: 1}\n'
DAEMON = 1    # uid and gid of Debian's `daemon` account: "another local user"


def run_script(script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=30, env=env)


@pytest.fixture
def jobs(tmp_path):
    path = tmp_path / 'jobs.yaml'
    path.write_text(JOBS)
    return str(path)


@pytest.mark.parametrize('script', ['broker.py', 'worker.py', 'semaphore.py'])
def test_a_state_folder_of_someone_else_or_a_link_is_refused(tmp_path, jobs, script):
    theirs = tmp_path / 'theirs'
    theirs.mkdir()
    os.chown(theirs, DAEMON, DAEMON)
    link = tmp_path / 'link'
    link.symlink_to(tmp_path / 'elsewhere')
    shared = tmp_path / 'shared'
    shared.mkdir()
    shared.chmod(0o777)
    extra = ['--name', 's1'] if script == 'semaphore.py' else []
    for home, why in ((theirs, f'owned by uid {DAEMON}'), (link, 'symbolic link'), (shared, 'written by others')):
        got = run_script(script, '--jobs', jobs, '--home', str(home), *extra)
        assert got.returncode != 0 and why in got.stderr, got.stderr
    assert os.listdir(theirs) == [] and not os.path.lexists(tmp_path / 'elsewhere') and os.listdir(shared) == []


def test_the_stack_refuses_a_home_someone_else_made(tmp_path):
    """Before: a home made by another user got the TLS server key written into it."""
    home = tmp_path / 'var'
    home.mkdir()
    os.chown(home, DAEMON, DAEMON)
    env = dict(os.environ, JOBZ_HOME=str(home), JOBZ_PORT=str(free_port()), JOBZ_JOBS=os.path.join(ROOT, 'jobs'))
    proc = subprocess.Popen([sys.executable, '-m', 'jobz.stack'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()    # it started after all: SIGTERM stops the stack and every process it started
        _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and f'owned by uid {DAEMON}' in err, err
    assert os.listdir(home) == []


def test_databases_are_private(make_stack):
    stack = make_stack(JOBS, workers=('w1',))
    stack.wait_run(stack.start_job('job_name=quick')['run_id'])
    assert stat.S_IMODE(os.stat(stack.home).st_mode) == 0o700
    for name in ('journal.db', 'journal.db-wal', 'worker-w1.db', 'worker-w1.db-wal'):
        path = os.path.join(stack.home, name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name


def test_an_older_readable_database_is_made_private(tmp_path, jobs):
    home = tmp_path / 'home'
    home.mkdir(mode=0o700)
    db = home / 'worker-w1.db'
    db.touch(mode=0o644)
    os.chmod(db, 0o644)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'worker.py'), '--name', 'w1', '--jobs', jobs,
                             '--home', str(home), '--router', f'tcp://127.0.0.1:{free_port()}',
                             '--pub', f'tcp://127.0.0.1:{free_port()}'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: stat.S_IMODE(os.stat(db).st_mode) == 0o600, what='the database made private')
    finally:
        proc.terminate()
        proc.wait(15)


def test_secret_keys_are_private_from_their_first_byte(tmp_path, monkeypatch):
    """No chmod after the fact: the file never exists with a mode others can read, whatever the umask."""
    def no_chmod(*args, **kw):
        raise AssertionError('a key file was chmodded after it was written')
    monkeypatch.setattr(os, 'chmod', no_chmod)
    old = os.umask(0)
    try:
        keys.main(['new', 'w1', '--dir', str(tmp_path / 'keys')])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / 'keys' / 'w1.key_secret').st_mode) == 0o600


def test_a_planted_link_at_a_key_path_is_not_written_through(tmp_path, capsys):
    kdir = tmp_path / 'keys'
    kdir.mkdir(mode=0o700)
    target = tmp_path / 'target'    # where someone would like our secret to go
    (kdir / 'w1.key_secret').symlink_to(target)
    with pytest.raises(SystemExit, match='exists'):
        keys.main(['new', 'w1', '--dir', str(kdir)])
    assert not os.path.lexists(target)
    folder = tmp_path / 'ca'
    assert ca.main(['--dir', str(folder), 'init']) == 0
    (folder / 'clients').mkdir(mode=0o700)
    (folder / 'clients' / 'alice.key').symlink_to(target)
    assert ca.main(['--dir', str(folder), 'client', 'alice']) == 1
    assert 'exists' in capsys.readouterr().err
    assert not os.path.lexists(target)


def test_a_key_or_certificate_removed_while_the_broker_reads_its_folder(make_stack, tmp_path):
    """Before: FileNotFoundError out of the broker's clock work, which ended the broker."""
    kdir, enrolled, clients = tmp_path / 'keys', tmp_path / 'enrolled', tmp_path / 'clients'
    clients.mkdir()
    for name in ('broker', 'w1', 'w2'):
        keys.main(['new', name, '--dir', str(kdir)])
    keys.main(['enroll', str(kdir / 'w1.key'), '--enrolled', str(enrolled)])
    stack = make_stack(JOBS, start=False)
    stack.broker_args = ['--curve-secret', str(kdir / 'broker.key_secret'), '--enrolled', str(enrolled),
                         '--clients', str(clients)]
    stack.start([('w1', ['--curve-secret', str(kdir / 'w1.key_secret'), '--broker-key', str(kdir / 'broker.key')])],
                semaphore=False)
    # What a file removed between the listing and the reading looks like: a name with nothing behind it.
    (enrolled / 'ghost.key').symlink_to(tmp_path / 'gone.key')
    (clients / 'ghost.crt').symlink_to(tmp_path / 'gone.crt')
    keys.main(['enroll', str(kdir / 'w2.key'), '--enrolled', str(enrolled)])    # a change the broker must see
    log = os.path.join(stack.log_dir, 'broker.log')
    wait_for(lambda: 'enrolled keys: w1, w2' in open(log).read(), what='the broker to re-read the folder')
    assert stack.procs['broker'].poll() is None, open(log).read()[-2000:]
    assert stack.wait_run(stack.start_job('job_name=quick')['run_id'])['state'] == 'succeeded'
