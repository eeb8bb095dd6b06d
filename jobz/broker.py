"""The broker's loop: Mongrel2 handler on one side (front.py), workers on the other (back.py).

Each turn takes a burst of messages from both, journals what they change in one transaction,
commits it, and only then publishes the new calls, answers, acknowledges and logs: a client
never hears of a run, nor a worker of a call, that the journal could still lose. Then the clock
work: waits that ran out, keep-alives, enrolled keys and certificates, pruning.
"""
import logging
import math
import time

import zmq

from . import protocol as p
from .access import Access
from .back import Back, Registry
from .burst import Burst
from .curve import PUB_DOMAIN, ROUTER_DOMAIN, Enrolled, make_server, start_authenticator
from .front import Front
from .jobfile import Job
from .journal import Journal, LeaseLost
from .lease import LEASE, RENEW_EVERY
from .m2 import Connection
from .metrics import Stats
from .pool import Pool
from .tls import ClientCerts
from .views import Views

log = logging.getLogger('jobz.broker')

MAX_MESSAGE = 8 << 20   # bytes of one message from a worker; larger: dropped by ZeroMQ
                        # (a result carries up to 1 Mi characters of output, which JSON may escape)
BATCH = 256             # messages taken from one socket per turn: one fsync carries a whole burst
COMMIT_DELAY = 0.005    # seconds worker reports may wait for company before their commit
SYNC_REST = 0.010       # seconds the worker socket rests after a burst of heartbeats (SYNC) alone


class Broker:
    def __init__(self, jobs: dict[str, Job], journal: Journal, ctx: zmq.Context, *,
                 m2_recv: str, m2_send: str, m2_ident: str = 'jobz', pub: str, router: str,
                 m2_tls_recv: str | None = None, m2_tls_send: str | None = None,
                 clients: ClientCerts | None = None, hostnames: str | None = None,
                 worker_timeout: float = 30.0, max_body: int = 65536, keep_days: float = 30.0,
                 pub_hwm: int = 10000, curve_secret: str | None = None, enrolled: Enrolled | None = None,
                 fronts: list[Connection] | None = None):
        self.journal = journal
        self.keep = keep_days * 86400.0
        self.ctx, self.pub_addr, self.pub_hwm = ctx, pub, pub_hwm
        self.curve_secret, self.enrolled, self.clients = curve_secret, enrolled, clients
        self.prune_due = self.enrolled_due = 0.0
        # ZAP must run before a CURVE socket binds; it names each peer by its enrolled key.
        self.auth = start_authenticator(ctx, enrolled) if enrolled else None
        # One Connection (own reply socket) per front end: Mongrel2 matches reply idents by prefix.
        self.fronts = fronts or connect_fronts(ctx, m2_recv, m2_send, m2_ident, m2_tls_recv, m2_tls_send)
        self.pub = self._bind_pub()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        # A worker that reconnects takes over its routing id (NAME/RANDOM: nobody else knows it).
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.maxmsgsize = MAX_MESSAGE
        self.router.rcvhwm = 10000
        self._secure(self.router, ROUTER_DOMAIN)
        self.router.bind(router)
        self.registry = Registry(journal, worker_timeout)
        self.pool = Pool(journal, jobs, self.registry)
        self.back = Back(journal, jobs, self.registry, enrolled, self.pool)
        self.stats = Stats()
        access = Access(jobs, journal, clients, self.back.agent_topics)
        views = Views(jobs, journal, self.registry, self.stats, lambda: self.front.waits.count())
        self.front = Front(jobs, journal, views, access, self.registry.expected, self.pool, clients=clients,
                           max_body=max_body, **({'hostnames': hostnames} if hostnames else {}))
        # A burst of worker reports alone may stay open (uncommitted) for COMMIT_DELAY, to share
        # its fsync with the reports that come next; then its ACKs wait with it.
        self.burst: Burst | None = None
        self.held_since: float | None = None
        self.rest_until = 0.0           # until then the loop leaves the worker socket alone (SYNC_REST)
        self.renew_due = 0.0            # holding the lease: when to renew it if nothing commits before
        self.stopping = False
        self.lost = False               # the lease went to another broker: back to standing by (lease.py)

    @property
    def m2(self) -> Connection:
        """The plain front end's connection."""
        return self.fronts[0]

    def _secure(self, sock: zmq.Socket, domain: str) -> None:
        # No ZMTP heartbeats of the broker's own: with them, libzmq 4.3.5 aborts the broker now and
        # then when a dead connection comes back with an RST (`Assertion failed: !_io_error`,
        # stream_engine_base.cpp; libzmq issues 4364, 4841; tests/test_netfaults.py caught it in 3
        # runs of 6). The workers ping; what queues for a vanished one is bounded by the HWMs.
        if self.curve_secret:
            make_server(sock, self.curve_secret, domain)

    def _bind_pub(self) -> zmq.Socket:
        pub = self.ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.sndhwm = self.pub_hwm    # past it PUB drops for that worker; SYNC recovers the calls
        self._secure(pub, PUB_DOMAIN)
        # After a close, ZeroMQ frees the port in the background: a rebind may wait a moment.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                pub.bind(self.pub_addr)
                return pub
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def publish(self, call: dict) -> None:
        """Live delivery: PUB for everyone, plus a direct CALL to workers limited to some topics."""
        payload = p.pack(call)
        self.pub.send_multipart([p.topic_frame(call['topic']), payload])
        if self.enrolled:
            for name in self.registry.expected(call['topic']):
                ident = self.registry.peers[name].ident
                if ident and self.enrolled.allowed_topics(name) is not None:    # kept off PUB by ZAP
                    # To the connection that proved it holds that worker's key, never to a name.
                    self.router.send_multipart([ident, p.CALL, payload])

    # -- the loop ---------------------------------------------------------
    def run(self) -> None:
        everything, fronts = zmq.Poller(), zmq.Poller()
        for front in self.fronts:
            everything.register(front.reqs, zmq.POLLIN)
            fronts.register(front.reqs, zmq.POLLIN)
        everything.register(self.router, zmq.POLLIN)
        while not self.stopping:
            now = time.monotonic()
            timeout = 100.0 if self.held_since is None else max(0.0, (self.held_since + COMMIT_DELAY - now) * 1000)
            # Hundreds of idle workers each sync once a second, one wake-up apiece: after a burst of
            # heartbeats alone, let the next ones gather a moment (HTTP requests are still taken at once).
            resting = self.rest_until > now
            if resting:
                timeout = min(timeout, (self.rest_until - now) * 1000)
            # Whole milliseconds, rounded up: pyzmq cuts 0.9 to 0, and the loop would spin until the time came.
            events = dict((fronts if resting else everything).poll(math.ceil(timeout)))
            http = [f for f in self.fronts if f.reqs in events]
            if self.journal.reachable():
                self.step(http=http, router=self.router in events)
                try:
                    self.tick(time.monotonic())
                except self.journal.db.Error as e:    # the database went away meanwhile: refused next turn
                    log.warning('clock work failed: %s', str(e).strip()[:300])
            else:
                self.refuse(http, router=self.router in events)
                if self.journal.lease and time.monotonic() - self.journal.fenced_at > LEASE:
                    self.lose('the journal was unreachable for longer than the lease')

    def step(self, http=True, router: bool = True) -> None:
        """Take one burst: journal it in one transaction, commit, then act on it (finish).

        `http` is True (every front end) or the front ends with requests waiting. Worker reports
        come first: a handler call that came with its run's result sees that result."""
        burst = self.burst or Burst()
        try:
            self.journal.begin()
        except self.journal.db.Error as e:    # the database went away: the next turns refuse until it is back
            log.warning('cannot begin a transaction: %s', str(e).strip()[:300])
            return
        before = self.journal.changes()
        try:
            heard = self._drain(self.router, lambda m: self.back.on_router(*m, burst), router=True) if router else []
            for front in (self.fronts if http is True else http or []):
                heard += self._drain(front.reqs, lambda m, f=front: self.front.on_http(m, f, burst))
            calm = heard and all(verb == p.SYNC for verb in heard)
            self.rest_until = time.monotonic() + SYNC_REST if calm else 0.0
            self.front.unpark(burst)
            self.pool.assign(burst)    # pool calls to workers with room (results may have freed some)
            now = time.monotonic()
            if self.held_since is None and self.journal.changes() != before:
                self.held_since = now
            if burst.idle() and self.held_since is not None and now - self.held_since < COMMIT_DELAY:
                # Reports alone: hold the commit a moment. SYNC answers (reads only) go out now.
                self.send_replies(burst)
                self.burst = burst
                return
            self.journal.commit()
        except Exception as e:
            self.journal.rollback()
            self.burst = self.held_since = None
            body = {'error': 'journal write failed; nothing was started'}
            if isinstance(e, LeaseLost):
                body = self.lose(str(e))
                status = 503
            else:
                log.exception('journal commit failed; answering 500 (503: journal unreachable) to the whole burst')
                status = 500 if self.journal.reachable(retry=False) else 503
            for req in [req for req, _, _ in burst.answers] + [req for _, req, _, _ in burst.waits]:
                req.front.answer(req, status, body)
            return    # nothing else of the burst happened: no call, no ACK, no count
        self.burst = self.held_since = None
        self.finish(burst)

    def finish(self, burst: Burst) -> None:
        """The burst is committed: publish, acknowledge, answer, count, log."""
        self.send_replies(burst)
        for call in burst.calls:
            self.publish(call)
        for ident, run_ids in burst.acks.items():    # one ACK per worker for all its results
            self.router.send_multipart([ident, p.ACK, p.pack({'run_ids': run_ids})])
        for frames in burst.sends:    # pool calls given (ASSIGN), taken (GO) or refused
            self.router.send_multipart(frames)
        for req, status, body in burst.answers:
            req.front.answer(req, status, body)
        self.front.waits.keep(burst)
        self.front.waits.answer(burst.touched, self.journal)
        self.stats.apply(burst.started, burst.ended)
        # Log lines last: on an idle machine one costs a tenth of a millisecond, which nobody waits for.
        for level, extra, *args in burst.logs:
            log.log(level, *args, extra=extra)

    def send_replies(self, burst: Burst) -> None:
        for frames in burst.replies:
            self.router.send_multipart(frames)
        burst.replies.clear()

    def lose(self, why: str) -> dict:
        """The lease is gone: stop here (run() returns) and stand by again; the answer for the burst."""
        log.error('lost the lease (%s): nothing more is committed or published here; standing by', why)
        self.journal.lease = None
        self.lost = self.stopping = True
        try:
            active = self.journal.lease_holder()['url']
        except Exception:    # the database is what went away
            active = None
        return {'error': 'this front end is no longer the active one; nothing was started', 'active': active}

    def refuse(self, http, router: bool) -> None:
        """The journal is unreachable (PostgreSQL away): every request gets 503 at once, and worker
        messages are dropped (workers send their results again until acknowledged, and sync every second)."""
        for front in http:
            self._drain(front.reqs, lambda m, f=front: self.front.refuse(m, f))
        if router:
            self._drain(self.router, lambda m: None, router=True)

    def _drain(self, sock, handle, router=False) -> list[bytes | None]:
        """Handle what waits on sock (up to BATCH messages); return their verbs (None: an HTTP request)."""
        heard = []
        # Asking EVENTS first costs less than the exception a receive on an empty socket raises.
        for _ in range(BATCH):
            if not sock.get(zmq.EVENTS) & zmq.POLLIN:
                break
            try:
                if not router:
                    msg = sock.recv(zmq.NOBLOCK)
                elif self.enrolled:    # with CURVE, ZAP's User-Id (the enrolled key's name) is who sent it
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    msg = ([f.bytes for f in frames], frames[-1].get('User-Id'))
                else:
                    msg = (sock.recv_multipart(zmq.NOBLOCK), None)
            except zmq.Again:    # never expected after EVENTS said so, but never block the loop on it
                break
            heard.append(msg[0][1] if router and len(msg[0]) > 1 else None)
            try:
                handle(msg)    # in a savepoint of its own (front.py, back.py): a failure undoes only it
            except Exception:
                # One bad message is dropped on its own; the rest of the burst goes on.
                log.exception('dropping a message that could not be handled')
        return heard

    # -- clock work -------------------------------------------------------
    def tick(self, now: float) -> None:
        """After every poll: waits that ran out, keep-alives, key and certificate folders, pruning."""
        if now >= self.enrolled_due:
            self.enrolled_due = now + 2.0
            if self.enrolled:
                self.reload_keys()
            if self.clients:
                self.clients.refresh()
        # Both write in a transaction of their own: never while a burst's commit is held open.
        if now >= self.prune_due and self.burst is None:
            self.prune_due = now + min(60.0, max(1.0, self.keep / 10))
            try:
                self.prune()
            except LeaseLost as e:
                self.lose(str(e))
        if self.journal.lease and self.burst is None and now >= self.renew_due:
            self.renew_due = now + RENEW_EVERY
            try:
                self.journal.renew_lease()
            except LeaseLost as e:
                self.lose(str(e))
        self.front.tick(now)

    def reload_keys(self) -> None:
        """Pick up enrolled keys added or removed; a removed key loses its live subscription at once."""
        _, removed = self.enrolled.refresh()
        if removed:
            log.warning('keys revoked: %s; rebinding the live socket so they drop off', ', '.join(sorted(removed)))
            for name in removed & set(self.registry.peers):    # remembered, no longer expected
                self.registry.peers[name].seen = time.monotonic() - self.registry.timeout - 1
            self.pub.close()
            self.pub = self._bind_pub()    # honest workers reconnect and catch up by SYNC

    def prune(self) -> int:
        """Drop runs older than --keep-days that every remembered worker has taken."""
        cutoff = time.time() - self.keep
        slowest: dict[str, int] = {}
        gone = [n for n, peer in self.registry.peers.items() if peer.last_seen() < cutoff]
        for name, peer in self.registry.peers.items():
            if name not in gone:    # a worker silent for longer holds nothing back
                for topic, seq in peer.cursors.items():
                    slowest[topic] = min(seq, slowest.get(topic, seq))
        self.journal.begin()
        try:
            n = self.journal.prune(cutoff, slowest)
            self.registry.forget(gone)
            self.journal.commit()
        except Exception:
            self.journal.rollback()
            raise
        if n:
            log.info('pruned %d runs older than %.0f days', n, self.keep / 86400)
        return n

    def close(self, fronts: bool = True) -> None:
        """Close the sockets and the journal; with fronts=False the Mongrel2 connections and the journal
        stay open, for standing by (broker.py's main loop)."""
        if self.auth:
            self.auth.stop()
        if fronts:
            for front in self.fronts:
                front.close()
        self.pub.close()
        self.router.close()
        if fronts:
            self.journal.close()


def connect_fronts(ctx: zmq.Context, m2_recv: str, m2_send: str, m2_ident: str,
                   m2_tls_recv: str | None = None, m2_tls_send: str | None = None) -> list[Connection]:
    """The handler connections to Mongrel2: the plain front end, and the HTTPS one if configured."""
    fronts = [Connection(ctx, m2_recv, m2_send, m2_ident)]
    if m2_tls_recv:
        fronts.append(Connection(ctx, m2_tls_recv, m2_tls_send, 'tls-' + m2_ident, tls=True))
    return fronts
