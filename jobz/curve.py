"""CURVE between broker and workers: key files, the folder of enrolled keys, the ZAP authenticator.

A key file is ZeroMQ's certificate format (as pyzmq writes it). The broker has a
secret key; workers pin its public key. The broker admits exactly the public
keys in its enrolled folder, one file NAME.key per worker or semaphore; NAME is
the identity the broker uses for it, whatever name the worker claims. A file may
carry `topics = a,b` under `metadata`: that key then receives only those topics.
"""
import logging
import os
import threading

import zmq
from zmq.auth.certs import load_certificate
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .files import WatchedFolder, write_replace
from .jobfile import NAME_RE

log = logging.getLogger('jobz.curve')

PUB_DOMAIN = 'jobz-pub'        # ZAP domain of the broker's PUB socket (live calls)
ROUTER_DOMAIN = 'jobz-router'  # ZAP domain of its ROUTER socket (sync, results)


def read_metadata(path: str) -> dict[str, str]:
    """The `metadata` section of a key file as a dict."""
    meta, section = {}, None
    with open(path, encoding='utf-8') as f:
        for line in f:
            if not line.strip() or line.lstrip().startswith('#'):
                continue
            if not line[0].isspace():
                section = line.strip()
            elif section == 'metadata' and '=' in line:
                k, v = line.split('=', 1)
                meta[k.strip()] = v.strip().strip('"\'')
    return meta


def write_public(path: str, public_key: bytes, metadata: dict[str, str] | None = None) -> None:
    """Write a public key file (with metadata) atomically."""
    lines = ['#   jobz enrolled public key (ZeroMQ CURVE certificate)', 'metadata']
    lines += [f'    {k} = {v}' for k, v in (metadata or {}).items()]
    lines += ['curve', f'    public-key = "{public_key.decode()}"', '']
    write_replace(path, '\n'.join(lines).encode(), 0o644)


class Enrolled:
    """The folder of enrolled public keys, re-read whenever it changes."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{folder}: no such folder of enrolled keys')
        self.watch = WatchedFolder(folder, '.key')
        self.keys: dict[bytes, tuple[str, frozenset | None]] = {}   # z85 key -> (name, topics or None)
        self.lock = threading.Lock()     # the ZAP thread reads while the broker reloads
        self.refresh()

    def refresh(self) -> tuple[set, set]:
        """Re-read the folder if it changed; return (names added, names removed)."""
        files = self.watch.changed()
        if files is None:
            return set(), set()
        keys = {}
        for name, path in files:
            if not NAME_RE.match(name):
                log.error('%s: the file name must be a worker name (letters, digits, _ . -); ignored', path)
                continue
            try:
                public, _ = load_certificate(path)
                topics = read_metadata(path).get('topics')
            except FileNotFoundError:
                continue    # removed while we looked: revoked
            except (OSError, ValueError) as e:
                log.error('%s: not a usable key file (%s); ignored', path, e)
                continue
            keys[public] = (name, frozenset(t.strip() for t in topics.split(',') if t.strip())
                            if topics is not None else None)
        before = {n for n, _ in self.keys.values()}
        after = {n for n, _ in keys.values()}
        with self.lock:
            self.keys = keys
        if before != after:
            log.info('enrolled keys: %s', ', '.join(sorted(after)) or 'none')
        return after - before, before - after

    def lookup(self, z85_key: bytes):
        with self.lock:
            return self.keys.get(z85_key)

    def allowed_topics(self, name: str):
        """The topics `name` may receive (None: all), or False when it is not enrolled."""
        with self.lock:
            for n, topics in self.keys.values():
                if n == name:
                    return topics
        return False


class KeyCheck:
    """ZAP's questions: is this key enrolled (here), and what is its name (User-Id)?"""

    def __init__(self, enrolled: Enrolled):
        self.enrolled = enrolled

    def callback(self, domain: str, z85_key: bytes) -> bool:
        entry = self.enrolled.lookup(z85_key)
        if entry is None:
            log.warning('refused an unknown CURVE key %s on %s', z85_key.decode(), domain)
            return False
        # A key limited to some topics may not subscribe to the PUB socket, where it could
        # pick any topic; the broker sends it its calls over the ROUTER instead.
        if domain == PUB_DOMAIN and entry[1] is not None:
            return False
        return True

    def user_id(self, client_public_key: bytes) -> str:
        entry = self.enrolled.lookup(z85.encode(client_public_key))
        return entry[0] if entry else ''


def start_authenticator(ctx: zmq.Context, enrolled: Enrolled) -> ThreadAuthenticator:
    """pyzmq's ZAP thread, asking KeyCheck; stop it with .stop()."""
    auth = ThreadAuthenticator(ctx, log=logging.getLogger('jobz.zap'))
    auth.start()
    check = KeyCheck(enrolled)
    for domain in (PUB_DOMAIN, ROUTER_DOMAIN):
        auth.configure_curve_callback(domain, credentials_provider=check)
    # The object that answers ZAP differs between pyzmq versions (Debian's 24 proxies to it,
    # 25+ is it): either way it is thread.authenticator, and its curve_user_id names the peer.
    auth.thread.authenticator.curve_user_id = check.user_id
    return auth


def make_server(sock: zmq.Socket, secret_file: str, domain: str) -> None:
    public, secret = load_keypair(secret_file)
    sock.zap_domain = domain.encode()
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_server = True


def make_client(sock: zmq.Socket, secret_file: str, broker_public_file: str) -> None:
    sock.curve_publickey, sock.curve_secretkey = load_keypair(secret_file)
    sock.curve_serverkey, _ = load_certificate(broker_public_file)


def load_keypair(secret_file: str) -> tuple[bytes, bytes]:
    public, secret = load_certificate(secret_file)
    if secret is None:
        raise ValueError(f'{secret_file}: holds no secret key (use the .key_secret file)')
    return public, secret
