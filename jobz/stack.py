"""Run the whole stack in the foreground: Mongrel2, broker, a local worker, a semaphore.

Used by `make run` and by the tests (with their own ports and folders).
"""
import argparse
import fcntl
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit

from . import defaults
from .logs import LogfmtFormatter
from .files import UnsafePath, state_dir, write_new
from .jobfile import load_jobs

log = logging.getLogger('jobz.stack')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The handler sockets as mongrel2.conf names them, relative to Mongrel2's chroot.
M2_SOCKETS = {'m2_recv': 'handlers/jobz.req', 'm2_send': 'handlers/jobz.rep',
              'm2_tls_recv': 'handlers/tls.req', 'm2_tls_send': 'handlers/tls.rep'}
M2_USER = 'nobody'    # Mongrel2 started as root drops to the owner of its chroot: this user


def render_mongrel2_conf(template: str, port: int, chroot: str, bind: str = '127.0.0.1',
                         tls_port: int = defaults.TLS_PORT, tls_bind: str = '127.0.0.1') -> str:
    """mongrel2.conf with our ports, bind addresses and chroot (each spot must be where it is expected)."""
    swaps = [(r"(bind_addr=)'127\.0\.0\.1'(,[^\n]*\n\s*port=)6769\b", rf"\g<1>'{bind}'\g<2>{port}", 1),
             (r"(bind_addr=)'127\.0\.0\.1'(,[^\n]*\n\s*port=)6443\b", rf"\g<1>'{tls_bind}'\g<2>{tls_port}", 1),
             (r"chroot='\./'", f"chroot='{chroot}'", 2)]
    for pattern, replacement, count in swaps:
        template, n = re.subn(pattern, replacement, template)
        if n != count:
            raise ValueError(f'mongrel2.conf: expected {pattern!r} {count} time(s), found it {n}')
    return template


# What Mongrel2 says as an error on every normal start: not errors at all (it then says "No
# previous mongrel2 running, continuing on"). Left out of what `make run` shows and keeps.
HARMLESS = [re.compile(r'\[ERROR\] \(src/unixy\.c:\d+: errno: No such file or directory\) Failed to open PID file .* for reading\.$')]


def copy_mongrel2_output(pipe, path: str, name: str) -> None:
    """Copy Mongrel2's output to `path` (in a thread of the stack); its warnings and errors go to our log
    too, so that a port in use or a bad certificate is seen, but not the known harmless ones."""
    with pipe, open(path, 'ab') as out:
        for raw in pipe:
            line = raw.decode(errors='replace').rstrip('\n')
            if any(p.search(line) for p in HARMLESS):
                continue
            out.write(raw)
            out.flush()
            if '[ERROR]' in line or '[WARN]' in line:
                log.warning('%s: %s', name, line.split('GMT ', 1)[-1])


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
        self.ports = {'pub': 6770, 'router': 6771} | (ports or {})
        self.chroot = os.path.join(self.home, 'mongrel2')    # Mongrel2's; it binds the handler sockets in it
        self.python = python
        self.worker_args = list(worker_args)
        self.mongrel2_conf = mongrel2_conf or os.path.join(ROOT, 'mongrel2.conf')
        self.log_dir = log_dir          # None: processes write to our stdout/stderr
        self.broker_args: list[str] = []
        self.journal: str | None = None    # a postgresql:// URL (given in the environment: ps shows arguments)
        self.prefix: dict[str, list[str]] = {}    # process name -> argv prefix (say `ip netns exec NS`)
        self.procs: dict[str, subprocess.Popen] = {}
        self.bind = bind                # the one address every server socket binds to
        self.url = f'http://{bind}:{port}'
        self.tls = tls                  # a jobz-ca folder: also run the HTTPS front end
        self.tls_port, self.tls_bind, self.clients = tls_port, tls_bind, clients
        self.tls_url = f'https://{tls_bind}:{tls_port}'

    def addr(self, name: str) -> str:
        if name in M2_SOCKETS:
            # ipc:// files in a folder only Mongrel2 and the broker reach: whoever can connect to them
            # can take requests (and a loopback TCP port is open to every local user).
            return f'ipc://{self.chroot}/{M2_SOCKETS[name]}'
        return f'tcp://{self.bind}:{self.ports[name]}'

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
            *(['--clients', self.clients] if self.clients else []),
            # The names this stack's own URLs use, besides the loopback names.
            '--hostnames', ','.join(dict.fromkeys([*defaults.HOSTNAMES.split(','), urlsplit(self.url).hostname,
                                                   urlsplit(self.tls_url).hostname]))],
            **({'env': os.environ | {'JOBZ_JOURNAL': self.journal}} if self.journal else {}))

    def start_worker(self, name: str, *extra: str) -> None:
        self.spawn(name, self.script('worker.py') + [
            '--name', name, '--jobs', *self.jobs, '--home', self.home, *self.links(),
            *self.worker_args, *extra])

    def start_semaphore(self, name: str = 'semaphore', *extra: str) -> None:
        self.spawn(name, self.script('semaphore.py') + [
            '--name', name, '--jobs', *self.jobs, '--home', self.home, *self.links(), *extra])

    def start_mongrel2(self) -> None:
        """Load mongrel2.conf and start Mongrel2 (and its HTTPS server) on our ports.

        As root, Mongrel2 reads its config from a folder only root can write, then chroots and
        drops to the owner of the chroot: M2_USER. Not as root it cannot chroot and runs in its
        chroot folder as it is, so config and chroot are then one folder."""
        root = os.geteuid() == 0
        state_dir(self.home)
        chroot = self._m2_folder(self.chroot, 0o755)
        for sub, mode in (('logs', 0o755), ('run', 0o755), ('tmp', 0o700), ('handlers', 0o700)):
            self._m2_folder(os.path.join(chroot, sub), mode)
        if max(len(self.addr(n).encode()) for n in M2_SOCKETS) - len('ipc://') > 107:    # sun_path holds 108
            raise RuntimeError(f'{self.home}: too long a path for the handler sockets in it; use a shorter --home')
        config = state_dir(os.path.join(self.home, 'mongrel2-config')) if root else chroot
        with open(self.mongrel2_conf, encoding='utf-8') as f:
            conf = render_mongrel2_conf(f.read(), self.port, chroot, self.bind, self.tls_port, self.tls_bind)
        if self.tls:
            # Mongrel2 reads ssl.ca_chain (relative to where it starts) before it chroots, and
            # certdir/<server uuid>.crt/.key inside the chroot before it drops privileges.
            for folder, files in ((os.path.join(config, 'certs'), (('ca.crt', 'ca.crt', 0o644),)),
                                  (os.path.join(chroot, 'certs'), (('servers/jobz-tls.crt', 'jobz-tls.crt', 0o644),
                                                                   ('servers/jobz-tls.key', 'jobz-tls.key', 0o600)))):
                state_dir(folder)
                os.chmod(folder, 0o755)
                for src, dst, mode in files:
                    with open(os.path.join(self.tls, src), 'rb') as f:
                        data = f.read()
                    if os.path.lexists(os.path.join(folder, dst)):
                        os.unlink(os.path.join(folder, dst))
                    write_new(os.path.join(folder, dst), data, mode)
        with open(os.path.join(config, 'mongrel2.conf'), 'w', encoding='utf-8') as f:
            f.write(conf)
        db = os.path.join(config, 'config.sqlite')
        if os.path.lexists(db):
            os.unlink(db)
        load = subprocess.run(['m2sh', 'load', '-config', 'mongrel2.conf', '-db', 'config.sqlite'],
                              cwd=config, capture_output=True, text=True, env=dict(os.environ, LOGNAME='root'))
        if load.returncode or not _has_server(db):
            # m2sh exits 0 even when the file does not parse: look at what it loaded.
            raise RuntimeError(f'm2sh could not load {self.mongrel2_conf}:\n{load.stdout}{load.stderr}')
        self._run_mongrel2(config, 'mongrel2', 'jobz', 'mongrel2.pid')
        if self.tls:
            self._run_mongrel2(config, 'mongrel2-tls', 'jobz-tls', 'mongrel2-tls.pid')

    def _m2_folder(self, path: str, mode: int) -> str:
        """A folder of Mongrel2's chroot, owned by the user it runs as (M2_USER when we are root)."""
        if not os.path.isdir(path) or os.path.islink(path):
            if os.path.islink(path):
                os.unlink(path)
            os.mkdir(path, mode)
        os.chmod(path, mode)
        if os.geteuid() == 0:
            user = pwd.getpwnam(M2_USER)
            os.chown(path, user.pw_uid, user.pw_gid)
        return path

    def _run_mongrel2(self, config: str, name: str, uuid: str, pid_name: str) -> None:
        pid_file = os.path.join(self.chroot, 'run', pid_name)
        if os.path.lexists(pid_file):
            os.unlink(pid_file)    # left by a killed mongrel2; it refuses to start otherwise
        # umask 077: the handler sockets it creates are for its owner (and root, the broker here).
        # Its output goes to the log folder or our home, never to the folder it owns (we may be root).
        argv, kw = ['mongrel2', 'config.sqlite', uuid], dict(cwd=config, umask=0o077, env=dict(os.environ, LOGNAME='root'))
        if self.log_dir:
            self.spawn(name, argv, **kw)
            return
        proc = self.spawn(name, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
        threading.Thread(target=copy_mongrel2_output, args=(proc.stdout, os.path.join(self.home, name + '.out'), name),
                         name=f'{name}-output', daemon=True).start()

    def start(self, workers=('local',), semaphore: bool = True, timeout: float = 30.0) -> None:
        """Start everything; `workers` holds names, or (name, [extra worker flags]) pairs."""
        state_dir(self.home)
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


def ports_in_use(addr: str, ports: list[int]) -> list[int]:
    """Those of `ports` something listens on at `addr` (bound as servers bind, so TIME_WAIT is no bar)."""
    busy = []
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((addr, port))
            except OSError:
                busy.append(port)
    return busy


def claim(home: str, ports: dict, tls_bind: str):
    """Exit with what to set if one of `ports` is taken or another stack runs in `home`; else lock
    `home` for this stack (the open lock file, to keep while it runs)."""
    busy = ports_in_use('127.0.0.1', [p for n, p in ports.items() if n != 'tls'])
    busy += ports_in_use(tls_bind, [ports['tls']]) if 'tls' in ports else []
    if busy:
        sys.exit(f'error: port {", ".join(map(str, busy))} already in use (another jobz stack?): set JOBZ_PORT '
                 f'to move every port of this one (now {", ".join(map(str, ports.values()))})')
    # One stack per state folder: a second one there would share the journal and the handler sockets.
    lock = open(os.path.join(home, 'stack.lock'), 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        sys.exit(f'error: --home {home}: another stack runs there ({lock.read().strip() or "its ports unknown"}); '
                 'give this one a folder of its own (JOBZ_HOME) and another JOBZ_PORT')
    lock.truncate(0)
    lock.write(f'pid {os.getpid()}, ports ' + ', '.join(f'{k} {v}' for k, v in ports.items()) + '\n')
    lock.flush()
    return lock


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('--port', type=int, default=int(os.environ.get('JOBZ_PORT', defaults.PORT)),
                    help=f'HTTP port; the other ports move with it (default: {defaults.PORT}; env JOBZ_PORT)')
    ap.add_argument('--pub-port', type=int, default=_env_int('JOBZ_PUB_PORT'),
                    help="the broker's live calls to workers (default: PORT+1; env JOBZ_PUB_PORT)")
    ap.add_argument('--router-port', type=int, default=_env_int('JOBZ_ROUTER_PORT'),
                    help="the broker's sync, results and heartbeats (default: PORT+2; env JOBZ_ROUTER_PORT)")
    ap.add_argument('--jobs', default=os.environ.get('JOBZ_JOBS', defaults.JOBS),
                    help=f'job folder (default: {defaults.JOBS}; env JOBZ_JOBS)')
    ap.add_argument('--home', default=os.environ.get('JOBZ_HOME', defaults.HOME),
                    help=f'state folder (default: {defaults.HOME}; env JOBZ_HOME)')
    ap.add_argument('--ca', default=os.environ.get('JOBZ_CA'),
                    help='a jobz-ca folder: also serve HTTPS with client certificates (default: off; env JOBZ_CA)')
    ap.add_argument('--tls-port', type=int, default=_env_int('JOBZ_TLS_PORT'),
                    help=f'HTTPS port, with --ca (default: {defaults.TLS_PORT} moved as PORT is: '
                         f'PORT{defaults.TLS_PORT - defaults.PORT:+d}; env JOBZ_TLS_PORT)')
    ap.add_argument('--tls-bind', default=os.environ.get('JOBZ_TLS_BIND', '127.0.0.1'),
                    help='HTTPS address (default: 127.0.0.1; env JOBZ_TLS_BIND)')
    ap.add_argument('--clients', default=os.environ.get('JOBZ_CLIENTS'),
                    help='folder of client certificates allowed on HTTPS (default: any from the CA; env JOBZ_CLIENTS)')
    args = ap.parse_args(argv)
    ports = {'port': args.port, 'pub': args.pub_port or args.port + 1, 'router': args.router_port or args.port + 2}
    if args.ca:
        ports['tls'] = args.tls_port or args.port + defaults.TLS_PORT - defaults.PORT
    for name, port in ports.items():
        if not 0 < port < 65536:
            ap.error(f'{name} port {port}: not a TCP port (set JOBZ_PORT between 1 and 65533)')
    if len(set(ports.values())) < len(ports):
        ap.error(f'two of the ports are the same: {ports}')
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter('stack'))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')
    try:
        state_dir(args.home)
    except UnsafePath as e:
        sys.exit(f'error: --home: {e}')
    lock = claim(args.home, ports, args.tls_bind)    # held while we run
    stack = Stack(args.home, args.jobs.split(':'), port=ports['port'], ports={'pub': ports['pub'], 'router': ports['router']},
                  tls=args.ca, tls_port=ports.get('tls', defaults.TLS_PORT), tls_bind=args.tls_bind, clients=args.clients)
    stopping = []
    # Only record the signal; the wait loop below does the stopping.
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
    failed = False
    try:
        try:
            stack.start()
        except RuntimeError as e:    # a process that exited at start (a port in use, say): its words are above
            log.error('could not start the stack: %s', e)
            return 1
        log.info('jobz is up on %s (try: curl "%s/job_start?job_name=hello&date=2026_11_28"); '
                 'ports: HTTP %d, broker %d and %d%s', stack.url, stack.url, ports['port'], ports['pub'],
                 ports['router'], f", HTTPS {ports['tls']}" if args.ca else '')
        while not stopping:
            for name, proc in list(stack.procs.items()):
                if proc.poll() is not None:
                    log.error('%s exited with %s; stopping the stack', name, proc.returncode)
                    stopping.append(1)
                    failed = True
            time.sleep(0.2)
    finally:
        stack.stop_all()
        lock.close()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
