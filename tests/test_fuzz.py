"""Bounded fuzzing of every edge a peer can write to: Mongrel2 -> broker, worker -> broker, broker -> agent.

Each test drives the real code over real ZeroMQ sockets on free loopback ports, one
message at a time, and checks after each message that the process is still healthy
(a sentinel request is answered) and that nothing was journaled that should not be.
"""
import collections
import json
import logging
import os
import random
import re
import threading
import time
import uuid
from urllib.parse import quote, quote_plus

import pytest
import zmq
from hypothesis import HealthCheck, example, given, note, settings, strategies as st

from conftest import free_port, wait_for
from jobz import protocol as p
from jobz.agent import Agent
from jobz.broker import Broker
from jobz.front import MAX_WAIT, Front
from jobz.views import Views
from jobz.jobfile import PARAM_NAME_RE, load_jobs
from jobz.journal import Journal

# JOBZ_FUZZ_SCALE=10 runs ten times as many examples (a deeper, slower search).
SCALE = float(os.environ.get('JOBZ_FUZZ_SCALE', '1'))
# The default run is derandomized: the same examples every time, so CI is repeatable;
# a scaled run explores new ones.
FUZZ = settings(max_examples=int(200 * SCALE), deadline=None, database=None, derandomize=SCALE == 1,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
SHORT = settings(FUZZ, max_examples=int(100 * SCALE))

JOBS = r"""
touch:
  command: "touch {out}/marker-%(name)s"
dated:
  command: "touch {out}/dated-%(date)s"
  params:
    date: '\d{4}_\d{2}_\d{2}'
defaulted:
  command: "touch {out}/def-%(region)s"
  topic: shared
  defaults: {region: eu}
"""
SAFE_RE = re.compile(r'[A-Za-z0-9_.,:@+=/-]*\Z')
OK_STATUSES = {200, 400, 403, 404, 405, 409, 413}      # 500 is never acceptable for a client's input
RESULT_STATES = ('pending', 'running') + p.FINAL_STATES

ROUTES = sorted(Front({}, None, Views({}, None, None, None, None), None, None, None).routes)    # every path served

# -- helpers --------------------------------------------------------------------------

def netstring(b: bytes) -> bytes:
    return str(len(b)).encode() + b':' + b + b','


def m2_message(sender: bytes, conn_id: bytes, path: bytes, headers: bytes, body: bytes) -> bytes:
    return b' '.join([sender, conn_id, path, netstring(headers) + netstring(body)])


def short(obj, n: int = 400) -> str:
    """A repr cut to a readable length (a 100 000-deep list would flood the report)."""
    text = repr(obj)
    return text if len(text) <= n else f'{text[:n]}... ({len(text)} characters)'


def term(ctx: zmq.Context, timeout: float = 5.0) -> None:
    """Terminate a context, failing (not hanging) if a socket was left open."""
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), 'zmq context did not terminate: a socket was left open'


def strict_json(data: bytes):
    """json.loads that refuses NaN and Infinity, which are not JSON (RFC 8259)."""
    def refuse(c):
        raise ValueError(f'{c} is not JSON')
    return json.loads(data, parse_constant=refuse)


def oracle_parse(raw: bytes):
    """The Mongrel2 format, `SENDER CONN_ID PATH LEN:HEADERS,LEN:BODY,`, parsed independently of jobz.m2.

    Returns (sender, conn_id, path, headers, body, strict) or None for a message that does not parse;
    `strict` is False for headers that are JSON only once their bytes are read leniently: Mongrel2
    passes a client's header bytes through as they came (say Latin-1), so a broker may answer those."""
    parts = raw.split(b' ', 3)
    if len(parts) != 4:
        return None
    sender, conn_id, path, rest = parts
    fields = []
    for _ in range(2):
        m = re.match(rb'([0-9]{1,10}):', rest)
        if not m:
            return None
        n, start = int(m.group(1)), m.end()
        if len(rest) < start + n + 1 or rest[start + n:start + n + 1] != b',':
            return None
        fields.append(rest[start:start + n])
        rest = rest[start + n + 1:]
    strict = True
    try:
        headers = json.loads(fields[0])
    except UnicodeDecodeError:
        strict = False
        try:
            headers = json.loads(fields[0].decode('utf-8', 'replace'))
        except (ValueError, RecursionError):
            return None
    except (ValueError, RecursionError):
        return None
    if not isinstance(headers, dict):
        return None
    return sender, conn_id, path, headers, fields[1], strict


def is_disconnect_body(body: bytes) -> bool:
    try:
        return json.loads(body).get('type') == 'disconnect'
    except (ValueError, AttributeError, RecursionError):
        return False


KEEP_ALIVE = b'31:3:ctl,21:10:keep-alive,4:true!}]'    # Mongrel2's control message: ["ctl", {"keep-alive": true}]


def recv_reply(sock: zmq.Socket) -> dict:
    """The next HTTP reply on Mongrel2's reply socket; keep-alives for held requests are checked and skipped."""
    while True:
        raw = sock.recv()
        sender, _, rest = raw.partition(b' ')
        if re.match(rb'[0-9]+:X ', rest):
            assert raw.endswith(b', ' + KEEP_ALIVE), f'a control message that is not a keep-alive: {raw[:200]!r}'
            continue
        return parse_reply(raw)


def parse_reply(raw: bytes) -> dict:
    """Check one handler reply is `SENDER LEN:IDS, <HTTP response>`; return its parts."""
    sender, _, rest = raw.partition(b' ')
    m = re.match(rb'([0-9]+):', rest)
    assert m, f'reply has no conn id netstring: {raw[:200]!r}'
    n, start = int(m.group(1)), m.end()
    ids = rest[start:start + n]
    assert rest[start + n:start + n + 2] == b', ', f'bad conn id netstring: {raw[:200]!r}'
    head, sep, body = rest[start + n + 2:].partition(b'\r\n\r\n')
    assert sep, f'HTTP response without an end of head: {raw[:300]!r}'
    lines = head.split(b'\r\n')
    status_line = re.fullmatch(rb'HTTP/1\.1 ([0-9]{3}) [A-Za-z][A-Za-z \'-]*', lines[0])
    assert status_line, f'bad status line {lines[0]!r}'
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b': ')
        assert colon and re.fullmatch(rb'[A-Za-z-]+', name), f'bad header line {line!r}'
        headers[name.lower()] = value
    # JSON, but for /metrics (Prometheus text) and the status page (a browser's Accept at /).
    assert headers.get(b'content-type') in (b'application/json', b'text/plain; version=0.0.4; charset=utf-8',
                                            b'text/html; charset=utf-8'), headers
    assert re.fullmatch(rb'[0-9]+', headers.get(b'content-length', b'')), headers
    return {'sender': sender, 'ids': ids, 'status': int(status_line.group(1)),
            'length': int(headers[b'content-length']), 'body': body,
            'json': headers[b'content-type'] == b'application/json'}


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        out, self.records = self.records, []
        return out


class BrokerRig:
    """A real Broker in-process; we hold Mongrel2's end (PUSH requests, SUB replies) and a worker's DEALER."""

    def __init__(self, root: str):
        os.makedirs(os.path.join(root, 'out'))
        jobs_path = os.path.join(root, 'jobs.yaml')
        with open(jobs_path, 'w') as f:
            f.write(JOBS.replace('{out}', os.path.join(root, 'out')))
        self.jobs = load_jobs(jobs_path)
        self.ctx = zmq.Context()
        addr = {k: f'tcp://127.0.0.1:{free_port()}' for k in ('m2_recv', 'm2_send', 'pub', 'router')}
        self.journal = Journal(os.path.join(root, 'journal.db'))
        self.db = self.journal.db
        self.broker = Broker(self.jobs, self.journal, self.ctx, m2_ident='fuzz', **addr)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.linger = 0
        self.push.sndtimeo = 5000
        self.push.bind(addr['m2_recv'])
        self.replies = self.ctx.socket(zmq.SUB)
        self.replies.linger = 0
        self.replies.subscribe(b'')
        self.replies.bind(addr['m2_send'])
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.sndtimeo = 5000
        self.dealer.routing_id = b'fuzzw'
        self.dealer.connect(addr['router'])
        self.log = Records()
        self.logger = logging.getLogger('jobz.broker')
        self.old_level = self.logger.level
        self.logger.setLevel(logging.WARNING)
        self.logger.addHandler(self.log)
        self.n = 0
        self.fresh = self.final_run = None
        # The SUB joins late: retry until a reply comes back, so later silence means something.
        wait_for(self._first_reply, timeout=10, what='the first reply from the broker')
        self.log.take()

    def _first_reply(self) -> bool:
        self.n += 1
        conn = b'first%d' % self.n
        self.push.send(m2_message(b'rig', conn, b'/health', b'{"METHOD":"GET","PATH":"/health"}', b''))
        assert self.broker.m2.reqs.poll(2000)
        self.broker.step()
        deadline = time.monotonic() + 0.5
        while self.replies.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            if recv_reply(self.replies)['ids'] == conn:
                return True
        return False

    def feed_http(self, raw: bytes) -> None:
        self.push.send(raw)
        assert self.broker.m2.reqs.poll(2000), 'the broker did not receive the message'
        self.broker.step()

    def health(self) -> tuple[dict, list[dict]]:
        """Ask GET /health; return its reply and every reply that came before it."""
        self.n += 1
        conn = b'health%d' % self.n
        self.feed_http(m2_message(b'rig', conn, b'/health',
                                  b'{"METHOD":"GET","PATH":"/health","QUERY":""}', b''))
        before = []
        while True:
            assert self.replies.poll(3000), 'the broker stopped answering /health'
            reply = recv_reply(self.replies)
            if reply['ids'] == conn and reply['sender'] == b'rig':
                return reply, before
            before.append(reply)

    def get(self, path: str, query: str = '') -> dict:
        """One GET through the broker; returns the parsed reply (other replies must not be pending)."""
        self.n += 1
        conn = b'get%d' % self.n
        headers = json.dumps({'METHOD': 'GET', 'PATH': path, 'QUERY': query}).encode()
        self.feed_http(m2_message(b'rig', conn, path.encode(), headers, b''))
        assert self.replies.poll(3000), f'no answer to GET {path}?{query}'
        reply = recv_reply(self.replies)
        assert reply['ids'] == conn, reply
        return reply

    def feed_worker(self, frames: list[bytes]) -> None:
        if frames:    # a DEALER cannot send a message of no frames at all
            self.dealer.send_multipart(frames)
            assert self.broker.router.poll(2000), 'the broker did not receive the worker message'
        self.broker.step()

    def sync(self, topics: list[str], cursors=None) -> dict:
        """Send a valid SYNC and return its CALLS answer (skipping answers to earlier messages)."""
        self.feed_worker([p.SYNC, p.pack({'topics': topics, 'cursors': cursors or {}, 'running': 0})])
        while True:
            assert self.dealer.poll(3000), 'a valid SYNC got no CALLS answer'
            frames = self.dealer.recv_multipart()
            assert len(frames) == 2 and frames[0] in (p.CALLS, p.ACK), frames[:2]
            msg = p.unpack(frames[1])
            if frames[0] == p.CALLS and sorted(msg['cursors']) == sorted(topics):
                return msg

    def runs(self) -> dict:
        return {r['run_id']: dict(r) for r in self.db.execute('SELECT * FROM runs')}

    def fresh_run(self) -> str:
        """A run of `touch` still pending for the worker `fuzzw` (a new one once the last was reported on)."""
        row = self.db.execute("SELECT state FROM results WHERE run_id = ? AND worker = 'fuzzw'",
                              (self.fresh,)).fetchone() if self.fresh else None
        if row is None or row['state'] != 'pending':
            reply = self.get('/job_start', 'job_name=touch&name=fresh')
            assert reply['status'] == 200, reply
            self.fresh = json.loads(reply['body'])['run_id']
            assert self.results().get((self.fresh, 'fuzzw')), 'the fuzz worker is not expected for new runs'
        return self.fresh

    def results(self) -> dict:
        return {(r['run_id'], r['worker']): dict(r) for r in self.db.execute('SELECT * FROM results')}

    def close(self) -> None:
        self.logger.removeHandler(self.log)
        self.logger.setLevel(self.old_level)
        for sock in (self.push, self.replies, self.dealer):
            sock.close(0)
        self.broker.close()
        term(self.ctx)


@pytest.fixture(scope='module')
def http_rig(tmp_path_factory):
    rig = BrokerRig(str(tmp_path_factory.mktemp('http')))
    yield rig
    rig.close()


@pytest.fixture(scope='module')
def worker_rig(tmp_path_factory):
    rig = BrokerRig(str(tmp_path_factory.mktemp('worker')))
    # Real runs to aim results at: some created before the fuzz worker subscribed, some after.
    run_ids = []
    for i in range(6):
        if i == 3:
            rig.sync(['touch', 'shared'])
        reply = rig.get('/job_start', f'job_name={"touch" if i % 2 else "defaulted"}&name=r{i}')
        assert reply['status'] == 200, reply
        run_ids.append(json.loads(reply['body'])['run_id'])
    rig.run_ids = run_ids
    rig.log.take()
    yield rig
    rig.close()


# -- strategies -----------------------------------------------------------------------

def repeat(s: str, n: int) -> str:
    return s * n


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


huge_text = st.builds(repeat, st.text(min_size=1, max_size=3), st.integers(1000, 40000))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.builds(lambda k: 10 ** k, st.integers(18, 600)),     # past SQLite's and float's range
                    st.builds(lambda k: -10 ** k, st.integers(18, 600)))
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8)


def nested(depth: int, kind: str) -> str:
    if kind == 'list':
        return '[' * depth + ']' * depth
    return '{"a":' * depth + '1' + '}' * depth


deep_json = st.builds(nested, st.sampled_from([10, 500, 900, 990, 1000, 5000, 100000]),
                      st.sampled_from(['list', 'dict']))

# HTTP side
QUERY_KEYS = ['job_name', 'name', 'date', 'region', 'key', 'wait', 'parent', 'run_id', 'note', 'worker',
              'limit', 'job', 'Name', 'NAME', 'job_name[]', 'na me', '']
QUERY_VALUES = ['touch', 'dated', 'defaulted', 'nope', '../touch', 'touch\x00', '2026_11_28', '2026-11-28',
                '2026_11_28\n', '0', '0.01', '1e9', 'nan', 'inf', '-1', '3601', '', 'a b', '$(reboot)', '`id`',
                ';rm -rf /', '../../etc/passwd', 'été', '日本', '\x00', '%', '%zz', '%ff%fe', '+', '=', '&']
query_key = st.one_of(st.sampled_from(QUERY_KEYS), st.text(max_size=12))
query_value = st.one_of(st.sampled_from(QUERY_VALUES), st.text(max_size=30), huge_text)
percent_bytes = st.binary(max_size=12).map(lambda b: ''.join('%%%02X' % c for c in b))   # often invalid UTF-8


def encode_pair(key: str, value: str, how: str) -> str:
    if how == 'quote':
        return quote(key, safe='') + '=' + quote(value, safe='')
    if how == 'plus':
        return quote_plus(key) + '=' + quote_plus(value)
    if how == 'raw':
        return key + '=' + value
    return key    # a key with no '='


query_pair = st.one_of(
    st.builds(encode_pair, query_key, query_value, st.sampled_from(['quote', 'plus', 'raw', 'bare'])),
    st.builds(lambda k, v: k + '=' + v, st.sampled_from(['name', 'key', 'job_name', 'run_id']), percent_bytes),
)
query_strings = st.one_of(
    st.builds(lambda pairs, sep: sep.join(pairs), st.lists(query_pair, max_size=8),
              st.sampled_from(['&', '&', '&&', ';', '&amp;'])),
    st.builds(lambda job, pairs: f'job_name={job}&' + '&'.join(pairs),
              st.sampled_from(['touch', 'dated', 'defaulted']), st.lists(query_pair, max_size=6)),
    st.builds(lambda job, pairs: f'job_name={job}&' + '&'.join(pairs),
              st.sampled_from(['touch&name=n', 'dated&date=2026_11_28', 'defaulted']),
              st.lists(query_pair, max_size=3)),
    st.builds(lambda k, n: '&'.join([f'{k}={i}' for i in range(n)]), query_key, st.integers(1, 5000)),  # repeated keys
    st.text(max_size=200),
)
# A trigger of a catalog job, values drawn from the nasty ones: the way to reach add_run.
job_queries = st.builds(
    lambda job, value, pairs, how: '&'.join([f'job_name={job}', encode_pair(*value, how)] + pairs),
    st.sampled_from(['touch', 'dated', 'defaulted']),
    st.tuples(st.sampled_from(['name', 'date', 'region']),
              st.one_of(st.sampled_from(['2026_11_28', 'x$y', 'a b', 'é9']), query_value,
                        st.text('aZ09_.,:@+=/-', min_size=1, max_size=20))),
    st.sampled_from([0, 0, 1, 3]).flatmap(lambda n: st.lists(query_pair, max_size=n)),
    st.sampled_from(['quote', 'plus', 'raw']))
methods = st.one_of(st.sampled_from(['GET', 'GET', 'POST', 'PUT', 'HEAD', 'JSON', 'DELETE', 'get', '', 'GET ']),
                    st.text(max_size=8), json_values)
paths = st.one_of(st.sampled_from(['/job_start'] * 4 + sorted(ROUTES)),
                  st.sampled_from(['/job_start/', '/JOB_START', '//', '', '/../job_start', '/health?x=1',
                                   '/job_start\x00', '/index', '/__init__', '/_required', '/number']),
                  st.text(max_size=20), json_values)
FORM = 'application/x-www-form-urlencoded'
bodies = st.one_of(
    st.just(b''),
    query_strings.map(lambda q: q.encode('utf-8', 'surrogatepass')),
    st.binary(max_size=1000),
    st.builds(random_bytes, st.integers(0, 2 ** 32), st.integers(0, 100_000)),
    st.sampled_from([65535, 65536, 65537]).map(lambda n: b'name=' + b'x' * (n - 5)),
)


def one_in(draw, n: int) -> bool:
    return draw(st.sampled_from(range(n))) == 0    # sampled_from draws evenly; integers() favour the ends


def mostly(draw, usual, odd, odds: int = 3):
    """Draw from `usual` most of the time and from `odd` one time in `odds`."""
    return draw(odd) if one_in(draw, odds) else draw(usual)


@st.composite
def header_dicts(draw):
    headers = {}
    if not one_in(draw, 10):
        headers['METHOD'] = mostly(draw, st.sampled_from(['GET', 'GET', 'GET', 'POST', 'HEAD', 'JSON']), methods, 5)
    if not one_in(draw, 10):
        headers['PATH'] = mostly(draw, st.sampled_from(['/job_start'] * 8 + sorted(ROUTES)), paths, 5)
    if not one_in(draw, 10):
        headers['QUERY'] = mostly(draw, job_queries, st.one_of(query_strings, json_values), 3)
    if draw(st.booleans()):
        headers['content-type'] = mostly(draw, st.sampled_from([FORM, FORM + '; charset=utf-8']),
                                         st.one_of(st.text(max_size=20), json_values))
    headers.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4)))
    return headers


@st.composite
def well_framed(draw):
    """A message with correct netstrings; headers are usually a JSON object, sometimes not."""
    sender = draw(st.one_of(st.just(b'34f9ceee-cd52-4b7f-b197-88bf2f0ec378'), st.binary(max_size=12)))
    conn_id = draw(st.one_of(st.integers(0, 10 ** 6).map(lambda i: str(i).encode()), st.binary(max_size=8)))
    path = draw(st.one_of(st.just(b'/'), st.just(b'@*'), st.binary(max_size=12)))
    if path == b'@*' and draw(st.booleans()):    # what Mongrel2 sends when a client has gone
        return m2_message(sender, conn_id, path, b'{"METHOD":"JSON"}', b'{"type":"disconnect"}')
    shape = draw(st.sampled_from(range(13)))
    if shape <= 8:
        headers = json.dumps(draw(header_dicts()), ensure_ascii=draw(st.booleans())).encode()
    elif shape == 12:    # header values as some clients send them, and Mongrel2 passes them on: Latin-1
        headers = json.dumps(draw(header_dicts()), ensure_ascii=False).encode('latin-1', 'replace')
    elif shape == 9:
        headers = json.dumps(draw(json_values)).encode()    # JSON, but mostly not an object
    elif shape == 10:
        headers = draw(deep_json).encode()
    else:
        headers = draw(st.binary(max_size=200))
    body = draw(bodies) if one_in(draw, 3) else b''
    return m2_message(sender, conn_id, path, headers, body)


@st.composite
def mangled(draw):
    """A well-framed message with its framing broken: truncated, wrong lengths, garbage in place."""
    raw = draw(well_framed())
    how = draw(st.sampled_from(['truncate', 'length', 'comma', 'spaces', 'splice']))
    if how == 'truncate':
        return raw[:draw(st.integers(0, max(0, len(raw) - 1)))]
    if how == 'length':
        m = list(re.finditer(rb'([0-9]+):', raw))
        if not m:
            return raw
        target = draw(st.sampled_from(m))
        new = draw(st.one_of(st.integers(0, 10 ** 12).map(lambda i: str(i).encode()),
                             st.sampled_from([b'', b'-1', b'+5', b'1e3', b' 5', b'\xd9\xa1', b'00000000000001']),
                             st.builds(lambda n, d: str(max(0, n + d)).encode(), st.just(int(target.group(1))),
                                       st.integers(-3, 3))))
        return raw[:target.start(1)] + new + raw[target.end(1):]
    if how == 'comma':
        commas = [i for i, b in enumerate(raw) if b == ord(',')]
        if not commas:
            return raw
        i = draw(st.sampled_from(commas))
        return raw[:i] + draw(st.sampled_from([b'', b';', b',,', b' '])) + raw[i + 1:]
    if how == 'spaces':
        return raw.replace(b' ', draw(st.sampled_from([b'', b'  ', b'\t'])), draw(st.integers(1, 3)))
    i = draw(st.integers(0, len(raw)))
    return raw[:i] + draw(st.binary(max_size=20)) + raw[i:]


@st.composite
def m2_messages(draw):
    kind = draw(st.sampled_from(range(10)))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind <= 2:
        return draw(mangled())
    return draw(well_framed())


# -- 1. the HTTP edge ------------------------------------------------------------------

def trigger(method: str, query: str, body: bytes = b'', ctype: str | None = None) -> bytes:
    headers = {'METHOD': method, 'PATH': '/job_start', 'QUERY': query, 'VERSION': 'HTTP/1.1'}
    if ctype:
        headers['content-type'] = ctype
    return m2_message(b'front', b'42', b'/', json.dumps(headers).encode(), body)


def check_http_message(rig: BrokerRig, raw: bytes, seen) -> None:
    runs_before = rig.runs()
    rig.feed_http(raw)
    held = rig.broker.front.waits.count()
    if held:
        # A wait= request is held until its run ends; no worker runs here, so time it out now.
        rig.broker.tick(time.monotonic() + MAX_WAIT + 1)
    health, replies = rig.health()
    assert health['status'] == 200 and json.loads(health['body'])['ok'] is True
    records = rig.log.take()
    new_runs = {k: v for k, v in rig.runs().items() if k not in runs_before}

    parsed = oracle_parse(raw)
    if parsed is None:
        seen['unparsed'] += 1
        assert replies == [], 'a message that does not parse was answered'
        assert any('does not parse' in r.getMessage() for r in records), 'a dropped message was not logged'
        assert not new_runs
        return
    sender, conn_id, path, headers, body, strict = parsed
    if not strict and not replies:
        seen['not utf-8'] += 1
        assert not new_runs
        return
    method = str(headers.get('METHOD', ''))
    if method == 'JSON' and path.startswith(b'@') and is_disconnect_body(body):
        seen['disconnect'] += 1
        assert replies == [], 'a disconnect message was answered'
        assert not new_runs
        return
    if method == 'JSON':    # a client's own request with method JSON: answered like any other
        seen['json'] += 1
    assert len(replies) == 1, f'{len(replies)} replies to one request'
    reply = replies[0]
    seen[reply['status']] += 1
    assert (reply['sender'], reply['ids']) == (sender, conn_id), 'reply routed to the wrong client'
    assert reply['status'] in OK_STATUSES | ({504} if held else set()), \
        f"status {reply['status']}: {reply['body'][:300]!r}"
    if method == 'HEAD':
        assert reply['body'] == b''
    elif reply['json']:
        assert len(reply['body']) == reply['length']
        answer = json.loads(reply['body'])
        assert isinstance(answer, dict)
        if reply['status'] == 504:
            assert answer['run_id'] in rig.runs()
        elif reply['status'] != 200:
            assert isinstance(answer.get('error'), str) and answer['error']
    assert len(new_runs) <= 1, 'one request created several runs'
    for run_id, run in new_runs.items():
        seen['run'] += 1
        assert reply['status'] in (200, 504), 'a run was journaled for a refused request'
        job = rig.jobs.get(run['job'])
        assert job is not None, f"run for unknown job {run['job']!r}"
        params = json.loads(run['params'])
        for name, value in params.items():
            assert PARAM_NAME_RE.match(name), f'unsafe parameter name {name!r}'
            assert isinstance(value, str) and SAFE_RE.match(value), f'unsafe value {name}={value!r}'
            rule = job.params.get(name)
            assert rule is None or rule.fullmatch(value), f'{name}={value!r} breaks its rule'
        for name in job.placeholders:
            assert params.get(name), f'run of {job.name} without a value for {name!r}'
        if reply['status'] == 200 and method != 'HEAD':
            assert json.loads(reply['body'])['run_id'] == run_id


def test_http_edge_survives_any_mongrel2_message(http_rig):
    seen = collections.Counter()

    @FUZZ
    @given(raw=m2_messages())
    @example(raw=trigger('GET', 'job_name=touch&name=a$(reboot)b'))
    @example(raw=trigger('GET', 'job_name=touch&name=plain'))
    @example(raw=trigger('HEAD', 'job_name=dated&date=2026_11_28&key=k1'))
    @example(raw=trigger('POST', 'job_name=defaulted', b'region=us;rm&x=%00', FORM))
    @example(raw=trigger('GET', 'job_name=touch&name=w&wait=0'))
    @example(raw=trigger('GET', 'job_name=dated&date=2026_11_28%0a'))
    @example(raw=trigger('JSON', '', b'{"type":"disconnect"}'))
    @example(raw=m2_message(b'front', b'42', b'@*', b'{"METHOD":"JSON"}', b'{"type":"disconnect"}'))
    def check(raw):
        note(f'message: {short(raw)}')
        check_http_message(http_rig, raw, seen)

    check()
    # The generators must reach every branch, or the properties above say little.
    assert seen['unparsed'] and seen['json'] and seen['disconnect'] and seen[200] and seen[400] and seen[404] \
        and seen[405], seen
    assert seen['run'] >= 4, seen


def test_header_value_in_latin1_is_answered(http_rig):
    """Reproducer: `curl -H $'X-Name: caf\\xe9' .../health` through the real Mongrel2 gets no answer until
    limits.min_ping (an hour here): Mongrel2 forwards the header bytes as they came, the broker's
    strict UTF-8 JSON parse drops the whole request, and nobody ever answers the client."""
    headers = (b'{"PATH":"/health","host":"localhost","x-name":"caf\xe9","METHOD":"GET","VERSION":"HTTP/1.1",'
               b'"URI":"/health","PATTERN":"/","REMOTE_ADDR":"127.0.0.1"}')
    http_rig.feed_http(m2_message(b'front', b'77', b'/', headers, b''))
    _, replies = http_rig.health()
    http_rig.log.take()
    assert [r['status'] for r in replies] == [200], 'a request with a Latin-1 header value was never answered'


lone_surrogates = st.sampled_from(['\ud800', '\udfff', '\udc80', 'a\ud83d'])


@st.composite
def surrogate_requests(draw):
    """Headers JSON may carry \\uXXXX escapes of lone surrogates: valid JSON, but not encodable as UTF-8."""
    path, key = draw(st.sampled_from([('/job_status', 'run_id'), ('/job_note', 'run_id'), ('/runs', 'job'),
                                      ('/job_start', 'key'), ('/job_start', 'parent'), ('/job_start', 'name'),
                                      ('/job_start', 'job_name')]))
    value = draw(st.text(max_size=5)) + draw(lone_surrogates) + draw(st.text(max_size=5))
    query = f'job_name=touch&name=x&note=n&{key}={value}'
    if draw(st.booleans()):
        query = query.replace(f'{key}=', f'{key}=%41')    # a percent escape in the same value
    headers = json.dumps({'METHOD': 'GET', 'PATH': path, 'QUERY': query}).encode()
    return m2_message(b'front', str(draw(st.integers(0, 10 ** 6))).encode(), path.encode(), headers, b'')


def test_http_escaped_lone_surrogates_are_client_errors(http_rig):
    """Valid JSON (RFC 8259 allows \\ud800) that Python cannot encode to UTF-8 for SQLite."""
    seen = collections.Counter()

    @SHORT
    @given(raw=surrogate_requests())
    def check(raw):
        note(f'message: {short(raw)}')
        check_http_message(http_rig, raw, seen)

    check()


# -- 2. the worker side of the broker -----------------------------------------------------

# Run ids are only known at run time: payloads name them by token, replaced just before sending.
FRESH, FINAL, OTHER = '@FRESH@', '@FINAL@', '@OTHER@'   # pending and waiting for us; ended; never ours
RUN_TOKENS = [FRESH, FRESH, FRESH, FINAL, OTHER]
TOPICS_SEEN = ['touch', 'shared', 'dated', 'sentinel-1']
anything = st.one_of(st.text(max_size=6), json_values, st.sampled_from(['NaN', '', '1.5e9', 'x']))


@st.composite
def worker_objects(draw):
    """A JSON object whose fields are usually plausible and sometimes anything at all."""
    number = st.one_of(st.floats(), st.integers(), st.text(max_size=4), json_values)
    fields = {
        'run_id': (st.sampled_from(RUN_TOKENS), st.one_of(st.text(max_size=12), json_values)),
        'state': (st.sampled_from(p.FINAL_STATES * 2 + RESULT_STATES + ('SUCCEEDED', 'ok', '', 'succeeded ')),
                  json_values),
        'rc': (st.one_of(st.none(), st.integers(0, 255)), number),
        'signal': (st.sampled_from([None, 'SIGKILL']), json_values),
        'reason': (st.text(max_size=20), json_values),
        'started': (st.floats(1e9, 2e9), number),
        'finished': (st.floats(1e9, 2e9), number),
        'output_tail': (st.text(max_size=20), st.one_of(huge_text, json_values)),
        'topics': (st.lists(st.sampled_from(TOPICS_SEEN), max_size=3),
                   st.one_of(st.lists(st.one_of(st.text(max_size=10), json_values), max_size=8), json_values)),
        'cursors': (st.dictionaries(st.sampled_from(TOPICS_SEEN), st.integers(0, 10), max_size=3),
                    st.one_of(st.dictionaries(st.one_of(st.sampled_from(TOPICS_SEEN), st.text(max_size=6)), number,
                                              max_size=4), json_values)),
        'running': (st.integers(0, 4), json_values),
    }
    obj = draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    for name, (usual, odd) in fields.items():
        if name in ('run_id', 'state') or not one_in(draw, 2):
            if not one_in(draw, 8):
                obj[name] = mostly(draw, usual, odd, 3)
    return obj


# A RESULT for a run that waits for us, every other field of any type: "wrong types" where they land.
typed_results = st.builds(
    lambda base, more: {**more, **base},
    st.fixed_dictionaries({'run_id': st.just(FRESH), 'state': st.sampled_from(p.FINAL_STATES)}),
    st.fixed_dictionaries({}, optional={k: anything for k in ('rc', 'signal', 'reason', 'started', 'finished',
                                                              'output_tail', 'output', 'output_dropped')}))
typed_outputs = st.fixed_dictionaries({'run_id': st.sampled_from([FRESH, FINAL, 'no-such-run'])},
                                      optional={'offset': st.one_of(st.integers(-5, 10**6), anything),
                                                'text': st.one_of(st.text(max_size=50), anything)})
typed_syncs = st.fixed_dictionaries({}, optional={'topics': st.one_of(st.lists(anything, max_size=4), anything),
                                                  'cursors': st.one_of(st.dictionaries(st.sampled_from(TOPICS_SEEN),
                                                                                       anything), anything),
                                                  'running': anything})
huge_payloads = st.one_of(
    st.builds(lambda n: {'run_id': FRESH, 'state': 'failed', 'reason': 'r' * n, 'output_tail': 'x' * n},
              st.integers(500_000, 1_100_000)),
    st.builds(lambda n: {'topics': [f't{i}' for i in range(n)], 'cursors': {f't{i}': i for i in range(n)}},
              st.integers(1001, 60_000)),
).map(json.dumps).map(str.encode)
odd_payloads = st.one_of(
    json_values.map(json.dumps).map(str.encode),               # JSON, mostly not an object
    st.binary(max_size=200),
    st.sampled_from([b'{', b'{"run_id": ', b'{"run_id": "x"', b'null', b'[]', b'"SYNC"', b'{}\x00', b'\xff']),
    deep_json.map(str.encode),
    st.builds(lambda d, k: f'{{"run_id": "{FRESH}", "state": "failed", "{k}": {d}}}'.encode(), deep_json,
              st.sampled_from(['rc', 'reason', 'topics', 'cursors', 'run_id'])),
    huge_payloads,
    st.builds(random_bytes, st.integers(0, 2 ** 32), st.integers(900_000, 1_100_000)),
)
payloads = st.composite(lambda draw: draw(worker_objects().map(json.dumps).map(str.encode)) if not one_in(draw, 3)
                        else draw(odd_payloads))()
VERBS = [p.SYNC, p.STARTED, p.OUTPUT, p.RESULT, p.BYE]
verbs = st.one_of(st.sampled_from(VERBS * 3 + [p.CALLS, p.ACK, b'', b'sync', b'RESULT\0', b'SYNC ']),
                  st.binary(max_size=10))


@st.composite
def worker_messages(draw):
    kind = draw(st.sampled_from(range(8)))
    if kind <= 3:
        return [draw(st.sampled_from([p.SYNC, p.STARTED, p.STARTED, p.RESULT, p.RESULT, p.RESULT, p.BYE])),
                draw(payloads)]
    if kind == 4:
        return [p.RESULT, json.dumps(draw(typed_results)).encode()]
    if kind == 5:
        return [draw(st.sampled_from([p.SYNC, p.OUTPUT])),
                json.dumps(draw(st.one_of(typed_syncs, typed_outputs))).encode()]
    if kind == 6:
        return [draw(verbs), draw(payloads)]
    return draw(st.lists(st.one_of(verbs, payloads, st.binary(max_size=20)), min_size=0, max_size=5))


def decoded(frames):
    """The JSON object a two-frame message carries, or None."""
    if len(frames) != 2:
        return None
    try:
        msg = json.loads(frames[1])
    except (ValueError, RecursionError):
        return None
    return msg if isinstance(msg, dict) else None


def check_worker_message(rig: BrokerRig, frames: list[bytes]) -> list[logging.LogRecord]:
    """Send one message as the worker `fuzzw`, then check the broker lives and journaled only what it should."""
    rig.log.take()    # what an earlier (failed) example left behind is not this message's doing
    fresh = rig.fresh_run()
    tokens = {FRESH: fresh, FINAL: rig.final_run or fresh, OTHER: rig.run_ids[0]}
    for token, run_id in tokens.items():
        frames = [f.replace(token.encode(), run_id.encode()) for f in frames]
    results_before = rig.results()
    rig.feed_worker(frames)
    rig.n += 1
    rig.sync(['touch', f'sentinel-{rig.n}'])    # the broker is alive and still answers a valid SYNC
    records = rig.log.take()

    orphans = rig.db.execute('SELECT run_id, worker, state FROM results r '
                             'WHERE NOT EXISTS (SELECT 1 FROM runs WHERE run_id = r.run_id)').fetchall()
    assert not orphans, f'results recorded for runs that do not exist: {[tuple(o) for o in orphans]}'
    msg = decoded(frames)
    for key, row in rig.results().items():
        old = results_before.get(key)
        if old == row:
            continue
        assert row['state'] in RESULT_STATES, f'result state {row["state"]!r} recorded'
        assert old is None or old['state'] in ('pending', 'running'), f'final result {old} overwritten by {row}'
        assert key[1] == 'fuzzw' and msg is not None, f'result {key} changed by a message it did not come from'
        if frames[0] == p.RESULT:
            assert row['state'] in p.FINAL_STATES and row['state'] == msg.get('state'), \
                f'RESULT with state {msg.get("state")!r} recorded as {row["state"]!r}'
            rig.final_run = key[0]
        else:
            assert frames[0] == p.STARTED and row['state'] == 'running', f'{frames[0]!r} changed {key} to {row}'
        # What a worker reported must not break the run's status page (nor /runs, which lists it).
        for path in ('/job_status', '/job_output', '/chain'):
            reply = rig.get(path, f'run_id={key[0]}')
            assert reply['status'] == 200, f"GET {path} answered {reply['status']} after {short(frames)}"
    reply = rig.get('/job_output', f'run_id={fresh}')    # OUTPUT changes no result, but must not break this
    assert reply['status'] == 200, f"GET /job_output answered {reply['status']} after {short(frames)}"
    return records


def test_worker_messages_never_break_the_broker(worker_rig):
    @FUZZ
    @given(frames=worker_messages())
    @example(frames=[p.RESULT, p.pack({'run_id': FRESH, 'state': 'done', 'rc': 0})])
    @example(frames=[p.RESULT, p.pack({'run_id': FRESH, 'state': 'pending'})])
    @example(frames=[p.STARTED, p.pack({'run_id': FRESH, 'started': 1.5e9})])
    @example(frames=[p.RESULT, p.pack({'run_id': FRESH, 'state': 'succeeded', 'rc': 0})])
    @example(frames=[p.RESULT, p.pack({'run_id': FINAL, 'state': 'failed', 'rc': 1})])
    @example(frames=[p.RESULT, p.pack({'run_id': OTHER, 'state': 'failed', 'rc': 1})])
    @example(frames=[p.RESULT, p.pack({'run_id': 'no-such-run', 'state': 'failed'})])
    @example(frames=[p.STARTED, p.pack({'run_id': 'no-such-run', 'started': 1.5e9})])
    @example(frames=[p.RESULT, p.pack({'run_id': FRESH, 'state': 'failed', 'started': 'x', 'finished': 1.5e9})])
    def check(frames):
        note(f'frames: {short(frames)}')
        check_worker_message(worker_rig, frames)
        health, _ = worker_rig.health()
        assert health['status'] == 200

    check()
    # The fuzz must have reached real runs, or "nothing bad recorded" is vacuous.
    states = {r['state'] for r in worker_rig.results().values()}
    assert states & set(p.FINAL_STATES), states


def test_bad_worker_message_is_dropped_on_its_own(worker_rig):
    """A malformed message must be dropped alone; an exception escaping on_router fails the whole burst."""
    @SHORT
    @given(frames=worker_messages())
    @example(frames=[p.SYNC, nested(5000, 'list').encode()])
    def check(frames):
        note(f'frames: {short(frames)}')
        records = check_worker_message(worker_rig, frames)
        failed = [r for r in records if r.getMessage().startswith('journal commit failed')]
        assert not failed, f'one worker message failed the whole burst: {failed[0].getMessage()} ' \
                           f'({failed[0].exc_info[1]!r})'

    check()


def test_bad_worker_message_does_not_fail_a_trigger_in_the_same_burst(worker_rig):
    """Reproducer: a STARTED whose time is an integer too big for a float, next to a client's trigger."""
    rig = worker_rig
    rig.sync(['touch'])
    target = json.loads(rig.get('/job_start', 'job_name=touch&name=target')['body'])['run_id']    # waits for us
    runs_before = len(rig.runs())
    rig.n += 1
    conn = b'burst%d' % rig.n
    rig.push.send(m2_message(b'rig', conn, b'/job_start',
                             b'{"METHOD":"GET","PATH":"/job_start","QUERY":"job_name=touch&name=burst"}', b''))
    rig.dealer.send_multipart([p.STARTED, b'{"run_id": "%s", "started": 1%s}' % (target.encode(), b'0' * 400)])
    assert rig.broker.m2.reqs.poll(2000) and rig.broker.router.poll(2000)
    rig.broker.step()    # both messages in one burst, as under load
    assert rig.replies.poll(3000)
    reply = recv_reply(rig.replies)
    rig.log.take()
    assert reply['ids'] == conn
    assert reply['status'] == 200, f"a valid trigger was refused because of a worker's message: " \
                                   f"{reply['status']} {json.loads(reply['body'])}"
    assert len(rig.runs()) == runs_before + 1


def test_worker_values_never_make_http_answers_invalid_json(worker_rig):
    """Whatever numbers a worker reports, /workers and /job_status stay JSON (no NaN or Infinity)."""
    rig = worker_rig

    @SHORT
    @given(verb=st.sampled_from([p.SYNC, p.STARTED, p.RESULT]),
           field=st.sampled_from(['running', 'started', 'finished', 'rc']),
           value=st.sampled_from(['NaN', 'Infinity', '-Infinity', '1e999']))
    def check(verb, field, value):
        rig.sync(['touch'])    # the fuzz worker is expected for the next run
        run_id = json.loads(rig.get('/job_start', 'job_name=touch&name=json')['body'])['run_id']
        payload = (f'{{"run_id": "{run_id}", "state": "failed", "topics": ["touch"], "{field}": {value}}}'
                   .encode())
        rig.feed_worker([verb, payload])
        while rig.dealer.poll(0):
            rig.dealer.recv_multipart()
        for path, query in (('/workers', ''), ('/job_status', f'run_id={run_id}')):
            reply = rig.get(path, query)
            assert reply['status'] == 200
            try:
                strict_json(reply['body'])
            except ValueError as e:
                raise AssertionError(f'GET {path} answered invalid JSON after {verb!r} {payload!r}: {e}') from None
        rig.log.take()

    check()


# -- 3. the worker's agent --------------------------------------------------------------

TOPICS = ['t1', 't2']


class AgentRig:
    """We hold the broker's end (PUB bound, ROUTER bound); a fresh real Agent per example connects to it."""

    def __init__(self, root: str):
        self.root = root
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.pub.bind('tcp://127.0.0.1:0')
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)    # a send to an unconnected agent fails loudly
        self.router.bind('tcp://127.0.0.1:0')
        self.n = 0

    def agent(self) -> Agent:
        """A new Agent, subscribed and connected: garbage we send from now on reaches it."""
        self.n += 1
        name = f'agent{self.n}'
        agent = Agent(self.ctx, name, TOPICS, pub=self.pub.last_endpoint.decode(),
                      router=self.router.last_endpoint.decode(),
                      db_path=os.path.join(self.root, f'{name}.db'), sync_interval=3600.0)
        try:
            agent.tick(time.monotonic())    # sends its first SYNC
            deadline = time.monotonic() + 5
            while True:    # leftovers of earlier agents (BYE, SYNC) come first
                assert self.router.poll(max(1, int((deadline - time.monotonic()) * 1000))), 'no SYNC from the agent'
                frames = self.router.recv_multipart()
                if frames[0] == agent.dealer.routing_id and frames[1] == p.SYNC:
                    break
            hello = f'hello-{uuid.uuid4().hex}'

            def subscribed():
                self.pub.send_multipart([p.topic_frame('t1'), p.pack(self.call(hello, 't1'))])
                calls, _ = agent.poll(20)
                return any(c.get('run_id') == hello for c in calls)
            wait_for(subscribed, timeout=5, what='the agent to subscribe')
        except BaseException:
            agent.close()
            raise
        return agent

    @staticmethod
    def call(run_id: str, topic: str, seq: int = 1) -> dict:
        return {'run_id': run_id, 'job': 'j', 'topic': topic, 'seq': seq, 'params': {'a': 'b'}, 'key': None,
                'created': time.time()}

    def close(self) -> None:
        self.pub.close(0)
        self.router.close(0)
        term(self.ctx)


@pytest.fixture(scope='module')
def agent_rig(tmp_path_factory):
    rig = AgentRig(str(tmp_path_factory.mktemp('agent')))
    yield rig
    rig.close()


call_fields = {
    'run_id': st.one_of(st.text(max_size=10), json_values),
    'job': st.one_of(st.sampled_from(['j', 'touch']), json_values),
    'topic': st.one_of(st.sampled_from(TOPICS + ['t3', 't1\x00']), json_values),
    'seq': st.one_of(st.integers(-2, 5), st.floats(), st.sampled_from(['2', '', True]), json_values),
    'params': st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), json_values),
    'expires_at': st.one_of(st.floats(), json_values),
    'parent_workers': json_values,
}
calls_st = st.builds(lambda base, extra: {**extra, **base}, st.fixed_dictionaries({}, optional=call_fields),
                     st.dictionaries(st.text(max_size=6), json_values, max_size=2))
calls_msgs = st.fixed_dictionaries({}, optional={
    'calls': st.one_of(st.lists(st.one_of(calls_st, json_values), max_size=5), json_values),
    'cursors': st.one_of(st.dictionaries(st.sampled_from(TOPICS + ['t3']),
                                         st.one_of(st.integers(), st.sampled_from([2 ** 63, -2 ** 63 - 1, 10 ** 30]),
                                                   json_values), max_size=3), json_values),
    'more': json_values,
    'run_id': json_values,
})


def agent_payloads(objects):
    return st.one_of(
        objects.map(json.dumps).map(str.encode),
        objects.map(json.dumps).map(str.encode),
        json_values.map(json.dumps).map(str.encode),
        st.binary(max_size=100),
        deep_json.map(str.encode),
        st.builds(lambda d: f'{{"run_id": "x", "topic": "t1", "seq": {d}}}'.encode(), deep_json),
        st.builds(lambda n: f'{{"run_id": "x", "topic": "t1", "seq": 1{"0" * n}}}'.encode(), st.integers(300, 400)),
        st.builds(lambda n: json.dumps({'calls': [{'run_id': 'big', 'job': 'x' * n}]}).encode(),
                  st.integers(900_000, 1_100_000)),
    )


topic_frames = st.one_of(st.sampled_from([b't1\0', b't2\0', b't1', b't3\0']),
                         st.binary(max_size=8).map(lambda b: b't1\0' + b), st.binary(max_size=8))
pub_messages = st.builds(lambda t, rest: [t] + rest, topic_frames,
                         st.lists(st.one_of(agent_payloads(calls_st), st.binary(max_size=10)), max_size=4))
router_messages = st.one_of(
    st.builds(lambda v, pl: [v, pl], st.one_of(st.sampled_from([p.CALLS, p.CALLS, p.ACK]), st.binary(max_size=6)),
              agent_payloads(calls_msgs)),
    st.builds(lambda pl: [p.CALL, pl], agent_payloads(calls_st)),    # a live call sent directly
    st.lists(st.one_of(st.sampled_from([p.CALLS, p.CALL, p.ACK]), agent_payloads(calls_msgs), st.binary(max_size=10)),
             max_size=5),
)


def well_formed_call(call) -> bool:
    """The shape the broker sends (journal._call) and worker.py / semaphore.py rely on."""
    return (isinstance(call, dict)
            and isinstance(call.get('run_id'), str) and call['run_id'] != ''
            and isinstance(call.get('job'), str)
            and call.get('topic') in TOPICS
            and type(call.get('seq')) is int
            and isinstance(call.get('params'), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in call['params'].items()))


def drive_agent(rig: AgentRig, pub_garbage, router_garbage) -> list[dict]:
    """Send garbage, then one good call each way; poll until both good calls come out; return every call."""
    agent = rig.agent()
    try:
        ident = agent.dealer.routing_id
        for frames in pub_garbage:
            rig.pub.send_multipart(frames)
        for frames in router_garbage:
            if frames:
                rig.router.send_multipart([ident] + frames)
        token = uuid.uuid4().hex
        live, synced = f'live-{token}', f'sync-{token}'
        rig.pub.send_multipart([p.topic_frame('t1'), p.pack(rig.call(live, 't1', 7))])
        rig.router.send_multipart([ident, p.CALLS, p.pack({'calls': [rig.call(synced, 't2', 1)], 'cursors': {}})])
        returned = []
        deadline = time.monotonic() + 5
        while not all(any(isinstance(c, dict) and c.get('run_id') == good for c in returned)
                      for good in (live, synced)):
            assert time.monotonic() < deadline, 'the good calls sent after the garbage never came out'
            calls, _ = agent.poll(50)
            returned += calls
        agent.tick(time.monotonic())
        return returned
    finally:
        agent.close()


def test_agent_poll_never_raises_on_garbage(agent_rig):
    @SHORT
    @given(pub_garbage=st.lists(pub_messages, max_size=3), router_garbage=st.lists(router_messages, max_size=3))
    @example(pub_garbage=[[b't1\0', b'{"run_id": "x", "topic": "t1", "seq": Infinity}']], router_garbage=[])
    def check(pub_garbage, router_garbage):
        note(f'pub: {short(pub_garbage)}\nrouter: {short(router_garbage)}')
        for call in drive_agent(agent_rig, pub_garbage, router_garbage):
            assert isinstance(call, dict) and 'run_id' in call, call

    check()


def test_agent_returns_only_well_formed_calls(agent_rig):
    """worker.py and semaphore.py index and hash call fields; the agent is where the network ends."""
    @SHORT
    @given(pub_calls=st.lists(calls_st, max_size=3), sync_calls=st.lists(calls_st, max_size=3))
    @example(pub_calls=[], sync_calls=[{'run_id': 'r1', 'job': ['x']}])    # worker.py: TypeError, at every start
    def check(pub_calls, sync_calls):
        note(f'pub: {short(pub_calls)}\nCALLS: {short(sync_calls)}')
        pub = [[p.topic_frame('t1'), json.dumps(c).encode()] for c in pub_calls]
        router = [[p.CALLS, json.dumps({'calls': sync_calls, 'cursors': {}}).encode()]]
        for call in drive_agent(agent_rig, pub, router):
            assert well_formed_call(call), f'the agent handed on a malformed call: {call!r}'

    check()


def test_a_run_id_drawn_twice_is_drawn_again(http_rig, monkeypatch):
    """Reproducer: at 5,000 triggers/s, 32 random bits gave a taken run id now and then, answered 500."""
    from jobz import front
    taken = json.loads(http_rig.get('/job_start', 'job_name=touch&name=first')['body'])['run_id']
    draws = iter([taken, taken, 'fresh-run-id'])
    monkeypatch.setattr(front, 'new_run_id', lambda: next(draws))
    reply = http_rig.get('/job_start', 'job_name=touch&name=second')
    assert reply['status'] == 200, reply
    assert json.loads(reply['body'])['run_id'] == 'fresh-run-id'
