"""The HTTPS front end: only clients with a certificate from our own CA, and the broker knows who."""
import http.client as httpclient
import json
import os
import shutil
import ssl
import subprocess

import pytest

from conftest import TestStack, free_port, http, started, wait_for
from jobz import ca, keys

JOBS = """
hello:
  command: "echo %(who)s >> {out}/hello.txt"
  on_success: "/job_start?job_name=after&who=%(who)s"
after:
  command: "echo after %(who)s >> {out}/after.txt"
  on_success: "/job_start?job_name=gate&who=%(who)s"
gate:
  semaphore: {count: 2}
  on_success: "/job_start?job_name=done"
done:
  command: "echo done >> {out}/done.txt"
"""


def openssl(*args):
    subprocess.run(['openssl', *args], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope='module')
def pki(tmp_path_factory):
    """Our CA (server cert for 127.0.0.1, clients alice, bob, w1), another CA, a self-signed and an expired cert."""
    root = tmp_path_factory.mktemp('pki')
    ours, theirs = str(root / 'ca'), str(root / 'other-ca')
    ca.main(['--dir', ours, 'init'])
    ca.main(['--dir', ours, 'server', 'jobz-tls', '--host', '127.0.0.1'])
    for name in ('alice', 'bob', 'w1', 'semaphore'):
        ca.main(['--dir', ours, 'client', name])
    ca.main(['--dir', theirs, 'init'])
    ca.main(['--dir', theirs, 'client', 'mallory'])
    selfsigned = str(root / 'self')
    openssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '30',
            '-subj', '/CN=alice', '-keyout', selfsigned + '.key', '-out', selfsigned + '.crt')
    expired = str(root / 'expired')
    openssl('req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
            '-subj', '/CN=alice', '-keyout', expired + '.key', '-out', expired + '.csr')
    openssl('x509', '-req', '-in', expired + '.csr', '-CA', f'{ours}/ca.crt', '-CAkey', f'{ours}/ca.key',
            '-days', '-1', '-out', expired + '.crt')
    clients = str(root / 'clients')      # the broker's folder: alice, w1 and the semaphore; not bob
    os.makedirs(clients)
    for name in ('alice', 'w1', 'semaphore'):
        shutil.copy(f'{ours}/clients/{name}.crt', clients)
    return {'ca': ours, 'clients': clients,
            'cert': lambda n: (f'{ours}/clients/{n}.crt', f'{ours}/clients/{n}.key'),
            'mallory': (f'{theirs}/clients/mallory.crt', f'{theirs}/clients/mallory.key'),
            'self': (selfsigned + '.crt', selfsigned + '.key'), 'expired': (expired + '.crt', expired + '.key')}


@pytest.fixture(scope='module')
def stack(pki, tmp_path_factory):
    with started(TestStack(str(tmp_path_factory.mktemp('tls')), JOBS, tls=pki['ca'], tls_port=free_port(),
                           clients=pki['clients'])) as s:
        yield s


def tls_get(stack, pki, path, cert=None, version=None, headers=None):
    """GET over TLS; (status, JSON body). Raises on a refused handshake."""
    ctx = ssl.create_default_context(cafile=f"{pki['ca']}/ca.crt")
    if cert:
        ctx.load_cert_chain(*cert)
    if version:
        ctx.set_ciphers('DEFAULT:@SECLEVEL=0')    # let the client even try an old version
        ctx.minimum_version = ctx.maximum_version = version
    conn = httpclient.HTTPSConnection('127.0.0.1', stack.tls_port, context=ctx, timeout=10)
    try:
        conn.request('GET', path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_client_with_our_certificate_is_served_and_named(stack, pki):
    status, run = tls_get(stack, pki, '/job_start?job_name=hello&who=alice', pki['cert']('alice'))
    assert status == 200
    status = stack.wait_run(run['run_id'])
    assert status['state'] == 'succeeded' and status['triggered_by'] == 'alice'


@pytest.mark.parametrize('which', ['none', 'mallory', 'self', 'expired'])
def test_other_certificates_are_refused_before_the_broker(stack, pki, which):
    before = len(stack.runs('hello'))
    cert = None if which == 'none' else pki[which]
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_get(stack, pki, '/job_start?job_name=hello&who=' + which, cert)
    assert len(stack.runs('hello')) == before
    with open(os.path.join(stack.log_dir, 'broker.log')) as f:
        assert f'who={which}' not in f.read() and which not in [r['params']['who'] for r in stack.runs('hello')]


@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('version', [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused(stack, pki, version):
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_get(stack, pki, '/health', pki['cert']('alice'), version=version)
    assert tls_get(stack, pki, '/health', pki['cert']('alice'), version=ssl.TLSVersion.TLSv1_2)[0] == 200


def test_certificate_not_enrolled_gets_403_and_revocation_works(stack, pki, tmp_path):
    status, body = tls_get(stack, pki, '/health', pki['cert']('bob'))
    assert status == 403 and 'not enrolled' in body['error']
    shutil.copy(pki['cert']('bob')[0], pki['clients'])
    try:
        wait_for(lambda: tls_get(stack, pki, '/health', pki['cert']('bob'))[0] == 200, what='bob enrolled')
    finally:
        os.unlink(os.path.join(pki['clients'], 'bob.crt'))
    wait_for(lambda: tls_get(stack, pki, '/health', pki['cert']('bob'))[0] == 403, what='bob revoked')


def test_fingerprint_header_from_a_client_is_ignored(stack, pki):
    alice = ca.fingerprint(pki['cert']('alice')[0])
    status, run = http(stack.url + '/job_start?job_name=hello&who=plain', headers={'PEER_CERT_SHA1': alice})
    assert status == 200
    assert stack.status(run['run_id'])['triggered_by'] == 'plain:127.0.0.1'
    status, body = tls_get(stack, pki, '/health', pki['cert']('bob'), headers={'PEER_CERT_SHA1': alice})
    assert status == 403


def test_everything_secure_tls_and_curve_end_to_end(make_stack, pki, tmp_path):
    """Front end over HTTPS only for our clients; broker and agents over CURVE; handlers over HTTPS."""
    kdir, enrolled = str(tmp_path / 'keys'), str(tmp_path / 'enrolled')
    for name in ('broker', 'w1', 'semaphore'):
        keys.main(['new', name, '--dir', kdir])
        if name != 'broker':
            keys.main(['enroll', f'{kdir}/{name}.key', '--enrolled', enrolled])
    stack = make_stack(JOBS, start=False, tls=pki['ca'], tls_port=free_port(), clients=pki['clients'])
    stack.broker_args = ['--curve-secret', f'{kdir}/broker.key_secret', '--enrolled', enrolled]

    def secure(name):
        cert, key = pki['cert'](name)
        return ['--curve-secret', f'{kdir}/{name}.key_secret', '--broker-key', f'{kdir}/broker.key',
                '--url', stack.tls_url, '--tls-cert', cert, '--tls-key', key, '--tls-ca', f"{pki['ca']}/ca.crt"]
    stack.start([('w1', secure('w1'))], semaphore=False)
    stack.start_semaphore('semaphore', *secure('semaphore'))
    stack.wait_healthy(20, workers=2)
    runs = [tls_get(stack, pki, f'/job_start?job_name=hello&who=x{i}', pki['cert']('alice'))[1] for i in range(2)]
    assert all(r['workers'] == ['w1'] for r in runs)
    assert wait_for(lambda: stack.lines('done.txt'), timeout=30) == ['done']
    for run in runs:
        status = stack.status(run['run_id'])
        assert status['triggered_by'] == 'alice'
        child = stack.status(status['children'][0])
        assert child['job'] == 'after' and child['triggered_by'] == 'w1'    # the worker's own certificate
    done = stack.runs('done')[0]
    assert stack.status(done['run_id'])['triggered_by'] == 'semaphore'


def test_ca_tool_gives_clear_errors_and_private_keys(tmp_path, capsys):
    folder = str(tmp_path / 'ca')
    assert ca.main(['--dir', folder, 'client', 'alice']) == 1
    assert 'jobz-ca init' in capsys.readouterr().err
    assert ca.main(['--dir', folder, 'init']) == 0
    assert ca.main(['--dir', folder, 'init']) == 1     # never overwrites a CA by accident
    assert '--force' in capsys.readouterr().err
    assert ca.main(['--dir', folder, 'client', 'alice']) == 0
    assert os.stat(f'{folder}/ca.key').st_mode & 0o077 == 0
    assert os.stat(f'{folder}/clients/alice.key').st_mode & 0o077 == 0
    assert ca.fingerprint(f'{folder}/clients/alice.crt') in capsys.readouterr().out


def test_a_client_enrolled_with_some_jobs_starts_only_those(stack, pki):
    ca.main(['--dir', pki['ca'], 'client', 'carol', '--jobs', 'hel*,done'])
    shutil.copy(f"{pki['ca']}/clients/carol.crt", pki['clients'])    # the `# jobs:` line travels with it
    carol = pki['cert']('carol')
    try:
        wait_for(lambda: tls_get(stack, pki, '/jobs', carol)[0] == 200, what='carol enrolled')
        assert sorted(tls_get(stack, pki, '/jobs', carol)[1]) == ['done', 'hello']
        status, run = tls_get(stack, pki, '/job_start?job_name=hello&who=carol', carol)
        assert status == 200 and stack.wait_run(run['run_id'])['triggered_by'] == 'carol'
        status, body = tls_get(stack, pki, '/job_start?job_name=after&who=carol-direct', carol)
        assert status == 403 and 'may not start job after' in body['error']
        assert 'carol-direct' not in [r['params'].get('who') for r in stack.runs('after')]
    finally:
        os.unlink(os.path.join(pki['clients'], 'carol.crt'))


def test_a_workers_certificate_starts_only_what_its_handlers_name(stack, pki):
    w1 = pki['cert']('w1')    # the name of a worker the broker knows: its certificate is that worker's
    assert sorted(tls_get(stack, pki, '/jobs', w1)[1]) == ['after', 'gate']    # hello's and after's handlers
    status, body = tls_get(stack, pki, '/job_start?job_name=hello&who=stolen', w1)
    assert status == 403
    assert tls_get(stack, pki, '/jobs', pki['cert']('alice'))[1].keys() == {'hello', 'after', 'gate', 'done'}


def test_over_https_only_a_runs_own_worker_may_link_to_it(stack, pki):
    alice, w1 = pki['cert']('alice'), pki['cert']('w1')
    status, run = tls_get(stack, pki, '/job_start?job_name=hello&who=linked', alice)
    parent = run['run_id']
    stack.wait_run(parent)
    # Its handler's key belongs to w1: alice cannot take it (and so start `after` her way first).
    status, body = tls_get(stack, pki, f'/job_start?job_name=after&who=evil&parent={parent}'
                                       f'&key={parent}.w1.succeeded', alice)
    assert status == 403 and 'belongs to worker w1' in body['error']
    status, body = tls_get(stack, pki, f'/job_start?job_name=hello&who=evil&parent={parent}', alice)
    assert status == 403 and f'only a worker of run {parent}' in body['error']
    status, body = tls_get(stack, pki, f'/job_note?run_id={parent}&note=forged&worker=w1', alice)
    assert status == 403
    # The worker itself may, and its note is signed with its certificate's name, whatever it claims.
    status, _ = tls_get(stack, pki, f'/job_note?run_id={parent}&note=real&worker=someone-else', w1)
    assert status == 200
    assert [(n['worker'], n['note']) for n in stack.status(parent)['notes']] == [('w1', 'real')]
    assert 'evil' not in [r['params'].get('who') for r in stack.runs('after') + stack.runs('hello')]
