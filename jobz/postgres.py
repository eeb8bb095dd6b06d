"""A throwaway PostgreSQL cluster for the tests and the benchmarks: Debian's server, in a folder of
its own, on a free loopback port, with a password; removed again by stop().

PostgreSQL refuses to run as root, so as root the cluster belongs to Debian's `postgres` user
(the package creates it). `make test` installs the package (apt-get install postgresql).
"""
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile

from .harness import free_port


def bindir() -> str:
    """Debian's PostgreSQL programs, newest version first; RuntimeError if none is installed."""
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/pg_ctl'), key=lambda p: int(p.split('/')[4]))
    if not found:
        raise RuntimeError('PostgreSQL is not installed: apt-get install postgresql')
    return os.path.dirname(found[-1])


class Cluster:
    def __init__(self, host: str = '127.0.0.1', port: int | None = None, user: str = 'postgres',
                 prefix: list[str] | None = None):
        self.bin = bindir()
        self.host, self.port = host, port or free_port()
        self.password = secrets.token_hex(16)
        self.prefix = list(prefix or [])    # say `ip netns exec pg`: run it in another network namespace
        self.folder = tempfile.mkdtemp(prefix='jobz-pg-')
        self.data = os.path.join(self.folder, 'data')
        self.log = os.path.join(self.folder, 'postgres.log')
        self.as_user = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam(user)
            os.chown(self.folder, pw.pw_uid, pw.pw_gid)
            self.as_user = ['runuser', '-u', user, '--']
        self.databases = 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + self.as_user + [os.path.join(self.bin, argv[0]), *argv[1:]],
                              check=check, capture_output=True, text=True)

    def start(self) -> 'Cluster':
        if not os.path.exists(self.data):
            pwfile = os.path.join(self.folder, 'pw')
            with open(pwfile, 'w') as f:
                f.write(self.password)
            if self.as_user:
                shutil.chown(pwfile, self.as_user[2])
            try:
                self._run('initdb', '-D', self.data, '-U', 'jobz', '--pwfile', pwfile, '-A', 'scram-sha-256',
                          '-E', 'UTF8', '--no-sync')
            finally:
                os.unlink(pwfile)
            if self.host not in ('127.0.0.1', '::1', 'localhost'):
                # On a host of its own (a network namespace): clients of the subnets it is on, with the password.
                with open(os.path.join(self.data, 'pg_hba.conf'), 'a') as f:
                    f.write('host all all samenet scram-sha-256\n')
        self._run('pg_ctl', 'start', '-w', '-t', '60', '-D', self.data, '-l', self.log, '-o',
                  f'-c listen_addresses={self.host} -c port={self.port} -c unix_socket_directories={self.folder}')
        return self

    def pid(self) -> int | None:
        """The postmaster's PID, from its pid file (None when it is not running)."""
        try:
            with open(os.path.join(self.data, 'postmaster.pid')) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None

    def url(self, db: str = 'postgres') -> str:
        return f'postgresql://jobz:{self.password}@{self.host}:{self.port}/{db}'

    def new_database(self) -> str:
        """The URL of a new, empty database (one per test keeps tests apart)."""
        import psycopg
        self.databases += 1
        name = f'jobz{self.databases}'
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE {name}')
        return self.url(name)

    def stop(self, mode: str = 'fast') -> None:
        """Stop the server (`immediate`: as a crash would)."""
        if self.pid():
            self._run('pg_ctl', 'stop', '-w', '-m', mode, '-D', self.data, check=False)

    def remove(self) -> None:
        self.stop('immediate')
        shutil.rmtree(self.folder, ignore_errors=True)
