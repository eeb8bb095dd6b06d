"""Mongrel2 handler protocol (jobz/m2.py), exercised on bytes, without sockets."""
import time
import json

import pytest
import zmq
from hypothesis import given, settings, strategies as st

from jobz.m2 import BadMessage, Connection, Request, http_response


def netstring(payload: bytes) -> bytes:
    return str(len(payload)).encode() + b':' + payload + b','


def message(headers, body: bytes = b'', sender=b'34f9ceee-cd52-4b7f-b197-88bf2f0ec378',
            conn_id=b'7', path=b'/job_start') -> bytes:
    raw = headers if isinstance(headers, bytes) else json.dumps(headers).encode()
    return b' '.join([sender, conn_id, path, netstring(raw) + netstring(body)])


GET = {'PATH': '/job_start', 'METHOD': 'GET', 'VERSION': 'HTTP/1.1', 'QUERY': 'job_name=hello&date=2026_11_28',
       'host': 'localhost:6769', 'x-note': 'grüße, from: me'}


# -- parsing ------------------------------------------------------------------------

def test_parse_well_formed_request():
    body = b'a body, with commas: and 12:colons, '
    req = Request.parse(message(GET, body))
    assert req.sender == b'34f9ceee-cd52-4b7f-b197-88bf2f0ec378'
    assert req.conn_id == b'7'
    assert req.path == '/job_start'
    assert req.headers == GET
    assert req.method == 'GET'
    assert req.query == 'job_name=hello&date=2026_11_28'
    assert req.body == body
    assert not req.is_disconnect()


def test_parse_lengths_are_bytes_not_characters():
    headers = {'METHOD': 'POST', 'x-name': 'Zoë 日本'}
    body = 'héllo €'.encode()
    req = Request.parse(message(headers, body))
    assert req.headers == headers and req.body == body


def test_parse_empty_body_and_binary_body():
    assert Request.parse(message(GET)).body == b''
    binary = bytes(range(256)) + b', 5:hello,'
    assert Request.parse(message(GET, binary)).body == binary


def test_parse_ignores_bytes_after_the_body():
    assert Request.parse(message(GET, b'body') + b'trailing junk').body == b'body'


def test_parse_path_with_bad_utf8_does_not_fail():
    req = Request.parse(message(GET, path=b'/caf\xe9'))
    assert req.path.startswith('/caf')


def test_missing_headers_give_empty_method_and_query():
    req = Request.parse(message({}))
    assert req.method == '' and req.query == ''


# -- disconnect notices ------------------------------------------------------------

def test_disconnect_detected():
    # As Mongrel2 1.12.2 sends it (seen on the wire): path @*, headers {"METHOD":"JSON"}.
    req = Request.parse(message({'METHOD': 'JSON'}, b'{"type":"disconnect"}', path=b'@*'))
    assert req.is_disconnect()


def test_a_client_request_with_method_json_is_not_a_disconnect():
    # A client can send `JSON /job_start HTTP/1.1` with that body; it must be answered, not held.
    req = Request.parse(message({'METHOD': 'JSON', 'PATH': '/job_start'}, b'{"type":"disconnect"}'))
    assert not req.is_disconnect()


@pytest.mark.parametrize('method, body', [
    ('JSON', b'{"type":"other"}'),
    ('JSON', b'not json'),
    ('JSON', b'["disconnect"]'),
    ('JSON', b'"disconnect"'),
    ('JSON', b''),
    ('GET', b'{"type":"disconnect"}'),
    ('POST', b'{"type":"disconnect"}'),
])
def test_not_a_disconnect(method, body):
    assert not Request.parse(message({'METHOD': method}, body)).is_disconnect()


# -- malformed messages ------------------------------------------------------------

GOOD_HEADERS = json.dumps(GET).encode()
BAD = {
    'empty': b'',
    'one field': b'sender',
    'three fields': b'sender 7 /job_start',
    'no netstring': b'sender 7 /job_start garbage',
    'headers length longer than data': b'sender 7 /p ' + b'500:' + GOOD_HEADERS + b',0:,',
    'body length longer than data': b'sender 7 /p ' + netstring(GOOD_HEADERS) + b'10:short,',
    'headers missing comma': b'sender 7 /p ' + str(len(GOOD_HEADERS)).encode() + b':' + GOOD_HEADERS + b'0:,',
    'body missing comma': b'sender 7 /p ' + netstring(GOOD_HEADERS) + b'4:body',
    'body missing entirely': b'sender 7 /p ' + netstring(GOOD_HEADERS),
    'length shorter than data': b'sender 7 /p 2:{}}},0:,',
    'non-digit length': b'sender 7 /p x2:{},0:,',
    'negative length': b'sender 7 /p -2:{},0:,',
    'empty length': b'sender 7 /p :{},0:,',
    'spaced length': b'sender 7 /p  2:{},0:,',
    'unicode digit length': b'sender 7 /p ' + '\u0662'.encode() + b':{},0:,',
    'absurd length': b'sender 7 /p 99999999999999999999:{},0:,',
    'headers not JSON': message(b'METHOD: GET'),
    'headers empty': message(b''),
    'headers a JSON list': message(b'["METHOD", "GET"]'),
    'headers a JSON string': message(b'"GET"'),
    'headers JSON null': message(b'null'),
    'headers a JSON number': message(b'42'),
}


@pytest.mark.parametrize('raw', BAD.values(), ids=BAD.keys())
def test_bad_message(raw):
    with pytest.raises(BadMessage):
        Request.parse(raw)


def test_deeply_nested_headers_are_a_bad_message():
    # Parse must fail with BadMessage, never with another error that escapes the handler.
    nested = b'[' * 100_000 + b']' * 100_000
    with pytest.raises(BadMessage):
        Request.parse(message(nested))


def mutated_messages():
    """Well-formed messages with one part damaged: a wrong length, a cut, a flipped byte."""
    def build(headers, body, delta, cut, flip):
        raw = bytearray(message(headers, body))
        if delta:
            start = raw.index(b' /job_start ') + len(b' /job_start ')
            colon = raw.index(b':', start)
            raw[start:colon] = str(max(0, int(raw[start:colon]) + delta)).encode()
        if flip is not None and raw:
            pos, byte = flip
            raw[pos % len(raw)] = byte
        return bytes(raw[:cut]) if cut is not None else bytes(raw)

    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                               lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                               max_leaves=10)
    return st.builds(build, json_values, st.binary(max_size=40), st.integers(-5, 5),
                     st.none() | st.integers(0, 300),
                     st.none() | st.tuples(st.integers(0, 10_000), st.integers(0, 255)))


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=300), mutated_messages()))
def test_parse_returns_a_request_or_raises_bad_message(raw):
    try:
        req = Request.parse(raw)
    except BadMessage:
        return
    assert isinstance(req, Request)
    assert isinstance(req.headers, dict) and isinstance(req.body, bytes)
    assert isinstance(req.method, str) and isinstance(req.query, str)
    req.is_disconnect()    # must not raise either


@settings(max_examples=200, deadline=None, database=None)
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=8), st.binary(max_size=200))
def test_parse_round_trips_what_mongrel2_sends(headers, body):
    req = Request.parse(message(headers, body))
    assert req.headers == headers and req.body == body


# -- responses ----------------------------------------------------------------------

def split_response(raw: bytes) -> tuple[str, dict, bytes]:
    head, sep, body = raw.partition(b'\r\n\r\n')
    assert sep, 'response has no blank line after the headers'
    status, *lines = head.decode('latin-1').split('\r\n')
    headers = dict(line.split(': ', 1) for line in lines)
    return status, headers, body


def test_http_response_content_length_counts_bytes():
    body = json.dumps({'note': 'grüße → 日本'}, ensure_ascii=False).encode()
    assert len(body) > len(body.decode())    # multi-byte characters present
    status, headers, got = split_response(http_response(200, body))
    assert status == 'HTTP/1.1 200 OK'
    assert headers['Content-Type'] == 'application/json'
    assert int(headers['Content-Length']) == len(body)
    assert got == body


def test_http_response_head_gives_headers_only():
    body = 'héllo'.encode()
    raw = http_response(200, body, head_only=True)
    assert raw.endswith(b'\r\n\r\n')
    status, headers, got = split_response(raw)
    assert got == b''
    assert int(headers['Content-Length']) == len(body)    # what a GET would have sent


def test_http_response_status_type_and_extra_headers():
    status, headers, got = split_response(
        http_response(404, b'{"error": "unknown job"}', content_type='text/html; charset=utf-8',
                      extra_headers={'Retry-After': '5'}))
    assert status == 'HTTP/1.1 404 Not Found'
    assert headers['Content-Type'] == 'text/html; charset=utf-8'
    assert headers['Retry-After'] == '5'
    assert got == b'{"error": "unknown job"}'


@pytest.fixture
def connection():
    """A real Connection wired to sockets standing where Mongrel2's would be."""
    ctx = zmq.Context()
    m2_push, m2_sub = ctx.socket(zmq.PUSH), ctx.socket(zmq.SUB)
    m2_sub.subscribe(b'')
    push_port = m2_push.bind_to_random_port('tcp://127.0.0.1')
    sub_port = m2_sub.bind_to_random_port('tcp://127.0.0.1')
    conn = Connection(ctx, f'tcp://127.0.0.1:{push_port}', f'tcp://127.0.0.1:{sub_port}', 'front')

    def sent_by(send) -> bytes:
        """Call send() until the subscription is up (PUB drops before that); the first reply."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            send()
            if m2_sub.poll(100):
                return m2_sub.recv()
        raise AssertionError('no reply reached the Mongrel2 side')

    yield conn, sent_by
    for sock in (m2_push, m2_sub):
        sock.close(0)
    conn.resp.linger = 0
    conn.close()
    ctx.term()


@pytest.mark.parametrize('method, with_body', [('GET', True), ('HEAD', False)])
def test_reply_http_framing(connection, method, with_body):
    conn, sent_by = connection
    req = Request.parse(message(dict(GET, METHOD=method), conn_id=b'1234'))
    body = b'{"ok": true}'
    sent = sent_by(lambda: conn.reply_http(req, 200, body))
    prefix = req.sender + b' 4:1234, '
    assert sent.startswith(prefix)
    _, headers, got = split_response(sent[len(prefix):])
    assert int(headers['Content-Length']) == len(body)
    assert got == (body if with_body else b'')


def test_reply_to_several_connections(connection):
    conn, sent_by = connection
    assert sent_by(lambda: conn.reply(b'srv', [b'1', b'22', b'333'], b'payload')) == b'srv 8:1 22 333, payload'



def test_headers_not_utf8_are_read_with_replacement():
    """Mongrel2 passes header bytes as they came; a Latin-1 header must not make a request unanswerable."""
    req = Request.parse(message(b'{"METHOD": "GET", "x-name": "caf\xe9"}'))
    assert req.method == 'GET' and req.headers['x-name'] == 'caf\ufffd'
