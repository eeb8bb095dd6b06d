"""Throwaway Debian hosts for deployment tests: real systemd in systemd-nspawn containers.

    with Hosts(['web', 'db'], str(tmp_path), debs=['mongrel2-core', 'curl']) as hosts:
        hosts['web'].ssh('systemctl is-system-running')        # -> CompletedProcess
        (tmp_path / 'inventory.yml').write_text(hosts.inventory())

Each host boots a minimal Debian bookworm root through its own overlayfs (host.root, writable;
the shared lower root stays untouched) inside its own network namespace, linked by a veth pair
to a bridge in our namespace: the bridge is 10.233.N.1/24, the hosts .2, .3, ... in the order
given.  They reach us and each other, nothing else.  The root is built once with mmdebstrap
and cached under /var/tmp/jobz-test-roots/<hash of the package lists>; it keeps apt's lists and
the .debs of `debs` (with their dependencies), so `apt-get install` of those works inside with
no network (for Ansible: apt with update_cache off).  Delete the cache to refresh it.

Needs root and the Debian packages mmdebstrap, systemd-container, openssh-client, iproute2.
Pitfalls met on this machine (PID 1 is not systemd):
- no systemd-machined, so nspawn runs with --register=no and machinectl can't reach the hosts:
  power off through ssh (`systemctl poweroff`), or SIGTERM to nspawn (it passes SIGRTMIN+3 on);
- --resolv-conf=off --timezone=off --link-journal=no: nspawn leaves /etc alone, and we write
  each host's hostname, hosts, machine-id (an empty one means "first boot" and
  systemd-firstboot would prompt on the console) and an empty resolv.conf in its upper layer;
- nspawn is started in its own session (setsid) with stdin from /dev/null, output to a log;
- commands here run with a plain PATH, never the machine's python shims; use /usr/bin/python3.
"""
import fcntl
import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import tempfile
import time
import uuid

CACHE = os.environ.get('JOBZ_TEST_ROOTS', '/var/tmp/jobz-test-roots')
BASE = ['systemd', 'systemd-sysv', 'dbus', 'openssh-server', 'python3', 'python3-apt',
        'python3-packaging', 'iproute2']
SUITE = 'bookworm'
MIRRORS = ['deb http://deb.debian.org/debian bookworm main',
           'deb http://deb.debian.org/debian bookworm-updates main',
           'deb http://deb.debian.org/debian-security bookworm-security main']
TOOLS = {'mmdebstrap': 'mmdebstrap', 'systemd-nspawn': 'systemd-container',
         'ssh': 'openssh-client', 'ssh-keygen': 'openssh-client', 'ip': 'iproute2'}
ENV = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LC_ALL': 'C.UTF-8', 'DEBIAN_FRONTEND': 'noninteractive'}


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True,
                          env=ENV, stdin=subprocess.DEVNULL)


def missing_packages() -> list[str]:
    """Debian packages to install before Hosts can work here (empty when all are present)."""
    from shutil import which
    return sorted({pkg for tool, pkg in TOOLS.items() if not which(tool, path=ENV['PATH'])})


def root_fs(debs: list[str]) -> str:
    """The cached root for `debs`, built first when missing; concurrent builders wait on a lock."""
    key = hashlib.sha256(json.dumps([SUITE, MIRRORS, BASE, sorted(debs)]).encode()).hexdigest()[:16]
    path = os.path.join(CACHE, key)
    os.makedirs(CACHE, exist_ok=True)
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(path):
            tmp = path + '.tmp'
            remove_tree(tmp)  # left by a build that was killed half-way
            hooks = ['--customize-hook=chroot "$1" apt-get install -y --download-only '
                     + ' '.join(map(shlex.quote, debs))] if debs else []
            run('mmdebstrap', '--variant=minbase', '--include=' + ','.join(BASE),
                '--skip=cleanup/apt/lists', '--skip=cleanup/apt/cache', *hooks,
                SUITE, tmp, *MIRRORS, timeout=1200)
            os.rename(tmp, path)  # others see a whole root or none
    return path


def remove_tree(path: str) -> None:
    """rm -rf that first unmounts whatever is mounted below `path` and never crosses into it."""
    if not os.path.lexists(path):
        return
    mounts = run('findmnt', '-rn', '-o', 'TARGET', check=False).stdout.split('\n')
    for target in sorted((m for m in mounts if m == path or m.startswith(path + '/')), reverse=True):
        run('umount', '-l', target, check=False)
    run('rm', '-rf', '--one-file-system', path, timeout=300)


def claim_subnet() -> int:
    """A random N with 10.233.N.0/24 unused here; creating the bridge jzbrN makes the claim atomic."""
    used = run('ip', '-4', '-o', 'addr', 'show').stdout
    for n in random.sample(range(1, 255), 254):
        if f' 10.233.{n}.' not in used and run('ip', 'link', 'add', f'jzbr{n}', 'type', 'bridge',
                                                check=False).returncode == 0:
            return n
    raise RuntimeError('no free 10.233.N.0/24')


class Host:
    """One container: its overlay root, network namespace, veth and systemd-nspawn process."""

    def __init__(self, name: str, index: int, n: int, workdir: str, key: str):
        self.name, self.key = name, key
        self.addr = f'10.233.{n}.{index + 2}'
        self.ns, self.veth, self.machine = f'jobz{n}-{index}', f'jz{n}v{index}', f'jobz{n}-{name}'
        self.dir = os.path.join(workdir, name)
        self.root = os.path.join(self.dir, 'root')
        self.log = os.path.join(self.dir, 'console.log')
        self.proc: subprocess.Popen | None = None
        self.mounted = False
        self.boot_seconds: list[float] = []

    def mount(self, lower: str) -> None:
        for sub in ('upper', 'work', 'root'):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        run('mount', '-t', 'overlay', 'overlay', '-o',
            f'lowerdir={lower},upperdir={self.dir}/upper,workdir={self.dir}/work', self.root)
        self.mounted = True

    def link(self, bridge: str) -> None:
        run('ip', 'netns', 'add', self.ns)
        run('ip', 'link', 'add', self.veth, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', self.ns)
        run('ip', 'link', 'set', self.veth, 'master', bridge, 'up')
        run('ip', '-n', self.ns, 'addr', 'add', self.addr + '/24', 'dev', 'eth0')
        run('ip', '-n', self.ns, 'link', 'set', 'eth0', 'up')
        run('ip', '-n', self.ns, 'link', 'set', 'lo', 'up')

    def configure(self, hosts_file: str, pubkey: str) -> None:
        """Per-host files, written into the upper layer."""
        files = {'etc/hostname': self.name + '\n', 'etc/hosts': hosts_file,
                 'etc/machine-id': uuid.uuid4().hex + '\n', 'etc/resolv.conf': '',
                 'root/.ssh/authorized_keys': pubkey}
        for rel, text in files.items():
            path = os.path.join(self.root, rel)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            if os.path.islink(path):
                os.unlink(path)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'w') as f:
                f.write(text)
            os.chmod(path, 0o600 if rel.startswith('root/') else 0o644)

    def boot(self) -> None:
        self.started = time.monotonic()
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                ['systemd-nspawn', '--boot', '--register=no', '--keep-unit', '--resolv-conf=off', '--timezone=off',
                 '--link-journal=no', '--console=read-only', f'--hostname={self.name}',
                 f'--network-namespace-path=/run/netns/{self.ns}', '-M', self.machine, '-D', self.root],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=ENV)

    def ssh(self, cmd: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        return run('ssh', '-F', '/dev/null', '-i', self.key, '-o', 'BatchMode=yes',
                   '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
                   '-o', 'LogLevel=ERROR', '-o', 'ConnectTimeout=5', f'root@{self.addr}', cmd,
                   check=check, timeout=timeout)

    def wait_ssh(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f'{self.name}: systemd-nspawn exited {self.proc.returncode}\n{self.tail()}')
            if self.addr not in run('ip', '-n', self.ns, '-4', 'addr', 'show', 'dev', 'eth0').stdout:
                raise RuntimeError(f'{self.name}: {self.addr} is gone from {self.ns}')
            if self.ssh('true', timeout=15).returncode == 0:
                self.boot_seconds.append(round(time.monotonic() - self.started, 1))
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f'{self.name}: no ssh on {self.addr}\n{self.tail()}')
            time.sleep(0.5)

    def tail(self, lines: int = 30) -> str:
        with open(self.log, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])

    def poweroff(self) -> None:
        """Ask for a clean poweroff: systemctl inside, or SIGTERM to nspawn when ssh can't."""
        if self.proc and self.proc.poll() is None and self.ssh('systemctl poweroff --no-block',
                                                               timeout=20).returncode != 0:
            self.proc.send_signal(signal.SIGTERM)

    def wait_down(self, deadline: float) -> bool:
        """True if nspawn exited by `deadline`; else SIGKILL nspawn and the container and return False."""
        if not self.proc:
            return True
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            for pid in [self.proc.pid, *self.processes()]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=30)
            return False

    def processes(self) -> list[int]:
        """PIDs whose root directory is this host's root: what runs inside the container."""
        pids = []
        for pid in filter(str.isdigit, os.listdir('/proc')):
            try:
                if os.readlink(f'/proc/{pid}/root') == self.root:
                    pids.append(int(pid))
            except OSError:
                pass
        return pids

    def poweroff_and_boot(self, timeout: float = 120) -> None:
        """`systemctl poweroff` inside, wait for nspawn to exit, boot again and wait for ssh."""
        self.ssh('systemctl poweroff --no-block', timeout=20, check=True)
        if not self.wait_down(time.monotonic() + timeout):
            raise TimeoutError(f'{self.name}: did not power off in {timeout}s\n{self.tail()}')
        self.boot()
        self.wait_ssh(time.monotonic() + timeout)

    def remove(self) -> None:
        """Unmount the overlay and delete the namespace and veth (after the container is down)."""
        if self.mounted:
            for _ in range(20):
                if run('umount', self.root, check=False).returncode == 0:
                    break
                time.sleep(0.25)
            else:
                run('umount', '-l', self.root)
            self.mounted = False
        run('ip', 'link', 'del', self.veth, check=False)
        if os.path.exists(f'/run/netns/{self.ns}'):
            run('ip', 'netns', 'del', self.ns)


class Hosts:
    """A context manager for containers `names` with state under `workdir`; see the module doc."""

    def __init__(self, names: list[str], workdir: str, debs: list[str] = (), boot_timeout: float = 120):
        for name in names:
            if not re.fullmatch(r'[a-z][a-z0-9-]{0,30}', name) or names.count(name) > 1:
                raise ValueError(f'bad or repeated host name {name!r}')
        self.names, self.workdir, self.debs = list(names), os.path.abspath(workdir), list(debs)
        self.boot_timeout = boot_timeout
        self.hosts: list[Host] = []
        self.bridge = self.control_dir = None
        self.timings: dict = {}

    def __enter__(self) -> 'Hosts':
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def setup(self) -> None:
        t0 = time.monotonic()
        lower = root_fs(self.debs)
        self.timings['root'] = round(time.monotonic() - t0, 1)
        os.makedirs(self.workdir, exist_ok=True)
        self.key = os.path.join(self.workdir, 'id_ed25519')
        if not os.path.exists(self.key):
            run('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'jobz-test', '-f', self.key)
        with open(self.key + '.pub') as f:
            pubkey = f.read()
        self.control_dir = tempfile.mkdtemp(prefix='jz-cp-', dir='/tmp')  # short: socket paths <108
        n = claim_subnet()
        self.bridge = f'jzbr{n}'
        run('ip', 'addr', 'add', f'10.233.{n}.1/24', 'dev', self.bridge)
        run('ip', 'link', 'set', self.bridge, 'up')
        self.hosts = [Host(name, i, n, self.workdir, self.key) for i, name in enumerate(self.names)]
        hosts_file = '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' + ''.join(
            f'{h.addr}\t{h.name}\n' for h in self.hosts)
        for h in self.hosts:
            h.mount(lower)
            h.link(self.bridge)
            h.configure(hosts_file, pubkey)
        for h in self.hosts:
            h.boot()
        deadline = time.monotonic() + self.boot_timeout
        for h in self.hosts:
            h.wait_ssh(deadline)
        self.timings['boot'] = {h.name: h.boot_seconds[0] for h in self.hosts}

    def teardown(self) -> None:
        """Power everything off, then undo every step that was done; keep going past errors."""
        t0, errors = time.monotonic(), []
        for step in ([h.poweroff for h in self.hosts],
                     [lambda h=h: h.wait_down(t0 + 60) for h in self.hosts],
                     [h.remove for h in self.hosts]):
            for fn in step:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - clean up the rest, report at the end
                    errors.append(e)
        if self.bridge:
            run('ip', 'link', 'del', self.bridge, check=False)
            self.bridge = None
        if self.control_dir:
            run('rm', '-rf', self.control_dir, check=False)
            self.control_dir = None
        self.timings['teardown'] = round(time.monotonic() - t0, 1)
        if errors:
            raise RuntimeError(f'teardown: {errors!r}')

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def inventory(self) -> str:
        """An Ansible YAML inventory of the hosts (group `all`)."""
        ssh_args = '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'
        lines = ['all:', '  vars:', '    ansible_user: root',
                 f'    ansible_ssh_private_key_file: {json.dumps(self.key)}',
                 '    ansible_python_interpreter: /usr/bin/python3',
                 f'    ansible_ssh_common_args: {json.dumps(ssh_args)}',
                 f'    ansible_control_path_dir: {json.dumps(self.control_dir)}',
                 '  hosts:']
        for h in self.hosts:
            lines += [f'    {h.name}:', f'      ansible_host: {h.addr}']
        return '\n'.join(lines) + '\n'
