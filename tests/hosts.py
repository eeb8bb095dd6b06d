"""Throwaway Debian hosts for deployment tests: real systemd in systemd-nspawn containers.

    with Hosts(['web', 'db'], str(tmp_path)) as hosts:           # debs=DEBS
        hosts['web'].ssh('systemctl is-system-running')          # -> CompletedProcess
        (tmp_path / 'inventory.yml').write_text(hosts.inventory())

Each host boots a minimal Debian bookworm through its own overlayfs (host.root: writable, the
shared lower root stays untouched) in its own network namespace, linked by a veth pair to a
bridge here: the bridge is 10.233.N.1/24, the hosts .2, .3, ... in the order given, named in
each other's /etc/hosts.  They reach us and each other, nothing else.  The root is built once
with mmdebstrap and cached in /var/tmp/jobz-test-roots/<hash of the build> ($JOBZ_TEST_ROOTS);
it keeps apt's lists and the .debs of `debs` with their dependencies and recommends, so
`apt-get install` of those (or Ansible's apt with update_cache off) works with no network.
Delete the cache to refresh it.  Needs root and the Debian packages in TOOLS.

Pitfalls met on this machine, whose PID 1 is not systemd:
- no systemd-machined or system bus: nspawn needs --register=no --keep-unit, machinectl can't
  reach the hosts, so power off through ssh (`systemctl poweroff`) or SIGTERM to nspawn;
- --keep-unit makes nspawn split the cgroup it starts in into supervisor/ and payload/: each
  nspawn is started in a cgroup of its own, or all containers would share one /payload;
- nspawn runs in its own session (setsid), stdin /dev/null, console output to a log;
  --resolv-conf=off --timezone=off --link-journal=no keep it out of /etc: we write hostname,
  hosts, a fresh machine-id (an empty one means "first boot") and an empty resolv.conf;
- the container's systemd ignores SIGRTMIN+3 (what nspawn sends on SIGTERM) early in its boot;
- commands here run with a plain PATH, not the machine's python shims; use /usr/bin/python3;
- nspawn gives the container CAP_NET_ADMIN only with its own --private-network, not with
  --network-namespace-path: without --capability=CAP_NET_ADMIN, nft inside says "Operation not
  permitted" (the namespace is the host's own, so the capability reaches no further).
"""
import fcntl
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

CACHE = os.environ.get('JOBZ_TEST_ROOTS', '/var/tmp/jobz-test-roots')
BASE = ['systemd', 'systemd-sysv', 'dbus', 'openssh-server', 'python3', 'python3-apt',
        'python3-packaging', 'iproute2']
DEBS = ['mongrel2-core', 'python3-zmq', 'python3-yaml', 'python3-venv', 'curl', 'nftables',  # the deploy's
        'postgresql', 'python3-psycopg']
SUITE = 'bookworm'
MIRRORS = ['deb http://deb.debian.org/debian bookworm main',
           'deb http://deb.debian.org/debian bookworm-updates main',
           'deb http://deb.debian.org/debian-security bookworm-security main']
TOOLS = {'mmdebstrap': 'mmdebstrap', 'systemd-nspawn': 'systemd-container',
         'ssh': 'openssh-client', 'ssh-keygen': 'openssh-client', 'ip': 'iproute2'}
ENV = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'LC_ALL': 'C.UTF-8'}


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True,
                          env=ENV, stdin=subprocess.DEVNULL)


def missing_packages() -> list[str]:
    """Debian packages to install before Hosts can work here (empty when all are present)."""
    return sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool, path=ENV['PATH'])})


def root_fs(debs: list[str]) -> str:
    """The cached root for `debs`, built first when missing; concurrent builders wait on a lock."""
    # Recommends too: Ansible's apt module installs them (apt-get too, by default).
    download = 'chroot "$1" apt-get install -y --download-only -o APT::Install-Recommends=true '
    hooks = ['--customize-hook=' + download + shlex.join(sorted(debs))] if debs else []
    args = ['--variant=minbase', '--include=' + ','.join(BASE), '--skip=cleanup/apt/lists',
            '--skip=cleanup/apt/cache', *hooks, SUITE]
    path = os.path.join(CACHE, hashlib.sha256(json.dumps([args, MIRRORS]).encode()).hexdigest()[:16])
    os.makedirs(CACHE, exist_ok=True)
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(path):
            if os.path.lexists(path + '.tmp'):  # from a build killed half-way: unmount, then remove
                mounts = run('findmnt', '-rn', '-o', 'TARGET').stdout.split('\n')
                for m in sorted((m for m in mounts if m.startswith(path + '.tmp/')), reverse=True):
                    run('umount', '-l', m, check=False)
                run('rm', '-rf', '--one-file-system', path + '.tmp', timeout=300)
            run('mmdebstrap', *args, path + '.tmp', *MIRRORS, timeout=1200)
            os.rename(path + '.tmp', path)  # others see a whole root or none
    return path


def claim_subnet() -> int:
    """A random N with 10.233.N.0/24 unused here; creating the bridge jzbrN makes the claim atomic."""
    used = run('ip', '-4', '-o', 'addr', 'show').stdout
    for n in random.sample(range(1, 255), 254):
        if f' 10.233.{n}.' not in used and \
                run('ip', 'link', 'add', f'jzbr{n}', 'type', 'bridge', check=False).returncode == 0:
            return n
    raise RuntimeError('no free 10.233.N.0/24')


def cgroup_dirs(name: str) -> list[str]:
    """A cgroup `name` beside ours in each hierarchy nspawn uses (cgroup2, v1 name=systemd)."""
    own = dict(line.rstrip('\n').split(':', 2)[1:] for line in open('/proc/self/cgroup'))
    dirs = []
    for line in open('/proc/self/mounts'):
        mnt, fstype, opts = line.split()[1:4]
        ctrl = '' if fstype == 'cgroup2' else 'name=systemd'
        if fstype == 'cgroup2' or (fstype == 'cgroup' and ctrl in opts.split(',')):
            dirs.append(os.path.join(mnt, own.get(ctrl, '/').lstrip('/'), name))
    return dirs


def join_cgroups(dirs: list[str]) -> None:
    for d in dirs:
        try:
            with open(os.path.join(d, 'cgroup.procs'), 'w') as f:
                f.write(str(os.getpid()))
        except OSError:
            pass  # best effort: nspawn still runs from the cgroup it started in


class Host:
    """One container: its overlay root, network namespace, veth, cgroups and nspawn process."""

    def __init__(self, name: str, index: int, n: int, workdir: str, key: str):
        self.name, self.key = name, key
        self.addr = f'10.233.{n}.{index + 2}'
        self.ns, self.veth, self.machine = f'jobz{n}-{index}', f'jz{n}v{index}', f'jobz{n}-{name}'
        self.dir = os.path.join(workdir, name)
        self.root = os.path.join(self.dir, 'root')
        self.log = os.path.join(self.dir, 'console.log')
        self.cgroups = cgroup_dirs(self.machine)
        self.proc: subprocess.Popen | None = None
        self.mounted, self.started, self.boot_seconds = False, 0.0, []

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
            with open(path, 'w') as f:
                f.write(text)
            os.chmod(path, 0o600 if rel.startswith('root/') else 0o644)

    def boot(self) -> None:
        self.started = time.monotonic()
        for d in self.cgroups:
            os.makedirs(d, exist_ok=True)
        with open(self.log, 'ab') as log:
            self.proc = subprocess.Popen(
                ['systemd-nspawn', '--boot', '--register=no', '--keep-unit', '--resolv-conf=off',
                 '--timezone=off', '--link-journal=no', '--console=read-only', f'--hostname={self.name}',
                 # nft inside needs it; the network namespace is the host's own, so it reaches no further.
                 '--capability=CAP_NET_ADMIN',
                 f'--network-namespace-path=/run/netns/{self.ns}', '-M', self.machine, '-D', self.root],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                start_new_session=True, preexec_fn=lambda: join_cgroups(self.cgroups))

    def ssh_argv(self, cmd: str) -> list[str]:
        """The ssh command line that runs shell `cmd` as root on the host (for Popen)."""
        return ['ssh', '-F', '/dev/null', '-i', self.key, '-o', 'BatchMode=yes',
                '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
                '-o', 'LogLevel=ERROR', '-o', 'ConnectTimeout=5', f'root@{self.addr}', cmd]

    def ssh(self, cmd: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        """Run shell `cmd` as root on the host."""
        return run(*self.ssh_argv(cmd), check=check, timeout=timeout)

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

    def poweroff_and_boot(self, timeout: float = 120) -> None:
        """`systemctl poweroff` inside, wait for nspawn to exit, boot again and wait for ssh."""
        self.ssh('systemctl poweroff --no-block', timeout=20, check=True)
        if not self.wait_down(time.monotonic() + timeout, nudge=False):
            raise TimeoutError(f'{self.name}: did not power off in {timeout}s\n{self.tail()}')
        self.boot()
        self.wait_ssh(time.monotonic() + timeout)

    def pull_plug(self) -> None:
        """As a power cut: the link goes down first (no goodbye on the wire), then everything is SIGKILLed."""
        run('ip', 'link', 'set', self.veth, 'down')
        self.wait_down(time.monotonic(), nudge=False)

    def plug_in(self, timeout: float = 120) -> None:
        """After pull_plug: the link up again, boot, wait for ssh."""
        run('ip', 'link', 'set', self.veth, 'up')
        self.boot()
        self.wait_ssh(time.monotonic() + timeout)

    def poweroff(self) -> None:
        """Ask for a clean poweroff: systemctl inside, or SIGTERM to nspawn when ssh can't."""
        if self.proc and self.proc.poll() is None:
            try:
                ok = self.ssh('systemctl poweroff --no-block', timeout=20).returncode == 0
            except subprocess.TimeoutExpired:
                ok = False
            if not ok:
                self.proc.send_signal(signal.SIGTERM)

    def wait_down(self, deadline: float, nudge: bool = True) -> bool:
        """True if nspawn exits by `deadline`, else SIGKILL it and the container and return False.

        With `nudge`, SIGTERM nspawn every 3 s meanwhile (it passes SIGRTMIN+3 on to systemd).
        """
        while self.proc and self.proc.poll() is None and time.monotonic() < deadline:
            try:
                self.proc.wait(timeout=min(3, max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                if nudge:
                    self.proc.send_signal(signal.SIGTERM)
        if not self.proc or self.proc.poll() is not None:
            return True
        for pid in [self.proc.pid, *self.processes()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        return False

    def processes(self) -> list[int]:
        """PIDs in this host's cgroups: nspawn and everything running in the container."""
        pids = set()
        for top in self.cgroups:
            for d, _, _ in os.walk(top):
                try:
                    with open(os.path.join(d, 'cgroup.procs')) as f:
                        pids.update(int(p) for p in f.read().split())
                except OSError:
                    pass
        return sorted(pids)

    def remove(self) -> None:
        """Unmount the overlay, delete cgroups, veth and namespace (once the container is down)."""
        if self.mounted and run('umount', self.root, check=False).returncode:
            run('umount', '-l', self.root)  # still busy: detach it now, the kernel frees it later
        self.mounted = False
        deadline = time.monotonic() + 10  # the container's last processes may still be exiting
        while any(map(os.path.exists, self.cgroups)) and time.monotonic() < deadline:
            for top in self.cgroups:
                for d, _, _ in os.walk(top, topdown=False):
                    try:
                        os.rmdir(d)
                    except OSError:
                        pass
            time.sleep(0.05)
        run('ip', 'link', 'del', self.veth, check=False)
        if os.path.exists(f'/run/netns/{self.ns}'):
            run('ip', 'netns', 'del', self.ns)


class Hosts:
    """Containers `names` with their state under `workdir`, as a context manager; see above."""

    def __init__(self, names: list[str], workdir: str, debs: list[str] = DEBS, boot_timeout: float = 120):
        for name in names:
            if not re.fullmatch(r'[a-z][a-z0-9-]{0,30}', name) or names.count(name) > 1:
                raise ValueError(f'bad or repeated host name {name!r}')
        self.names, self.workdir, self.debs = list(names), os.path.abspath(workdir), list(debs)
        self.boot_timeout = boot_timeout
        self.key = os.path.join(self.workdir, 'id_ed25519')
        self.hosts: list[Host] = []
        self.bridge = self.control_dir = self.net = None
        self.timings: dict = {}  # seconds: root (build or cache), boot per host, teardown

    def __enter__(self) -> 'Hosts':
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def setup(self) -> None:
        if missing_packages():    # `make test` installs them; say so plainly if someone did not
            raise RuntimeError(f'apt-get install {" ".join(missing_packages())} (make test does)')
        t0 = time.monotonic()
        lower = root_fs(self.debs)
        self.timings['root'] = round(time.monotonic() - t0, 1)
        os.makedirs(self.workdir, exist_ok=True)
        if not os.path.exists(self.key):
            run('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'jobz-test', '-f', self.key)
        with open(self.key + '.pub') as f:
            pubkey = f.read()
        self.control_dir = tempfile.mkdtemp(prefix='jz-cp-', dir='/tmp')  # socket paths < 108 bytes
        n = claim_subnet()
        self.bridge, self.net = f'jzbr{n}', f'10.233.{n}'
        run('ip', 'addr', 'add', f'{self.net}.1/24', 'dev', self.bridge)
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
        """Power all hosts off, then undo every step that was done; go on past errors."""
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
            shutil.rmtree(self.control_dir, ignore_errors=True)
            self.control_dir = None
        self.timings['teardown'] = round(time.monotonic() - t0, 1)
        if errors:
            raise RuntimeError(f'teardown: {errors!r}')

    def inventory(self) -> str:
        """An Ansible YAML inventory of the hosts, in group `all`."""
        ssh_args = '-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR'
        lines = ['all:', '  vars:', '    ansible_user: root',
                 f'    ansible_ssh_private_key_file: {json.dumps(self.key)}',
                 '    ansible_python_interpreter: /usr/bin/python3',
                 f'    ansible_ssh_common_args: {json.dumps(ssh_args)}',
                 f'    ansible_control_path_dir: {json.dumps(self.control_dir)}  # per run', '  hosts:']
        for h in self.hosts:
            lines += [f'    {h.name}:', f'      ansible_host: {h.addr}']
        return '\n'.join(lines) + '\n'
