"""Handler calls: the on_success/on_failure URLs (and a gate's release) an agent must call.

They are kept in the agent's database, written in the same transaction as the result they
follow, until the front end has answered. Pool threads make the calls, so a slow front end never
holds the agent's loop up; a call that fails is tried again with backoff (an answer 4xx is
final), for up to a day. Each call's idempotency key makes a retry harmless.
"""
import http.client
import logging
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

log = logging.getLogger('jobz.agent')

SCHEMA = """
CREATE TABLE IF NOT EXISTS http_out (
    id      INTEGER PRIMARY KEY,
    url     TEXT NOT NULL,
    tries   INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    first_at REAL NOT NULL
);
"""
GIVE_UP = 86400.0    # a handler URL that keeps failing is dropped (with an error) after a day


_pool = threading.local()    # per handler thread: (scheme, host:port) -> a keep-alive connection


def fetch(url: str, timeout: float = 10.0, context=None, connect_timeout: float = 3.0) -> int:
    """GET a URL; return its HTTP status (error statuses included), raise OSError if unreachable.

    Each thread keeps one connection per front end open: a chain's next step costs a request,
    not a TCP (or TLS) handshake. A kept connection the server has closed meanwhile is replaced
    once; the call's idempotency key makes that retry harmless. One that times out is not retried:
    its host is gone (or too slow), and the caller tries the next front end. A front end answers
    a handler call in milliseconds: the timeouts only bound what a dead host costs."""
    parts = urlsplit(url)
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise ValueError(f'not an http(s) URL: {url[:200]!r}')
    conns = _pool.__dict__.setdefault('conns', {})
    key = (parts.scheme, parts.netloc)
    target = (parts.path or '/') + (f'?{parts.query}' if parts.query else '')
    while True:
        conn = conns.pop(key, None)
        fresh = conn is None
        try:
            if fresh:
                conn = (http.client.HTTPSConnection(parts.hostname, parts.port, timeout=connect_timeout, context=context)
                        if parts.scheme == 'https' else
                        http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_timeout))
                conn.connect()
                conn.sock.settimeout(timeout)
            conn.request('GET', target)
            resp = conn.getresponse()
            resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if fresh or isinstance(e, TimeoutError):
                raise OSError(f'{type(e).__name__}: {e}') from e
            continue    # the kept connection had gone stale: once more on a new one
        if resp.will_close:
            conn.close()
        else:
            conns[key] = conn
        return resp.status


def alternatives(url: str, fronts: list[str]) -> list[tuple[str, str]]:
    """(front end, URL) pairs to try: when `url` is on one of several front ends (one active, the others
    standing by and answering 503, or down), its path on each of them in the order given; else just it."""
    for base in fronts:
        if url.startswith(base.rstrip('/') + '/'):
            rest = url[len(base.rstrip('/')):]
            return [(front, front.rstrip('/') + rest) for front in fronts]
    return [('', url)]


class HandlerCalls:
    """The handler URLs still to call, in the agent's database; `write()` is its turn's transaction."""

    def __init__(self, db, write, tls=None, fronts=()):
        self.db, self.write = db, write
        self.fronts = list(fronts)      # the front ends' base URLs (--url), the first one first
        self.tls = tls                  # SSLContext with our client certificate, for https:// handlers
        db.executescript(SCHEMA)
        self.due = 0.0                  # monotonic time to look for calls due
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix='jobz-http')
        # A pool thread that has a call to make waits for the GIL while the agent's loop is busy (a
        # worker spawning commands): by default up to 5 ms at a time. A tenth of that lets the call
        # out almost at once: a fan-in's last hop took 24 % less (README, Speed: the A/B).
        sys.setswitchinterval(0.0005)
        self.busy: set[int] = set()
        self.done: queue.Queue = queue.Queue()
        # A pool thread writes a byte here when a call is done: the agent's poll wakes up for it.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)

    def add(self, urls: list[str]) -> None:
        """Record calls to make (in this turn's transaction); they go out once it commits."""
        if urls:
            now = time.time()
            self.write().executemany('INSERT INTO http_out (url, next_at, first_at) VALUES (?, ?, ?)',
                                     [(u, now, now) for u in urls])
            self.due = 0.0    # call them right after this turn's commit, not half a second later

    def woken(self) -> None:
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass

    def tick(self, now: float) -> None:
        while True:
            try:
                row_id, ok = self.done.get_nowait()
            except queue.Empty:
                break
            self.due = 0.0    # a retry may now be scheduled: look again
            self.busy.discard(row_id)
            db = self.write()
            if ok:
                db.execute('DELETE FROM http_out WHERE id = ?', (row_id,))
                continue
            (tries,) = db.execute('SELECT tries FROM http_out WHERE id = ?', (row_id,)).fetchone()
            backoff = min(60.0, 0.5 * 2 ** tries) * random.uniform(0.5, 1.0)
            db.execute('UPDATE http_out SET tries = tries + 1, next_at = ? WHERE id = ?',
                            (time.time() + backoff, row_id))
        self.start_due(now)

    def start_due(self, now: float) -> None:
        """Hand the calls that are due to the pool threads (at once for URLs added since: due 0)."""
        if now < self.due:
            return
        self.due = now + 0.5    # retries back off by 0.25 s and more; new URLs reset this
        due = self.db.execute('SELECT id, url, first_at FROM http_out WHERE next_at <= ? ORDER BY id',
                              (time.time(),)).fetchall()
        for row_id, url, first_at in due:
            if row_id in self.busy:
                continue
            if time.time() - first_at > GIVE_UP:
                log.error('giving up on handler call %s after a day of failures', url)
                self.write().execute('DELETE FROM http_out WHERE id = ?', (row_id,))
                continue
            self.busy.add(row_id)
            self.pool.submit(self._call_url, row_id, url)

    def _call_url(self, row_id: int, url: str) -> None:
        """Runs in a pool thread; reports back through a queue and the wake pipe."""
        try:
            status, error = None, None
            for front, target in alternatives(url, self.fronts):
                try:
                    status = fetch(target, context=self.tls if target.startswith('https:') else None)
                except OSError as e:
                    status, error = None, e
                    continue    # that front end is down: the next one
                if status != 503:    # 503: a standby (or its journal away); the next may be the active one
                    if front:    # it answered: ask it first from now on (a dead one costs a timeout)
                        self.fronts = [front] + [f for f in self.fronts if f != front]
                    break
            if status is None:
                raise error
            ok = status < 500
            if 400 <= status < 500:
                log.error('handler call %s refused with HTTP %d; not retrying', url, status)
            elif not ok:
                log.warning('handler call %s answered HTTP %d; will retry', url, status)
        except (OSError, ValueError) as e:
            log.warning('handler call %s failed (%s); will retry', url, e)
            ok = False
        self.done.put((row_id, ok))
        os.write(self.wake_w, b'.')

    def pending(self) -> int:
        return self.db.execute('SELECT count(*) FROM http_out').fetchone()[0]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        os.close(self.wake_r)
        os.close(self.wake_w)
