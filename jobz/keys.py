"""jobz-keys: CURVE key pairs for the broker and workers, and the broker's enrolled folder."""
import argparse
import os
import sys

import zmq
import zmq.auth

from .curve import read_metadata, write_public
from .files import UnsafePath, state_dir, write_new
from .jobfile import NAME_RE


def key_file(public: bytes, secret: bytes | None = None) -> bytes:
    """A key file in ZeroMQ's certificate format (what zmq.auth.load_certificate reads)."""
    lines = ['#   jobz CURVE key (ZeroMQ certificate format)', 'metadata', 'curve',
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ('\n'.join(lines) + '\n').encode()


def cmd_new(args) -> None:
    state_dir(args.dir)
    base = os.path.join(args.dir, args.name)
    public, secret = base + '.key', base + '.key_secret'
    for path in (public, secret):
        if os.path.lexists(path):    # lexists: a dangling symbolic link is something there too
            if not args.force:
                sys.exit(f'error: {path} exists; use --force to replace it')
            os.unlink(path)
    pub, sec = zmq.curve_keypair()
    write_new(secret, key_file(pub, sec), 0o600)    # 0600 from the start, never readable by others
    write_new(public, key_file(pub), 0o644)
    print(f'public key (give it to the other side): {public}\nsecret key (keep it here):             {secret}')


def cmd_enroll(args) -> None:
    public, _ = zmq.auth.load_certificate(args.key)
    name = args.name or os.path.basename(args.key).split('.')[0]
    if not NAME_RE.match(name):
        sys.exit(f'error: {name!r} is not a usable worker name (letters, digits, _ . -)')
    os.makedirs(args.enrolled, exist_ok=True)
    meta = {'topics': args.topics} if args.topics is not None else {}
    write_public(os.path.join(args.enrolled, name + '.key'), public, meta)
    print(f'enrolled {name}' + (f' for topics {args.topics}' if args.topics is not None else ' for all topics'))


def cmd_revoke(args) -> None:
    path = os.path.join(args.enrolled, args.name + '.key')
    if not os.path.exists(path):
        sys.exit(f'error: {args.name} is not enrolled in {args.enrolled}')
    os.unlink(path)
    print(f'revoked {args.name}: the broker refuses it within seconds')


def cmd_list(args) -> None:
    for f in sorted(os.listdir(args.enrolled)):
        if f.endswith('.key'):
            topics = read_metadata(os.path.join(args.enrolled, f)).get('topics')
            print(f"{f[:-4]}\t{topics if topics is not None else '(all topics)'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='jobz-keys', description=__doc__)
    sub = ap.add_subparsers(dest='command', required=True)
    p = sub.add_parser('new', help='create NAME.key (public) and NAME.key_secret (secret, mode 0600)')
    p.add_argument('name', help='broker, or the worker name')
    p.add_argument('--dir', default=os.environ.get('JOBZ_KEYS', 'var/keys'),
                   help='where to write (default: var/keys; env JOBZ_KEYS)')
    p.add_argument('--force', action='store_true', help='replace existing files')
    p.set_defaults(func=cmd_new)
    enrolled = os.environ.get('JOBZ_ENROLLED', 'var/enrolled')
    p = sub.add_parser('enroll', help="admit a worker's public key to the broker")
    p.add_argument('key', help="the worker's public key file (NAME.key)")
    p.add_argument('--name', help='identity of the worker (default: the file name)')
    p.add_argument('--topics', help='comma-separated topics it may receive (default: all)')
    p.add_argument('--enrolled', default=enrolled, help=f'the broker\'s folder (default: {enrolled}; env JOBZ_ENROLLED)')
    p.set_defaults(func=cmd_enroll)
    p = sub.add_parser('revoke', help='remove a worker from the enrolled folder')
    p.add_argument('name')
    p.add_argument('--enrolled', default=enrolled, help=f'the broker\'s folder (default: {enrolled}; env JOBZ_ENROLLED)')
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser('list', help='list enrolled workers and their topics')
    p.add_argument('--enrolled', default=enrolled, help=f'the broker\'s folder (default: {enrolled}; env JOBZ_ENROLLED)')
    p.set_defaults(func=cmd_list)
    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError, UnsafePath) as e:
        sys.exit(f'error: {e}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
