"""The `jobz` command line, run as a real process against a real stack (plain HTTP and HTTPS)."""
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, TestStack, free_port, http, started, wait_for
from jobz import ca

JOBS = r"""
hello:
  command: "echo hello %(who)s; echo %(who)s >> {out}/hello.txt"
fails:
  command: "echo first words; echo last words >&2; exit 7"
dated:
  command: "true"
  params:
    date: '\d{4}_\d{2}_\d{2}'
big:
  command: "seq 1 3000"
steps:
  command: "echo step one; while [ ! -e {out}/go-%(tag)s ]; do sleep 0.05; done; echo step two"
  timeout: 60
both:
  command: "echo from $JOBZ_WORKER"
bigboth:
  command: "seq 1 100"
  topic: both
"""


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    """Our CA, a server certificate for 127.0.0.1, and the client alice, enrolled."""
    root = tmp_path_factory.mktemp('cli-pki')
    folder = str(root / 'ca')
    ca.main(['--dir', folder, 'init'])
    ca.main(['--dir', folder, 'server', 'jobz-tls', '--host', '127.0.0.1'])
    ca.main(['--dir', folder, 'client', 'alice'])
    clients = str(root / 'clients')
    os.makedirs(clients)
    shutil.copy(f'{folder}/clients/alice.crt', clients)
    return {'ca': folder, 'clients': clients}


@pytest.fixture(scope='module')
def stack(pki, tmp_path_factory):
    stack = TestStack(str(tmp_path_factory.mktemp('cli')), JOBS, tls=pki['ca'], tls_port=free_port(),
                      clients=pki['clients'])
    # w2 keeps only the last 20 characters of a run's output
    with started(stack, ['w1', ('w2', ['--topics', 'both', '--output-max', '20', '--output-tail', '20'])],
                 semaphore=False) as s:
        yield s


def jobz(stack, *args, url=None, timeout=30):
    """Run the CLI to its end: the CompletedProcess (text)."""
    env = os.environ | {'JOBZ_URL': url or stack.url}
    return subprocess.run([sys.executable, '-m', 'jobz.client', *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def start(stack, *args) -> str:
    """Start a run with the CLI; its run id."""
    r = jobz(stack, '--json', 'start', *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)['run_id']


def go(stack, tag):
    """Let the `steps` job with this tag finish."""
    open(os.path.join(stack.out, f'go-{tag}'), 'w').close()


class Running:
    """A CLI process whose stdout (or a pty for its stderr) is read as it comes, by a thread."""

    def __init__(self, stack, *args, tty_stderr=False):
        env = os.environ | {'JOBZ_URL': stack.url}
        self.text, self.fd = '', None
        if tty_stderr:
            self.fd, child = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, '-m', 'jobz.client', *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE if not tty_stderr else subprocess.DEVNULL,
                                     stderr=child if tty_stderr else subprocess.DEVNULL)
        if tty_stderr:
            os.close(child)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            if self.fd is None:
                chunk = self.proc.stdout.read(1)
            else:
                try:
                    chunk = os.read(self.fd, 4096).decode() if select.select([self.fd], [], [], 10)[0] else ''
                except OSError:     # EIO: the process closed the terminal
                    chunk = ''
            if not chunk:
                return
            self.text += chunk

    def wait_text(self, text, timeout=15):
        wait_for(lambda: text in self.text, timeout, f'{text!r} from the CLI (got {self.text!r})')

    def finish(self, timeout=15) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(timeout)
        return rc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.fd is not None:
            os.close(self.fd)


@pytest.fixture
def running():
    procs = []

    def run(*args, **kw):
        procs.append(Running(*args, **kw))
        return procs[-1]
    yield run
    for p in procs:
        p.close()


def test_start_wait_runs_the_command_and_exits_0(stack):
    r = jobz(stack, 'start', 'hello', 'who=a+b=c', '--wait')
    assert r.returncode == 0, r.stderr
    assert 'succeeded' in r.stdout and r.stderr == ''     # not a terminal: no progress lines
    assert 'a+b=c' in stack.lines('hello.txt')               # URL-encoded: '+' is not a space


def test_start_warns_about_sanitized_values(stack):
    r = jobz(stack, 'start', 'hello', 'who=ann;marie', '--wait')
    assert (r.returncode, r.stderr) == (0, 'jobz: warning: characters removed from who\n')
    assert 'annmarie' in stack.lines('hello.txt')


def test_start_wait_failure_exits_1_with_reason_and_output(stack):
    r = jobz(stack, 'start', 'fails', '--wait')
    assert r.returncode == 1
    assert 'failed' in r.stderr and 'w1' in r.stderr and 'rc 7' in r.stderr
    assert 'last words' in r.stderr
    assert 'Traceback' not in r.stderr


def test_start_wait_timeout_exits_3(stack):
    r = jobz(stack, 'start', 'steps', 'tag=timeout', '--wait', '--timeout', '0.5')
    go(stack, 'timeout')
    assert r.returncode == 3, r.stderr
    assert 'still running' in r.stderr or 'still pending' in r.stderr


def test_start_wait_shows_progress_on_a_terminal(stack, running):
    cli = running(stack, 'start', 'steps', 'tag=tty', '--wait', tty_stderr=True)
    cli.wait_text('0/1 workers done, 1 running')
    assert cli.proc.poll() is None
    go(stack, 'tty')
    assert cli.finish() == 0
    assert '\r' in cli.text


def test_json_start_and_idempotency_key(stack):
    run_id = start(stack, 'hello', 'who=bob', '--key', 'cli-once')
    r = jobz(stack, '--json', 'start', 'hello', 'who=bob', '--key', 'cli-once')
    again = json.loads(r.stdout)
    assert (again['run_id'], again['existing']) == (run_id, True)
    r = jobz(stack, 'start', 'hello', 'who=bob', '--key', 'cli-once', '--wait', '--json')
    final = json.loads(r.stdout)
    assert r.returncode == 0 and (final['run_id'], final['state']) == (run_id, 'succeeded')
    assert stack.lines('hello.txt').count('bob') == 1


def test_status_shows_workers_params_and_who(stack):
    run_id = start(stack, 'fails', 'tag=st')
    stack.wait_run(run_id)
    r = jobz(stack, 'status', run_id)
    assert r.returncode == 0, r.stderr
    assert f'run {run_id}: failed' in r.stdout
    assert 'tag=st' in r.stdout and 'plain:127.0.0.1' in r.stdout
    assert any(line.split()[:3] == ['w1', 'failed', 'rc'] for line in r.stdout.splitlines())
    r = jobz(stack, 'status', run_id, '--json')     # a global option after the command
    assert json.loads(r.stdout)['workers']['w1']['rc'] == 7


def test_unknown_run_prints_the_404_message(stack):
    r = jobz(stack, 'status', 'no-such-run')
    assert (r.returncode, r.stderr) == (1, "jobz: error: unknown run 'no-such-run'\n")


def test_runs_lists_the_run(stack):
    run_id = start(stack, 'hello', 'who=runs')
    stack.wait_run(run_id)
    r = jobz(stack, 'runs', '--job', 'hello', '--limit', '5')
    assert r.returncode == 0, r.stderr
    header, first = r.stdout.splitlines()[:2]
    assert header.split()[:3] == ['RUN', 'JOB', 'STATE']
    assert first.split()[:3] == [run_id, 'hello', 'succeeded'] and '1/1' in first
    r = jobz(stack, '--json', 'runs', '--job', 'hello', '--limit', '1')
    assert [run['run_id'] for run in json.loads(r.stdout)['runs']] == [run_id]


def test_workers_and_jobs(stack):
    r = jobz(stack, 'workers')
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    assert rows['w1'][1] == 'yes' and rows['w2'][1:3] == ['yes', 'both']
    r = jobz(stack, 'jobs')
    assert r.returncode == 0, r.stderr
    assert 'dated  (topic dated)' in r.stdout and r"date ~ '\d{4}_\d{2}_\d{2}'" in r.stdout


def test_bad_parameter_prints_the_brokers_400_message(stack):
    status, body = http(stack.url + '/job_start?job_name=dated&date=yesterday')
    assert status == 400
    r = jobz(stack, 'start', 'dated', 'date=yesterday')
    assert (r.returncode, r.stderr) == (1, f"jobz: error: {body['error']}\n")


def test_usage_errors_exit_2(stack):
    for args in (['start', 'hello', 'not-key-value'], ['start'], ['start', 'hello', 'wait=3'], ['nope'],
                 ['--url', 'ftp://x', 'runs']):
        r = jobz(stack, *args)
        assert r.returncode == 2, args
        assert 'usage:' in r.stderr and 'Traceback' not in r.stderr


def test_unreachable_front_end_is_a_clean_error(stack):
    url = f'http://127.0.0.1:{free_port()}'
    r = jobz(stack, 'runs', url=url)
    assert r.returncode == 1
    assert r.stderr.startswith(f'jobz: error: cannot reach {url}: ') and r.stderr.count('\n') == 1


def test_logs_prints_the_whole_output(stack):
    run_id = start(stack, 'big')
    stack.wait_run(run_id)
    expected = ''.join(f'{i}\n' for i in range(1, 3001))
    assert len(expected) > 4096        # more than the output tail in /job_status
    r = jobz(stack, 'logs', run_id)
    assert (r.returncode, r.stdout) == (0, expected), r.stderr
    answer = json.loads(jobz(stack, 'logs', run_id, '--json').stdout)
    assert answer['workers']['w1']['output'] == expected


def test_logs_heads_each_workers_output(stack):
    run_id = start(stack, 'both')
    stack.wait_run(run_id)
    r = jobz(stack, 'logs', run_id)
    assert r.stdout == '==> w1 <==\nfrom w1\n\n==> w2 <==\nfrom w2\n'
    r = jobz(stack, 'logs', run_id, '--worker', 'w2')
    assert r.stdout == 'from w2\n'


def test_logs_says_when_the_start_of_the_output_was_not_kept(stack):
    run_id = start(stack, 'bigboth')
    stack.wait_run(run_id)
    full = ''.join(f'{i}\n' for i in range(1, 101))
    r = jobz(stack, 'logs', run_id, '--worker', 'w2')
    assert (r.returncode, r.stdout) == (0, full[-20:])
    assert f'w2: {len(full) - 20} characters of output were not kept' in r.stderr
    assert jobz(stack, 'logs', run_id, '--worker', 'w1').stdout == full


def test_logs_follow_prints_output_as_it_comes(stack, running):
    run_id = start(stack, 'steps', 'tag=follow')
    cli = running(stack, 'logs', run_id, '--follow')
    cli.wait_text('step one\n')
    assert 'step two' not in cli.text and cli.proc.poll() is None
    go(stack, 'follow')
    cli.wait_text('step two\n')
    assert cli.finish() == 0
    assert cli.text == 'step one\nstep two\n'


def test_logs_follow_exits_1_when_the_run_failed(stack):
    run_id = start(stack, 'fails')
    r = jobz(stack, 'logs', run_id, '--follow')
    assert r.returncode == 1
    assert 'first words' in r.stdout and 'last words' in r.stdout


def test_https_with_a_client_certificate(stack, pki):
    tls = ['--url', stack.tls_url, '--cert', f"{pki['ca']}/clients/alice.crt",
           '--key', f"{pki['ca']}/clients/alice.key", '--ca', f"{pki['ca']}/ca.crt"]
    r = jobz(stack, *tls, '--json', 'start', 'hello', 'who=tls', '--wait')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['triggered_by'] == 'alice'
    assert 'tls' in stack.lines('hello.txt')


def test_https_without_a_client_certificate_fails_cleanly(stack, pki):
    before = len(stack.runs('hello'))
    r = jobz(stack, '--url', stack.tls_url, '--ca', f"{pki['ca']}/ca.crt", 'start', 'hello', 'who=nocert')
    assert r.returncode == 1
    assert r.stderr.startswith(f'jobz: error: cannot reach {stack.tls_url}: ') and 'Traceback' not in r.stderr
    assert '--cert' in r.stderr
    assert len(stack.runs('hello')) == before
