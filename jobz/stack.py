"""Run the whole stack in the foreground: Mongrel2, broker, a local worker, a semaphore.

Used by `make run` and by the tests (with their own ports and folders).
"""
import argparse
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

from . import defaults
from .cli import LogfmtFormatter
from .jobfile import load_jobs

log = logging.getLogger('jobz.stack')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def render_mongrel2_conf(template: str, port: int, m2_recv: str, m2_send: str, bind: str = '127.0.0.1',
                         tls_port: int = defaults.TLS_PORT, m2_tls_recv: str = defaults.M2_TLS_RECV,
                         m2_tls_send: str = defaults.M2_TLS_SEND, tls_bind: str = '0.0.0.0') -> str:
    """mongrel2.conf with our ports and addresses (each must appear exactly once)."""
    swaps = [('port=6769', f'port={port}'),
             (f"send_spec='{defaults.M2_RECV}'", f"send_spec='{m2_recv}'"),
             (f"recv_spec='{defaults.M2_SEND}'", f"recv_spec='{m2_send}'"),
             ("bind_addr='127.0.0.1'", f"bind_addr='{bind}'"),
             (f'port={defaults.TLS_PORT}', f'port={tls_port}'),
             (f"send_spec='{defaults.M2_TLS_RECV}'", f"send_spec='{m2_tls_recv}'"),
             (f"recv_spec='{defaults.M2_TLS_SEND}'", f"recv_spec='{m2_tls_send}'"),
             ("bind_addr='0.0.0.0'", f"bind_addr='{tls_bind}'")]
    for i, (old, _) in enumerate(swaps):    # mark every spot first, so no new value is matched again
        if template.count(old) != 1:
            raise ValueError(f'mongrel2.conf: expected {old!r} exactly once')
        template = template.replace(old, f'\0{i}\0')
    for i, (_, new) in enumerate(swaps):
        template = template.replace(f'\0{i}\0', new)
    return template


def _has_server(db: str) -> bool:
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute('SELECT count(*) FROM server').fetchone()[0] > 0
    except sqlite3.Error:
        return False


class Stack:
    """The processes of one jobz installation, started and stopped together."""

    def __init__(self, home: str, jobs: list[str], port: int = defaults.PORT, ports: dict | None = None,
                 python: str = sys.executable, worker_args=(), mongrel2_conf: str | None = None,
                 log_dir: str | None = None, bind: str = '127.0.0.1', tls: str | None = None,
                 tls_port: int = defaults.TLS_PORT, tls_bind: str = '127.0.0.1', clients: str | None = None):
        self.home = os.path.abspath(home)
        self.jobs = [os.path.abspath(j) for j in jobs]
        self.port = port
        self.ports = {'pub': 6770, 'router': 6771, 'm2_recv': 6772, 'm2_send': 6773,
                      'm2_tls_recv': 6774, 'm2_tls_send': 6775} | (ports or {})
        self.python = python
        self.worker_args = list(worker_args)
        self.mongrel2_conf = mongrel2_conf or os.path.join(ROOT, 'mongrel2.conf')
        self.log_dir = log_dir          # None: processes write to our stdout/stderr
        self.broker_args: list[str] = []
        self.prefix: dict[str, list[str]] = {}    # process name -> argv prefix (say `ip netns exec NS`)
        self.procs: dict[str, subprocess.Popen] = {}
        self.bind = bind                # the one address every server socket binds to
        self.url = f'http://{bind}:{port}'
        self.tls = tls                  # a jobz-ca folder: also run the HTTPS front end
        self.tls_port, self.tls_bind, self.clients = tls_port, tls_bind, clients
        self.tls_url = f'https://{tls_bind}:{tls_port}'

    def addr(self, name: str) -> str:
        # Mongrel2's handler sockets stay on loopback: whoever reaches them can read requests.
        host = '127.0.0.1' if name.startswith('m2_') else self.bind
        return f'tcp://{host}:{self.ports[name]}'

    def links(self) -> list[str]:
        return ['--pub', self.addr('pub'), '--router', self.addr('router'), '--url', self.url]

    def spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        log.info('starting %s', name)
        argv = self.prefix.get(name, []) + list(argv)
        # A process group of its own: Ctrl-C reaches only us, and we stop each process once, in
        # order (a worker that got the terminal's SIGINT and then our TERM would stop cold).
        kw.setdefault('process_group', 0)
        if self.log_dir and 'stdout' not in kw:
            os.makedirs(self.log_dir, exist_ok=True)
            with open(os.path.join(self.log_dir, name + '.log'), 'ab') as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
        else:
            proc = subprocess.Popen(argv, **kw)
        self.procs[name] = proc
        return proc

    def script(self, name: str) -> list[str]:
        return [self.python, os.path.join(ROOT, name)]

    def start_broker(self) -> None:
        self.spawn('broker', self.script('broker.py') + [
            '--jobs', *self.jobs, '--home', self.home, '--pub', self.addr('pub'),
            '--router', self.addr('router'), '--m2-recv', self.addr('m2_recv'),
            '--m2-send', self.addr('m2_send'), *self.broker_args,
            *(['--m2-tls-recv', self.addr('m2_tls_recv'), '--m2-tls-send', self.addr('m2_tls_send')]
              if self.tls else []),
            *(['--clients', self.clients] if self.clients else [])])

    def start_worker(self, name: str, *extra: str) -> None:
        self.spawn(name, self.script('worker.py') + [
            '--name', name, '--jobs', *self.jobs, '--home', self.home, *self.links(),
            *self.worker_args, *extra])

    def start_semaphore(self, name: str = 'semaphore', *extra: str) -> None:
        self.spawn(name, self.script('semaphore.py') + [
            '--name', name, '--jobs', *self.jobs, '--home', self.home, *self.links(), *extra])

    def start_mongrel2(self) -> None:
        chroot = os.path.join(self.home, 'mongrel2')
        for sub in ('logs', 'run', 'tmp'):
            os.makedirs(os.path.join(chroot, sub), exist_ok=True)
        with open(self.mongrel2_conf, encoding='utf-8') as f:
            conf = render_mongrel2_conf(f.read(), self.port, self.addr('m2_recv'), self.addr('m2_send'),
                                        self.bind, self.tls_port, self.addr('m2_tls_recv'),
                                        self.addr('m2_tls_send'), self.tls_bind)
        if self.tls:
            # Mongrel2 reads certdir/<server uuid>.crt/.key and ssl.ca_chain before it chroots.
            certs = os.path.join(chroot, 'certs')
            os.makedirs(certs, mode=0o700, exist_ok=True)
            for src, dst in (('servers/jobz-tls.crt', 'jobz-tls.crt'), ('servers/jobz-tls.key', 'jobz-tls.key'),
                             ('ca.crt', 'ca.crt')):
                shutil.copyfile(os.path.join(self.tls, src), os.path.join(certs, dst))
            os.chmod(os.path.join(certs, 'jobz-tls.key'), 0o600)
        with open(os.path.join(chroot, 'mongrel2.conf'), 'w', encoding='utf-8') as f:
            f.write(conf)
        db = os.path.join(chroot, 'config.sqlite')
        if os.path.exists(db):
            os.unlink(db)
        load = subprocess.run(['m2sh', 'load', '-config', 'mongrel2.conf', '-db', 'config.sqlite'],
                              cwd=chroot, capture_output=True, text=True, env=dict(os.environ, LOGNAME='root'))
        if load.returncode or not _has_server(db):
            # m2sh exits 0 even when the file does not parse: look at what it loaded.
            raise RuntimeError(f'm2sh could not load {self.mongrel2_conf}:\n{load.stdout}{load.stderr}')
        self._run_mongrel2(chroot, 'mongrel2', 'jobz', 'mongrel2.pid')
        if self.tls:
            self._run_mongrel2(chroot, 'mongrel2-tls', 'jobz-tls', 'mongrel2-tls.pid')

    def _run_mongrel2(self, chroot: str, name: str, uuid: str, pid_name: str) -> None:
        pid_file = os.path.join(chroot, 'run', pid_name)
        if os.path.exists(pid_file):
            os.unlink(pid_file)    # left by a killed mongrel2; it refuses to start otherwise
        with open(os.path.join(chroot, 'logs', name + '.out'), 'ab') as out:
            self.spawn(name, ['mongrel2', 'config.sqlite', uuid], cwd=chroot,
                       stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, LOGNAME='root'))

    def start(self, workers=('local',), semaphore: bool = True, timeout: float = 30.0) -> None:
        """Start everything; `workers` holds names, or (name, [extra worker flags]) pairs."""
        os.makedirs(self.home, exist_ok=True)
        jobs = load_jobs(self.jobs)    # fail here, loudly, before anything starts
        self.start_broker()
        for worker in workers:
            name, extra = (worker, []) if isinstance(worker, str) else worker
            self.start_worker(name, *extra)
        if semaphore and any(j.semaphore for j in jobs.values()):
            self.start_semaphore()
        self.start_mongrel2()
        self.wait_healthy(timeout, len([n for n in self.procs if n not in ('broker', 'mongrel2', 'mongrel2-tls')]))

    def wait_healthy(self, timeout: float, workers: int) -> None:
        """Wait until the front end answers and `workers` agents have registered."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f'{name} exited with {proc.returncode} during start-up')
            try:
                with urllib.request.urlopen(self.url + '/health', timeout=2) as resp:
                    last = json.load(resp)
                    if last.get('workers', -1) >= workers:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f'stack not healthy after {timeout}s (last /health: {last})')

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning('%s did not stop in %ss; killing it', name, timeout)
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        # Front end first (no new requests), broker last (results still arrive).
        fronts = ('mongrel2', 'mongrel2-tls')
        order = [*fronts] + [n for n in self.procs if n not in (*fronts, 'broker')] + ['broker']
        for name in order:
            self.stop(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--port', type=int, default=int(os.environ.get('JOBZ_PORT', defaults.PORT)),
                    help=f'HTTP port (default: {defaults.PORT}; env JOBZ_PORT)')
    ap.add_argument('--jobs', default=os.environ.get('JOBZ_JOBS', defaults.JOBS),
                    help=f'job folder (default: {defaults.JOBS}; env JOBZ_JOBS)')
    ap.add_argument('--home', default=os.environ.get('JOBZ_HOME', defaults.HOME),
                    help=f'state folder (default: {defaults.HOME}; env JOBZ_HOME)')
    ap.add_argument('--ca', default=os.environ.get('JOBZ_CA'),
                    help='a jobz-ca folder: also serve HTTPS with client certificates (default: off; env JOBZ_CA)')
    ap.add_argument('--tls-port', type=int, default=int(os.environ.get('JOBZ_TLS_PORT', defaults.TLS_PORT)),
                    help=f'HTTPS port (default: {defaults.TLS_PORT}; env JOBZ_TLS_PORT)')
    ap.add_argument('--tls-bind', default=os.environ.get('JOBZ_TLS_BIND', '0.0.0.0'),
                    help='HTTPS address (default: 0.0.0.0; env JOBZ_TLS_BIND)')
    ap.add_argument('--clients', default=os.environ.get('JOBZ_CLIENTS'),
                    help='folder of client certificates allowed on HTTPS (default: any from the CA; env JOBZ_CLIENTS)')
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter('stack'))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    stack = Stack(args.home, args.jobs.split(':'), port=args.port, tls=args.ca, tls_port=args.tls_port,
                  tls_bind=args.tls_bind, clients=args.clients)
    stopping = []
    # Only record the signal; the wait loop below does the stopping.
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    try:
        stack.start()
        log.info('jobz is up on %s (try: curl "%s/job_start?job_name=hello&date=2026_11_28")',
                 stack.url, stack.url)
        while not stopping:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    log.error('%s exited with %s; stopping the stack', name, proc.returncode)
                    stopping.append(1)
            time.sleep(0.2)
    finally:
        stack.stop_all()
    return 0


if __name__ == '__main__':
    sys.exit(main())
