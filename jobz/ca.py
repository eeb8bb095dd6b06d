"""jobz-ca: a tiny certificate authority for the HTTPS front end (drives the openssl command).

Layout of the CA folder:  ca.key ca.crt  servers/NAME.{crt,key}  clients/NAME.{crt,key}
Keys are EC P-256 (Mongrel2 1.12.2 on Debian links mbedTLS 2.28, which takes them).
A server NAME is the Mongrel2 server uuid: copy servers/NAME.crt and NAME.key into
its `certdir`. Mongrel2 tells the handler a client's PEER_CERT_SHA1, printed by
`client` and `fingerprint`, so the broker can name who called.
"""
import argparse
import hashlib
import ipaddress
import os
import re
import secrets
import ssl
import subprocess
import sys

from .files import UnsafePath, state_dir, write_replace

DEFAULT_DIR = 'var/ca/'
NAME_RE = re.compile(r'[A-Za-z0-9_.-]+\Z')     # also a file name and a plain CN: no escaping needed
PEM_RE = re.compile(r'-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----', re.S)
JOBS_LINE = '# jobs: '    # first line of a client certificate limited to some jobs (client --jobs)
JOB_PATTERN_RE = re.compile(r'[A-Za-z0-9_.*?\[\]-]+\Z')   # a job name, or a shell-style pattern of them
CURVE = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256']


class CAError(Exception):
    """A problem the user can fix; the message says how."""


def openssl(*args: str) -> str:
    try:
        done = subprocess.run(['openssl', *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise CAError('the openssl command is missing (apt-get install openssl)') from None
    if done.returncode:
        raise CAError(f'openssl {args[0]} failed:\n{done.stderr.strip()}')
    return done.stdout


def fingerprint(cert_path: str) -> str:
    """A certificate's SHA1 as Mongrel2 sends it in PEER_CERT_SHA1: upper-case hex plus '00'."""
    return pem_fingerprint(read_cert(cert_path), cert_path)


def read_cert(cert_path: str) -> str:
    try:
        with open(cert_path, encoding='ascii') as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CAError(f'{cert_path}: cannot read a PEM certificate ({e})') from e


def pem_fingerprint(text: str, where: str) -> str:
    pem = PEM_RE.search(text)
    if not pem:
        raise CAError(f'{where}: no PEM certificate in it')
    try:
        der = ssl.PEM_cert_to_DER_cert(pem.group())
    except ValueError:
        raise CAError(f'{where}: the PEM certificate is damaged') from None
    # Seen on Debian's 1.12.2: the 40 digits of the SHA1 of the DER bytes, then a stray byte, always 00.
    return hashlib.sha1(der).hexdigest().upper() + '00'


def allowed_jobs(text: str) -> tuple[str, ...] | None:
    """The job patterns a client certificate file was enrolled with (its `# jobs:` line), or None: any job.

    OpenSSL, curl and Python read past text before the PEM block, so the line travels with the file."""
    for line in text.splitlines():
        if line.startswith(JOBS_LINE):
            return tuple(p.strip() for p in line[len(JOBS_LINE):].split(',') if p.strip())
        if line.startswith('-----BEGIN'):
            break
    return None


def issue(key: str, crt: str, subject: str, days: int, exts: list[str], ca: str | None = None) -> None:
    """Make a new key and a certificate for it: self-signed, or signed by the CA in folder `ca`."""
    signer = ['-CA', os.path.join(ca, 'ca.crt'), '-CAkey', os.path.join(ca, 'ca.key')] if ca else ['-x509']
    tmp_key, tmp_crt = key + '.tmp', crt + '.tmp'    # a failure never leaves a key without its cert
    for path in (tmp_key, tmp_crt):
        if os.path.lexists(path):    # left by a failed run (or planted): openssl would write through a link
            os.unlink(path)
    old = os.umask(0o077)            # the key is never readable by others, not even for a moment
    try:
        # -config /dev/null: no defaults from the system openssl.cnf (whose v3_ca would make every cert a CA).
        openssl('req', '-config', os.devnull, '-new', *CURVE, '-noenc', '-keyout', tmp_key, '-subj', subject,
                *signer, '-days', str(days), '-set_serial', '0x' + secrets.token_hex(16),
                *[arg for ext in exts for arg in ('-addext', ext)], '-out', tmp_crt)
        os.chmod(tmp_key, 0o600)
        os.chmod(tmp_crt, 0o644)
        os.replace(tmp_key, key)
        os.replace(tmp_crt, crt)
    finally:
        os.umask(old)
        for path in (tmp_key, tmp_crt):
            if os.path.lexists(path):
                os.unlink(path)


def prepare(path: str, force: bool) -> None:
    """Refuse to replace an existing file without --force; create its folder (mode 0700, ours only)."""
    if os.path.lexists(path) and not force:    # lexists: a dangling symbolic link counts as there
        raise CAError(f'{path} exists; add --force to replace it')
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    try:
        state_dir(folder)
    except UnsafePath as e:
        raise CAError(str(e)) from None


def init(args) -> None:
    key, crt = os.path.join(args.dir, 'ca.key'), os.path.join(args.dir, 'ca.crt')
    prepare(key, args.force)
    prepare(crt, args.force)
    issue(key, crt, f'/CN={args.cn}', args.days,
          ['basicConstraints=critical,CA:TRUE,pathlen:0', 'keyUsage=critical,keyCertSign,cRLSign'])
    print(crt)


def leaf(args, kind: str, exts: list[str]) -> str:
    if not NAME_RE.match(args.name):
        raise CAError(f'name {args.name!r} may only hold letters, digits and _ . -')
    if not all(os.path.exists(os.path.join(args.dir, f)) for f in ('ca.key', 'ca.crt')):
        raise CAError(f'no CA in {args.dir}: run `jobz-ca init` first (or pass --dir / set JOBZ_CA)')
    key, crt = (os.path.join(args.dir, kind, args.name + ext) for ext in ('.key', '.crt'))
    prepare(key, args.force)
    prepare(crt, args.force)
    issue(key, crt, f'/CN={args.name}', args.days,
          ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature', *exts], ca=args.dir)
    return crt


def server(args) -> None:
    alt = []
    for host in args.host:
        try:
            alt.append(f'IP:{ipaddress.ip_address(host)}')
        except ValueError:
            alt.append(f'DNS:{host}')
    crt = leaf(args, 'servers', ['extendedKeyUsage=serverAuth', 'subjectAltName=' + ','.join(alt)])
    print(crt)
    print(crt[:-4] + '.key')


def client(args) -> None:
    jobs = [j.strip() for j in (args.jobs or '').split(',') if j.strip()]
    bad = [j for j in jobs if not JOB_PATTERN_RE.match(j)]
    if bad or (args.jobs is not None and not jobs):
        raise CAError(f"--jobs {args.jobs!r}: give job names or patterns such as 'deploy_*,report', "
                      'separated by commas')
    crt = leaf(args, 'clients', ['extendedKeyUsage=clientAuth'])
    if jobs:    # the broker reads this line from its copy in --clients
        write_replace(crt, (f'{JOBS_LINE}{",".join(jobs)}\n' + read_cert(crt)).encode(), 0o644)
    print(crt)
    print(crt[:-4] + '.key')
    print(fingerprint(crt))


def show_fingerprint(args) -> None:
    print(fingerprint(args.cert))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='jobz-ca', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--dir', default=os.environ.get('JOBZ_CA', DEFAULT_DIR),
                    help=f'CA folder (default: {DEFAULT_DIR}; env JOBZ_CA)')
    sub = ap.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name, func, help, days=None):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if days:
            p.add_argument('--days', type=int, default=days, help=f'validity in days (default: {days})')
            p.add_argument('--force', action='store_true', help='replace existing files (default: refuse)')
        return p

    command('init', init, 'create the CA: ca.key and a self-signed ca.crt', 3650).add_argument(
        '--cn', default='jobz CA', help='the CA common name (default: jobz CA)')
    p = command('server', server, 'a front-end certificate: servers/NAME.crt and .key', 730)
    p.add_argument('name', metavar='NAME', help='the Mongrel2 server uuid (it names the files Mongrel2 reads)')
    p.add_argument('--host', action='append', required=True,
                   help='a DNS name or IP address clients use (repeat for more)')
    p = command('client', client, 'a client certificate (CN=NAME): clients/NAME.crt and .key', 365)
    p.add_argument('name', metavar='NAME', help='the client name the broker will log')
    p.add_argument('--jobs', help="the only jobs it may start, comma-separated, patterns allowed ('deploy_*,report'); "
                                  'default: any job')
    command('fingerprint', show_fingerprint, "print a certificate's PEER_CERT_SHA1 as Mongrel2 sends it"
            ).add_argument('cert', metavar='CERT', help='a PEM certificate file')
    args = ap.parse_args(argv)
    if getattr(args, 'days', 1) < 1:
        ap.error('--days must be at least 1')
    try:
        args.func(args)
    except CAError as e:
        print(f'jobz-ca: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
