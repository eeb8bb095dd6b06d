"""Mongrel2 handler protocol over ZeroMQ (the few dozen lines we need, Python 3)."""
import json
from http import HTTPStatus

import zmq


PHRASES = {s.value: s.phrase for s in HTTPStatus}
KEEP_ALIVE = b'31:3:ctl,21:10:keep-alive,4:true!}]'    # tnetstring ["ctl", {"keep-alive": true}]


class BadMessage(ValueError):
    """A Mongrel2 message that does not parse."""


class HttpError(Exception):
    """An answer other than 200: its status and the message for {"error": ...}."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


def parse_netstring(data: bytes) -> tuple[bytes, bytes]:
    """Split b'LEN:PAYLOAD,REST' into (payload, rest)."""
    length, sep, rest = data.partition(b':')
    if not sep or not length.isdigit() or len(length) > 10:
        raise BadMessage('bad netstring length')
    n = int(length)
    if len(rest) < n + 1 or rest[n:n + 1] != b',':
        raise BadMessage('netstring shorter than its length')
    return rest[:n], rest[n + 1:]


class Request:
    """One HTTP request (or disconnect notice) as Mongrel2 forwards it."""

    def __init__(self, sender: bytes, conn_id: bytes, path: str, headers: dict, body: bytes, front=None):
        self.sender = sender
        self.conn_id = conn_id
        self.path = path
        self.headers = headers
        self.body = body
        self.front = front      # the Connection it came on (and its answer goes back on)

    @classmethod
    def parse(cls, msg: bytes, front=None) -> 'Request':
        try:
            sender, conn_id, path, rest = msg.split(b' ', 3)
        except ValueError:
            raise BadMessage('too few fields') from None
        raw_headers, rest = parse_netstring(rest)
        body, _ = parse_netstring(rest)
        try:
            # Mongrel2 passes header bytes through as they came: a Latin-1 header must not
            # make the request unanswerable, so undecodable bytes become U+FFFD.
            headers = json.loads(raw_headers.decode('utf-8', 'replace'))
        except (ValueError, RecursionError):
            raise BadMessage('headers are not JSON') from None
        if not isinstance(headers, dict):
            raise BadMessage('headers are not a JSON object')
        return cls(sender, conn_id, path.decode('utf-8', 'replace'), headers, body, front)

    @property
    def method(self) -> str:
        return str(self.headers.get('METHOD', ''))

    @property
    def query(self) -> str:
        return str(self.headers.get('QUERY', ''))

    def is_disconnect(self) -> bool:
        """Mongrel2 tells us a client went away; such a message must never be answered.

        Its path is '@*': a client's own request with method JSON has a path starting with '/'."""
        if self.method != 'JSON' or not self.path.startswith('@'):
            return False
        try:
            return json.loads(self.body).get('type') == 'disconnect'
        except (ValueError, AttributeError, RecursionError):
            return False

    def header(self, name: str) -> str:
        """One header's value ('' when absent); a header sent twice comes from Mongrel2 as a list."""
        value = self.headers.get(name, '')
        return value if isinstance(value, str) else ''

    def ambiguity(self) -> str | None:
        """Why this request's framing cannot be trusted, if it cannot.

        Mongrel2 forwards some requests it answers 400 itself, and it ignores Transfer-Encoding:
        such a request must not start anything."""
        if 'transfer-encoding' in self.headers:
            return 'Transfer-Encoding is not supported; send a Content-Length'
        for name in ('content-length', 'host', 'origin', 'content-type', 'sec-fetch-site'):
            if isinstance(self.headers.get(name), list):
                return f'header {name!r} sent more than once'
        length = self.header('content-length')
        if length and (not length.isdigit() or len(length) > 12 or int(length) != len(self.body)):
            return f'Content-Length {length[:20]!r} does not match the body'
        return None


class Raw:
    """An answer that is not JSON: the status page, the metrics."""

    def __init__(self, body: bytes, content_type: str, headers: dict | None = None):
        self.body, self.content_type, self.headers = body, content_type, headers or {}


def encode(obj) -> bytes:
    # One line, from json's C encoder (indent= would switch to its much slower Python one).
    return json.dumps(obj, allow_nan=False).encode() + b'\n'


def http_response(status: int, body: bytes, content_type: str = 'application/json',
                  head_only: bool = False, extra_headers: dict | None = None) -> bytes:
    """A complete HTTP/1.1 response with a correct byte Content-Length."""
    reason = PHRASES.get(status) or HTTPStatus(status).phrase
    lines = [f'HTTP/1.1 {status} {reason}',
             f'Content-Type: {content_type}',
             f'Content-Length: {len(body)}']
    lines += [f'{k}: {v}' for k, v in (extra_headers or {}).items()]
    head = ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')
    return head if head_only else head + body


class Connection:
    """The handler's pair of sockets: PULL requests from Mongrel2, PUB replies back."""

    def __init__(self, ctx: zmq.Context, pull_addr: str, pub_addr: str, ident: str, tls: bool = False):
        self.tls = tls          # the HTTPS front end: its requests carry a verified client certificate
        self.reqs = ctx.socket(zmq.PULL)
        self.reqs.linger = 0
        self.reqs.maxmsgsize = 4 << 20     # Mongrel2 sends bodies up to limits.content_length (1 MB)
        self.reqs.connect(pull_addr)
        self.resp = ctx.socket(zmq.PUB)
        self.resp.linger = 1000
        # Mongrel2 routes replies by this identity; it must equal the handler's
        # recv_ident so two front ends sharing one broker never get each other's replies.
        self.resp.setsockopt(zmq.IDENTITY, ident.encode())
        self.resp.connect(pub_addr)

    def reply(self, sender: bytes, conn_ids: list[bytes], payload: bytes) -> None:
        ids = b' '.join(conn_ids)
        self.resp.send(sender + b' ' + str(len(ids)).encode() + b':' + ids + b', ' + payload)

    def keep_alive(self, sender: bytes, conn_ids: list[bytes]) -> None:
        """Tell Mongrel2 these held requests are still being worked on, so limits.min_ping spares them.

        A control message of Mongrel2's handler protocol: the targets start with 'X ', the body is
        the tnetstring ["ctl", {"keep-alive": true}]."""
        for i in range(0, len(conn_ids), 100):    # Mongrel2 takes at most limits.handler_targets (128)
            self.reply(sender, [b'X'] + conn_ids[i:i + 100], KEEP_ALIVE)

    def answer(self, req: Request, status: int, body) -> None:
        """Answer `req` with a JSON body, or with a Raw one (the status page, the metrics)."""
        if isinstance(body, Raw):
            self.reply_http(req, status, body.body, content_type=body.content_type, extra_headers=body.headers)
        else:
            self.reply_http(req, status, encode(body))

    def reply_http(self, req: Request, status: int, body: bytes, **kw) -> None:
        head_only = req.method == 'HEAD'
        self.reply(req.sender, [req.conn_id], http_response(status, body, head_only=head_only, **kw))

    def close(self) -> None:
        self.reqs.close()
        self.resp.close()
