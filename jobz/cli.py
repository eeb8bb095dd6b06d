"""Command-line plumbing shared by the scripts: flags with JOBZ_* fallbacks, checks before start-up."""
import argparse
import ipaddress
import logging
import os
import sys

from . import defaults
from .files import UnsafePath, state_dir
from .jobfile import NAME_RE, JobFileError, load_jobs
from .logs import configure_logging

LEVELS = ('debug', 'info', 'warning', 'error')


class Parser(argparse.ArgumentParser):
    def option(self, *flags, env: str, default=None, help: str = '', shown=None, **kw):
        """A flag whose default comes from the environment variable `env`, then `default`."""
        value = os.environ.get(env, default)
        if 'choices' in kw and value not in kw['choices']:    # argparse checks only what is typed
            self.error(f"{env}={value!r}: choose from {', '.join(map(str, kw['choices']))}")
        shown = shown or ('none' if default is None else default)
        self.add_argument(*flags, default=value, help=f'{help} (default: {shown}; env {env})', **kw)

    def flag(self, *flags, env: str, help: str):
        """An on/off flag, also on when the environment variable `env` is 1, true or yes."""
        on = os.environ.get(env, '').strip().lower() in ('1', 'true', 'yes')
        self.add_argument(*flags, action='store_true', default=on, help=f'{help} (default: off; env {env}=1)')

    def jobs_option(self):
        default = os.environ.get('JOBZ_JOBS', defaults.JOBS)
        self.add_argument('--jobs', nargs='+', default=default.split(':'), metavar='PATH',
                          help='job files or folders of *.yaml (default: jobs/; env JOBZ_JOBS, '
                               'several separated by colons)')

    def agent_options(self):
        """Flags shared by worker.py and semaphore.py: state, the broker, the front end."""
        self.option('--home', env='JOBZ_HOME', default=defaults.HOME, help='state folder')
        self.option('--pub', env='JOBZ_PUB', default=defaults.PUB,
                    help="broker's address for live calls; several front ends: comma-separated")
        self.option('--router', env='JOBZ_ROUTER', default=defaults.ROUTER,
                    help="broker's address for sync and results; several front ends: comma-separated")
        self.option('--url', env='JOBZ_URL', default=defaults.URL,
                    help='front-end base URL for on_success/on_failure (and $JOBZ_URL in commands: the first); '
                         'several front ends: comma-separated, a handler call goes to the next when one fails')
        self.option('--sync-interval', env='JOBZ_SYNC_INTERVAL', default=1.0, type=float,
                    help='seconds between syncs (heartbeats) with the broker')
        self.option('--rcvhwm', env='JOBZ_RCVHWM', default=1000, type=int,
                    help='live calls queued before ZeroMQ drops them (sync fetches what was dropped)')
        self.option('--tls-cert', env='JOBZ_TLS_CERT', default=None,
                    help='client certificate for an https:// --url (from jobz-ca client NAME)')
        self.option('--tls-key', env='JOBZ_TLS_KEY', default=None, help='its private key')
        self.option('--tls-ca', env='JOBZ_TLS_CA', default=None, help="the CA certificate that signed the front end's")
        self.option('--curve-secret', env='JOBZ_CURVE_SECRET', default=None,
                    help='own CURVE secret key file (NAME.key_secret); with --broker-key: encrypt and authenticate')
        self.option('--broker-key', env='JOBZ_BROKER_KEY', default=None,
                    help="the broker's CURVE public key file (broker.key), pinned")
        self.logging_options()

    def logging_options(self):
        self.option('--log-level', env='JOBZ_LOG_LEVEL', default='info', choices=LEVELS,
                    help='least important messages logged (info: a line per run; warning: problems only)')
        self.add_argument('-v', '--verbose', action='store_true', help='log debug messages (--log-level debug)')

    def parse_agent_args(self, argv):
        args = self.parse_args(argv)
        if not NAME_RE.match(args.name):
            self.error(f'--name {args.name!r} may only hold letters, digits and _ . -')
        check_curve(self, args.curve_secret, args.broker_key, '--broker-key')
        if bool(args.tls_cert) != bool(args.tls_key):
            self.error('--tls-cert and --tls-key go together')
        for path in (args.tls_cert, args.tls_key, args.tls_ca):
            if path and not os.path.exists(path):
                self.error(f'{path}: no such file')
        return args


def is_loopback(addr: str) -> bool:
    """Whether a ZeroMQ address stays on this host: ipc://, inproc://, or tcp:// on a loopback address."""
    scheme, _, rest = addr.partition('://')
    if scheme in ('ipc', 'inproc'):
        return True
    host = rest.rsplit(':', 1)[0].strip('[]')
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False    # '*', an interface name or a host name: not loopback for sure


def check_curve(parser, secret: str | None, other: str | None, other_flag: str) -> None:
    """CURVE needs both files, readable, before any socket is made."""
    if bool(secret) != bool(other):
        parser.error(f'--curve-secret and {other_flag} go together')
    for path in (secret, other):
        if path and not os.path.exists(path):
            parser.error(f'{path}: no such file')


def setup_logging(args, who: str) -> None:
    configure_logging('debug' if args.verbose else args.log_level, who)


def home_or_exit(path: str) -> str:
    """The state folder, created private (0700) or checked: ours, a real folder, only we can write."""
    try:
        return state_dir(path)
    except (UnsafePath, OSError) as e:
        sys.exit(f'error: --home: {e}')


def load_or_exit(paths, log: logging.Logger) -> dict:
    """Load job files or stop the program with a message naming file, job and key."""
    try:
        return load_jobs(paths)
    except JobFileError as e:
        log.error('%s', e)
        sys.exit(f'error: {e}')
