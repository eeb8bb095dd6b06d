"""The broker: Mongrel2 handler, journal, publisher of calls, collector of results."""
import json
import logging
import secrets
import time
from urllib.parse import parse_qsl, urlsplit

import zmq

from . import defaults, protocol as p
from .access import Access, NotYet
from .cli import about
from .jobfile import NAME_RE, Job, ParamError, prepare_params
from .journal import Journal
from .curve import PUB_DOMAIN, ROUTER_DOMAIN, Enrolled, make_server, start_authenticator
from .tls import ClientCerts
from .m2 import BadMessage, Connection, HttpError, Request
from .metrics import Exposition, Histogram
from .views import Gates, Page

log = logging.getLogger('jobz.broker')

MAX_WAIT = 3600.0
MAX_WAITERS = 1000   # wait= requests held at once
MAX_WAITERS_PER_CLIENT = 100    # ... of them from one client (certificate name, or plain:ADDRESS)
PARK_FOR = 5.0           # seconds a handler call may wait for the result of its run to arrive
KEEP_ALIVE_EVERY = 3.0   # seconds between Mongrel2 keep-alives for held wait= requests (its min_ping is 10)
MAX_MESSAGE = 8 << 20   # bytes of one message from a worker or from Mongrel2; larger: dropped by ZeroMQ
                        # (a result carries up to 1 Mi characters of output, which JSON may escape)
BATCH = 256          # messages handled per commit: one fsync carries a whole burst
COMMIT_DELAY = 0.005 # seconds worker reports may wait for company before their commit
SYNC_BATCH = 500     # calls per CALLS answer
ROUTES = {           # path -> allowed methods
    '/': ('GET', 'HEAD'),
    '/job_start': ('GET', 'POST'),      # no HEAD: a link checker must not start jobs
    '/job_status': ('GET', 'HEAD'),
    '/job_note': ('GET', 'POST'),
    '/jobs': ('GET', 'HEAD'),
    '/workers': ('GET', 'HEAD'),
    '/runs': ('GET', 'HEAD'),
    '/health': ('GET', 'HEAD'),
    '/job_output': ('GET', 'HEAD'),
    '/chain': ('GET', 'HEAD'),
    '/gates': ('GET', 'HEAD'),
    '/metrics': ('GET', 'HEAD'),
}


class Raw:
    """An answer that is not JSON: the status page, the metrics."""

    def __init__(self, body: bytes, content_type: str, headers: dict | None = None):
        self.body, self.content_type, self.headers = body, content_type, headers or {}


def new_run_id() -> str:
    # 48 random bits a second: even at 10,000 triggers a second a repeat is a one-in-10^7 event
    # (32 bits made one at 5,000/s about every five minutes); the caller still checks.
    return time.strftime('%Y%m%d-%H%M%S-') + secrets.token_hex(6)


def encode(obj) -> bytes:
    # One line, from json's C encoder (indent= would switch to its much slower Python one).
    return json.dumps(obj, allow_nan=False).encode() + b'\n'


class Broker:
    def __init__(self, jobs: dict[str, Job], journal: Journal, ctx: zmq.Context, *,
                 m2_recv: str, m2_send: str, m2_ident: str = 'jobz', pub: str, router: str,
                 m2_tls_recv: str | None = None, m2_tls_send: str | None = None,
                 clients: ClientCerts | None = None,
                 worker_timeout: float = 30.0, max_body: int = 65536, keep_days: float = 30.0,
                 pub_hwm: int = 10000, curve_secret: str | None = None,
                 enrolled: Enrolled | None = None, hostnames: str = defaults.HOSTNAMES):
        self.jobs = jobs
        self.journal = journal
        self.worker_timeout = worker_timeout
        self.keep = keep_days * 86400.0
        self.prune_due = 0.0
        self.max_body = max_body
        self.ctx, self.pub_addr, self.pub_hwm = ctx, pub, pub_hwm
        self.curve_secret, self.enrolled = curve_secret, enrolled
        self.enrolled_due = 0.0
        # ZAP must run before a CURVE socket binds; it names each peer by its enrolled key.
        self.auth = start_authenticator(ctx, enrolled) if enrolled else None
        self.m2 = Connection(ctx, m2_recv, m2_send, m2_ident)    # the plain front end
        self.m2.tls = False
        self.fronts = [self.m2]
        if m2_tls_recv:
            # One Connection (own reply socket) per front end: Mongrel2 matches reply idents by prefix.
            tls = Connection(ctx, m2_tls_recv, m2_tls_send, 'tls-' + m2_ident)
            tls.tls = True
            self.fronts.append(tls)
        self.clients = clients
        # Host names served ('*': any). A browser on another site that rebinds its own name to our
        # address sends that name: refused, so it cannot read our answers.
        self.hostnames = {h.strip().lower().strip('[]') for h in hostnames.split(',') if h.strip()}
        self.access = Access(jobs, journal, clients, self.agent_topics)
        self.pub = self._bind_pub()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        # A worker that reconnects takes over its routing id (NAME/RANDOM: nobody else knows it).
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.maxmsgsize = MAX_MESSAGE
        self.router.rcvhwm = 10000
        self._secure(self.router, ROUTER_DOMAIN)
        self.router.bind(router)
        # name -> {'topics', 'seen', 'seen_at', 'cursors', 'running', 'saved', 'ident'}; 'ident' is the
        # routing id of the connection its last SYNC came on (under CURVE: with its key).
        self.workers: dict[str, dict] = {}
        for name, topics, cursors, last_seen in journal.load_workers():
            # Back from the registry: a worker seen just before a restart is still expected.
            self.workers[name] = {'topics': set(topics), 'cursors': cursors, 'seen_at': last_seen,
                                  'seen': time.monotonic() - (time.time() - last_seen), 'running': 0,
                                  'saved': time.monotonic(), 'ident': None}
        self.waiters: dict[str, list] = {}   # run_id -> [(request, deadline)]
        self.keep_alive_due = 0.0
        self.parked: list[tuple[str, Request, float]] = []    # (run_id, handler call, until): see handle()
        self.new_waits: list = []            # waits of this burst, kept only if it commits
        # Worker reports written but not yet committed: their ACKs and the runs they touched wait
        # for the commit, which comes at the next HTTP answer or COMMIT_DELAY after the first.
        self.held_since: float | None = None
        self.acks: dict[bytes, list[str]] = {}
        self.touched: set[str] = set()
        # Log lines of a burst are written after its calls went out and its answers were sent: on
        # an idle machine one line costs a tenth of a millisecond, which a trigger need not wait for.
        self.log_lines: list[tuple] = []
        self.gates = Gates(journal, jobs)
        # For /metrics, since this broker started: runs journaled and ended, and how long they took.
        self.runs_started: dict[str, int] = {}
        self.runs_ended: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.stopping = False
        self.started = time.time()

    def _secure(self, sock: zmq.Socket, domain: str) -> None:
        # ZMTP heartbeats: a worker host that vanished is dropped instead of queued for forever.
        sock.heartbeat_ivl, sock.heartbeat_timeout = 2000, 6000
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
            for name in self.expected_workers(call['topic']):
                ident = self.workers[name]['ident']
                if ident and self.enrolled.allowed_topics(name) is not None:    # kept off PUB by ZAP
                    # To the connection that proved it holds that worker's key, never to a name.
                    self.router.send_multipart([ident, p.CALL, payload])

    # -- the loop ---------------------------------------------------------
    def run(self) -> None:
        poller = zmq.Poller()
        for front in self.fronts:
            poller.register(front.reqs, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        while not self.stopping:
            timeout = 100.0 if self.held_since is None else \
                max(0.0, (self.held_since + COMMIT_DELAY - time.monotonic()) * 1000)
            events = dict(poller.poll(timeout))
            self.step(http=[f for f in self.fronts if f.reqs in events], router=self.router in events)
            self.tick(time.monotonic())

    def step(self, http=True, router: bool = True) -> None:
        """Handle one burst: journal it in one transaction, then publish, then answer.

        `http` is True (every front end) or the front ends with requests waiting.
        Nothing is answered, published or acknowledged before the commit. A burst of worker
        reports alone may be held open for COMMIT_DELAY, so reports arriving one by one share an
        fsync: a worker keeps each result in its outbox until the ACK, so a crash loses none."""
        calls, http_out, router_out = [], [], []
        self.journal.begin()
        before = self.journal.db.total_changes
        try:
            # Worker reports first: a handler call that came with its run's result sees that result.
            if router:
                self._drain(self.router, lambda m: self.on_router(m, router_out), router=True)
            for front in (self.fronts if http is True else http or []):
                self._drain(front.reqs, lambda m, f=front: self.on_http(m, f, calls, http_out))
            if self.parked and self.touched:    # results came in: the handler calls that waited for them
                ready = [x for x in self.parked if x[0] in self.touched]
                self.parked = [x for x in self.parked if x[0] not in self.touched]
                for _, req, until in ready:
                    self.handle(req, calls, http_out, until)
            now = time.monotonic()
            if self.held_since is None and self.journal.db.total_changes != before:
                self.held_since = now
            hold = (not (http_out or calls or self.new_waits) and self.held_since is not None
                    and now - self.held_since < COMMIT_DELAY)
            if not hold:
                self.journal.commit()
        except Exception:
            log.exception('journal commit failed; answering 500 to the whole burst')
            self.journal.rollback()
            hold, calls, router_out, self.touched, self.acks, self.log_lines = False, [], [], set(), {}, []
            http_out = [(req, 500, {'error': 'journal write failed'}) for req, _, _ in http_out]
            http_out += [(req, 500, {'error': 'journal write failed'}) for _, req, _ in self.new_waits]
            self.new_waits = []
        for frames in router_out:    # answers to SYNC: reads only
            self.router.send_multipart(frames)
        if hold:
            return
        self.held_since = None
        for call in calls:
            self.publish(call)
        for ident, run_ids in self.acks.items():    # one ACK per worker for all its results
            self.router.send_multipart([ident, p.ACK, p.pack({'run_ids': run_ids})])
        self.acks = {}
        for req, status, body in http_out:
            if isinstance(body, Raw):
                req.front.reply_http(req, status, body.body, content_type=body.content_type,
                                     extra_headers=body.headers)
            else:
                req.front.reply_http(req, status, encode(body))
        for run_id, req, deadline in self.new_waits:
            self.waiters.setdefault(run_id, []).append((req, deadline))
            self.touched.add(run_id)
        self.new_waits = []
        touched, self.touched = self.touched, set()
        for run_id in touched:
            self.check_waiters(run_id)
        lines, self.log_lines = self.log_lines, []
        for level, extra, *args in lines:
            log.log(level, *args, extra=extra)

    def _drain(self, sock, handle, router=False) -> None:
        for _ in range(BATCH):
            try:
                if router:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    # With CURVE, ZAP's User-Id (the enrolled key's name) is who sent it.
                    user = frames[-1].get('User-Id') if self.enrolled else None
                    msg = ([f.bytes for f in frames], user)
                else:
                    msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.journal.db.execute('SAVEPOINT msg')
            try:
                handle(msg)
                self.journal.db.execute('RELEASE msg')
            except Exception:
                # One bad message is dropped on its own; the rest of the burst goes on.
                log.exception('dropping a message that could not be handled')
                self.journal.db.execute('ROLLBACK TO msg')
                self.journal.db.execute('RELEASE msg')

    def tick(self, now: float) -> None:
        """Clock work after every poll: answer waits that ran out of time, prune now and then."""
        if now >= self.enrolled_due:
            self.enrolled_due = now + 2.0
            if self.enrolled:
                self.reload_keys()
            if self.clients:
                self.clients.refresh()
        if now >= self.prune_due:
            self.prune_due = now + min(60.0, max(1.0, self.keep / 10))
            self.prune()
        if now >= self.keep_alive_due:
            self.keep_alive_due = now + KEEP_ALIVE_EVERY
            self.keep_alive()
        if self.parked and min(until for _, _, until in self.parked) <= now:
            for _, req, _ in [x for x in self.parked if x[2] <= now]:
                req.front.reply_http(req, 503, encode({'error': 'the result of the run this handler call comes '
                                                                'from has not arrived; try again'}))
            self.parked = [x for x in self.parked if x[2] > now]
        for run_id, waits in list(self.waiters.items()):
            expired = [w for w in waits if w[1] <= now]
            if not expired:
                continue
            status = self.journal.status(run_id)
            for req, _ in expired:
                req.front.reply_http(req, 504, encode(status))
            self.waiters[run_id] = [w for w in waits if w[1] > now]
            if not self.waiters[run_id]:
                del self.waiters[run_id]

    def keep_alive(self) -> None:
        """Tell Mongrel2 the held wait= requests are alive, so its min_ping closes only idle connections."""
        held: dict[tuple, list[bytes]] = {}
        for waits in self.waiters.values():
            for req, _ in waits:
                held.setdefault((req.front, req.sender), []).append(req.conn_id)
        for (front, sender), conn_ids in held.items():
            front.keep_alive(sender, conn_ids)

    def forget_waits(self, front: Connection, conn_id: bytes) -> None:
        """The client of a held wait= request went away: free its place."""
        self.new_waits = [w for w in self.new_waits if not (w[1].conn_id == conn_id and w[1].front is front)]
        for run_id, waits in list(self.waiters.items()):
            left = [w for w in waits if not (w[0].conn_id == conn_id and w[0].front is front)]
            if len(left) < len(waits):
                if left:
                    self.waiters[run_id] = left
                else:
                    del self.waiters[run_id]

    def reload_keys(self) -> None:
        """Pick up enrolled keys added or removed; a removed key loses its live subscription at once."""
        _, removed = self.enrolled.refresh()
        if removed:
            log.warning('keys revoked: %s; rebinding the live socket so they drop off', ', '.join(sorted(removed)))
            for name in removed:
                if name in self.workers:
                    self.workers[name]['seen'] = float('-inf')
            self.pub.close()
            self.pub = self._bind_pub()    # honest workers reconnect and catch up by SYNC

    def prune(self) -> int:
        """Drop runs older than --keep-days that every remembered worker has taken."""
        cutoff = time.time() - self.keep
        slowest: dict[str, int] = {}
        for w in self.workers.values():
            if w['seen_at'] >= cutoff:    # a worker silent for longer holds nothing back
                for topic, seq in w['cursors'].items():
                    slowest[topic] = min(seq, slowest.get(topic, seq))
        self.journal.begin()
        try:
            n = self.journal.prune(cutoff, slowest)
            for name in [n for n, w in self.workers.items() if w['seen_at'] < cutoff]:
                self.journal.forget_worker(name)
                del self.workers[name]
            self.journal.commit()
        except Exception:
            self.journal.rollback()
            raise
        if n:
            log.info('pruned %d runs older than %.0f days', n, self.keep / 86400)
        return n

    def check_waiters(self, run_id: str) -> None:
        if run_id not in self.waiters:
            return
        status = self.journal.status(run_id)
        if status['state'] in ('succeeded', 'failed'):
            code = 200 if status['state'] == 'succeeded' else 500
            for req, _ in self.waiters.pop(run_id):
                req.front.reply_http(req, code, encode(status))

    # -- HTTP -------------------------------------------------------------
    def on_http(self, raw: bytes, front: Connection, calls: list, out: list) -> None:
        try:
            req = Request.parse(raw)
        except BadMessage as e:
            log.warning('dropping a Mongrel2 message that does not parse: %s', e)
            return
        req.front = front
        if req.is_disconnect():
            self.forget_waits(front, req.conn_id)
            return    # answering a disconnect makes Mongrel2 loop forever
        self.handle(req, calls, out)

    def handle(self, req: Request, calls: list, out: list, park_until: float | None = None) -> None:
        try:
            answer = self.route(req, calls)
            if answer is None:
                return    # a wait= request, answered when the run ends or time runs out
            status, body = answer if isinstance(answer, tuple) else (200, answer)
            out.append((req, status, body))
        except NotYet as e:
            # A handler call that overtook its run's result (they travel apart): it waits for the
            # result a moment, then is handled again; past PARK_FOR the worker is told to retry.
            if park_until is None or time.monotonic() < park_until:
                self.parked.append((e.run_id, req, park_until or time.monotonic() + PARK_FOR))
            else:
                out.append((req, e.status, {'error': str(e)}))
        except HttpError as e:
            out.append((req, e.status, {'error': str(e), **e.extra}))
        except Exception:
            log.exception('error handling %s %s', req.method, req.path)
            out.append((req, 500, {'error': 'internal error; see the broker log'}))

    def route(self, req: Request, calls: list) -> dict | None:
        problem = req.ambiguity()
        if problem:
            raise HttpError(400, problem)
        self.check_host(req)
        path = str(req.headers.get('PATH', req.path))
        methods = ROUTES.get(path)
        if methods is None:
            raise HttpError(404, f'unknown path {path!r}',
                            paths=sorted(ROUTES))
        if req.method not in methods:
            raise HttpError(405, f'method {req.method} not allowed on {path}; use {", ".join(methods)}')
        if len(req.body) > self.max_body:
            raise HttpError(413, f'request body over {self.max_body} bytes')
        if path in ('/job_start', '/job_note'):
            self.check_same_site(req)
        req.who = self.who(req)
        # Lone surrogates (from JSON escapes) cannot be stored: replace them like bad UTF-8.
        query = dict(parse_qsl(req.query.encode('utf-8', 'replace').decode(), keep_blank_values=True,
                               errors='replace'))
        if req.method == 'POST' and req.body:
            ctype = str(req.headers.get('content-type', ''))
            if not ctype.startswith('application/x-www-form-urlencoded'):
                raise HttpError(400, 'a POST body must be application/x-www-form-urlencoded')
            query.update(parse_qsl(req.body.decode('utf-8', 'replace'), keep_blank_values=True))
        handler = getattr(self, 'http_' + (path.strip('/') or 'index'))
        return handler(req, query, calls)

    def check_host(self, req: Request) -> None:
        """Serve only our own host names: a DNS-rebinding page sends its own."""
        host = req.header('host')
        if '*' in self.hostnames or not host:    # no Host: HTTP/1.0, not a browser
            return
        try:
            name = urlsplit('//' + host).hostname or ''
        except ValueError:
            raise HttpError(400, 'malformed Host header') from None
        if name not in self.hostnames:
            raise HttpError(403, f'host name {name[:100]!r} is not served here (broker --hostnames)')

    def check_same_site(self, req: Request) -> None:
        """Refuse a browser's request sent for another site: a page elsewhere must not start jobs here."""
        site = req.header('sec-fetch-site')
        origin = req.header('origin')
        own = f"{req.header('URL_SCHEME') or 'http'}://{req.header('host')}"
        if site in ('cross-site', 'same-site') or (origin and origin != own):
            log.warning('refused a %s %s sent from another site (Origin %r, Sec-Fetch-Site %r)',
                        req.method, req.path, origin[:100], site[:30])
            raise HttpError(403, 'a request from another site may not start jobs or add notes here')

    def who(self, req: Request) -> str:
        """Who sent a request: the enrolled name of its client certificate, or `plain:ADDRESS`."""
        if not req.front.tls:
            return f"plain:{req.headers.get('REMOTE_ADDR', '?')}"
        # Mongrel2's own headers are upper-case (a client's are lower-cased), so this is the
        # certificate Mongrel2 verified: 40 hex digits of its SHA1, then a stray '00'.
        fp = str(req.headers.get('PEER_CERT_SHA1', ''))[:40].upper()
        if len(fp) != 40:
            raise HttpError(403, 'no verified client certificate')
        if self.clients is None:
            return 'cert:' + fp
        name = self.clients.name_of(fp)
        if name is None:
            log.warning('refused a request from client certificate %s, which is not enrolled', fp)
            raise HttpError(403, 'client certificate not enrolled (or revoked)')
        return name

    def http_index(self, req, q, calls):
        if 'text/html' in str(req.headers.get('accept', '')):    # a browser: the status page
            page = Page()    # read each time: a few kilobytes, and an edited page needs no restart
            return Raw(page.body, 'text/html; charset=utf-8', page.headers)
        return {'service': 'jobz', 'paths': sorted(ROUTES)}

    def http_health(self, req, q, calls):
        return {'ok': True, 'uptime': round(time.time() - self.started, 3),
                'workers': len(self.live_workers()), 'jobs': len(self.jobs)}

    def http_jobs(self, req, q, calls):
        return {name: job.describe() for name, job in sorted(self.jobs.items())
                if self.access.may_start(req.who, req.front.tls, name)}

    def http_workers(self, req, q, calls):
        now = time.monotonic()
        out = {}
        for name, w in sorted(self.workers.items()):
            lag = {t: max(0, self.journal.heads.get(t, 0) - c) for t, c in w['cursors'].items()}
            out[name] = {'topics': sorted(w['topics']), 'alive': now - w['seen'] <= self.worker_timeout,
                         'last_heartbeat': w['seen_at'], 'seconds_ago': round(time.time() - w['seen_at'], 3),
                         'lag': lag, 'running': w['running'], 'running_runs': self.journal.running_on(name)}
        return out

    def http_runs(self, req, q, calls):
        limit = self._number(q, 'limit', 20, 1, 1000)
        return {'runs': self.journal.recent(q.get('job') or None, int(limit))}

    def http_job_status(self, req, q, calls):
        status = self.journal.status(self._required(q, 'run_id'))
        if status is None:
            raise HttpError(404, f"unknown run {q['run_id']!r}")
        return status

    def http_job_output(self, req, q, calls):
        run_id = self._required(q, 'run_id')
        status = self.journal.summaries('r.run_id = ?', (run_id,), 1)
        if not status:
            raise HttpError(404, f'unknown run {run_id!r}')
        offset = int(self._number(q, 'offset', 0, 0, 2 ** 53))
        workers = self.journal.output(run_id, q.get('worker') or None, offset)
        if q.get('worker') and not workers:
            raise HttpError(404, f"run {run_id} has no worker {q['worker']!r}")
        return {'run_id': run_id, 'state': status[0]['state'], 'workers': workers}

    def http_chain(self, req, q, calls):
        chain = self.gates.chain(self._required(q, 'run_id'))
        if chain is None:
            raise HttpError(404, f"unknown run {q['run_id']!r}")
        return chain

    def http_gates(self, req, q, calls):
        job = q.get('job') or None
        if job is not None and not (job in self.jobs and self.jobs[job].semaphore):
            raise HttpError(404, f'no semaphore job {job!r}')
        return {'gates': self.gates.all(job, open_only=q.get('open') in ('1', 'true', 'yes'))}

    def http_metrics(self, req, q, calls):
        return Raw(self.metrics(), 'text/plain; version=0.0.4; charset=utf-8')

    def metrics(self) -> bytes:
        m = Exposition()
        m.family('jobz_runs_started_total', 'counter', 'Runs journaled since the broker started.',
                 [({'job': j}, n) for j, n in sorted(self.runs_started.items())])
        m.family('jobz_runs_finished_total', 'counter', 'Runs that ended since the broker started, by state.',
                 [({'job': j, 'state': s}, n) for (j, s), n in sorted(self.runs_ended.items())])
        open_runs: dict[tuple[str, str], int] = {}
        for run in self.journal.open_runs():
            open_runs[run['job'], run['state']] = open_runs.get((run['job'], run['state']), 0) + 1
        m.family('jobz_runs_open', 'gauge', 'Runs in the journal that some worker has still to finish.',
                 [({'job': j, 'state': s}, n) for (j, s), n in sorted(open_runs.items())])
        m.family('jobz_run_duration_seconds', 'histogram', 'Seconds from trigger to the last worker finished.',
                 [({'job': j}, h) for j, h in sorted(self.durations.items())])
        now, alive = time.monotonic(), set(self.live_workers())
        m.family('jobz_workers_connected', 'gauge', 'Workers heard from within --worker-timeout.',
                 [({}, len(alive))])
        workers = sorted(self.workers.items())
        m.family('jobz_worker_up', 'gauge', 'Whether a known worker is connected.',
                 [({'worker': n}, int(n in alive)) for n, _ in workers])
        m.family('jobz_worker_lag', 'gauge', 'Calls on a topic the worker has not taken yet.',
                 [({'worker': n, 'topic': t}, max(0, self.journal.heads.get(t, 0) - c))
                  for n, w in workers for t, c in sorted(w['cursors'].items())])
        m.family('jobz_worker_heartbeat_age_seconds', 'gauge', 'Seconds since the worker was last heard.',
                 [({'worker': n}, round(min(now - w['seen'], time.time() - w['seen_at']), 3)) for n, w in workers])
        m.family('jobz_worker_running', 'gauge', 'Commands the worker says it is running.',
                 [({'worker': n}, w['running']) for n, w in workers])
        m.family('jobz_journal_runs', 'gauge', 'Runs in the journal.',
                 [({}, self.journal.db.execute('SELECT count(*) FROM runs').fetchone()[0])])
        m.family('jobz_journal_bytes', 'gauge', 'Size of the journal database and its write-ahead log.',
                 [({}, self.journal.size())])
        m.family('jobz_semaphore_gates_open', 'gauge', 'Gates with arrivals that have not released yet.',
                 [({'job': j}, n) for j, n in sorted(self.gates.open_counts().items())])
        m.family('jobz_http_waiting', 'gauge', 'job_start?wait= requests held open for their run to end.',
                 [({}, sum(len(w) for w in self.waiters.values()))])
        m.family('jobz_broker_uptime_seconds', 'gauge', 'Seconds since the broker started.',
                 [({}, round(time.time() - self.started, 3))])
        return m.text()

    def http_job_note(self, req, q, calls):
        run_id = self._required(q, 'run_id')
        note = self._required(q, 'note')[:2000]
        if not self.journal.exists(run_id):
            raise HttpError(404, f'unknown run {run_id!r}')
        self.access.check_note(run_id, req.who, req.front.tls)
        worker = req.who if req.front.tls else q.get('worker', '')[:200] or None    # over HTTPS: who it is
        self.journal.add_note(run_id, worker, note)
        return {'run_id': run_id, 'noted': note}

    def http_job_start(self, req, q, calls):
        name = self._required(q, 'job_name')
        job = self.jobs.get(name)
        if job is None:
            raise HttpError(404, f'unknown job {name!r}')
        if not self.access.may_start(req.who, req.front.tls, job.name):
            raise HttpError(403, f'{req.who} may not start job {job.name}')
        wait = self._number(q, 'wait', None, 0, MAX_WAIT)
        key = q.get('key') or None
        if key is not None and len(key) > 200:
            raise HttpError(400, "parameter 'key' is longer than 200 characters")
        parent = q.get('parent') or None
        self.access.check_link(job, key, parent, req.who, req.front.tls)
        run_id = self.journal.run_by_key(key) if key else None
        if run_id is not None and self.journal.run_row(run_id)['job'] != job.name:
            raise HttpError(409, f'key {key!r} is already used by a run of job {self.journal.run_row(run_id)["job"]}')
        if run_id is None:
            try:
                params, sanitized = prepare_params(job, q)
            except ParamError as e:
                raise HttpError(400, str(e)) from None
            run_id = new_run_id()
            while self.journal.exists(run_id):    # taken (in this burst, too): draw again
                run_id = new_run_id()
            workers = self.expected_workers(job.topic)
            call = self.journal.add_run(run_id, job.name, job.topic, params, sanitized, key,
                                        workers, parent, job.expires, req.who)
            calls.append(call)
            self.runs_started[job.name] = self.runs_started.get(job.name, 0) + 1
            self.log_lines.append((logging.INFO, about(run_id, job.name),
                                   'run %s: job %s on topic %s, seq %d, by %s',
                                   run_id, job.name, job.topic, call['seq'], req.who))
            if wait is None:    # answered from what we just wrote: no need to read it back
                return {'run_id': run_id, 'job': job.name, 'topic': job.topic, 'params': params,
                        'sanitized': sanitized, 'workers': workers, 'existing': False,
                        'status_url': f'/job_status?run_id={run_id}'}
            existing = False
        else:
            existing = True
        status = self.journal.status(run_id)
        if wait is not None:
            if status['state'] in ('succeeded', 'failed'):
                return (200 if status['state'] == 'succeeded' else 500), status
            held = [r for ws in self.waiters.values() for r, _ in ws] + [r for _, r, _ in self.new_waits]
            if len(held) >= MAX_WAITERS:
                raise HttpError(503, f'too many requests waiting (at most {MAX_WAITERS}); poll job_status instead')
            if sum(r.who == req.who for r in held) >= MAX_WAITERS_PER_CLIENT:
                raise HttpError(503, f'{req.who} has {MAX_WAITERS_PER_CLIENT} requests waiting already; '
                                     'poll job_status instead')
            self.new_waits.append((run_id, req, time.monotonic() + wait))
            return None
        return {'run_id': run_id, 'job': status['job'], 'topic': status['topic'],
                'params': status['params'], 'sanitized': status['sanitized'],
                'workers': sorted(status['workers']), 'existing': existing,
                'status_url': f'/job_status?run_id={run_id}'}

    def _required(self, q: dict, name: str) -> str:
        if not q.get(name):
            raise HttpError(400, f'missing parameter {name!r}')
        return q[name]

    def _number(self, q: dict, name: str, default, low: float, high: float):
        if name not in q:
            return default
        try:
            value = float(q[name])
        except ValueError:
            value = float('nan')
        if not low <= value <= high:
            raise HttpError(400, f'parameter {name!r} must be a number from {low:g} to {high:g}')
        return value

    # -- workers ----------------------------------------------------------
    def live_workers(self) -> list[str]:
        now = time.monotonic()
        return [n for n, w in self.workers.items() if now - w['seen'] <= self.worker_timeout]

    def expected_workers(self, topic: str) -> list[str]:
        """Workers a new run on `topic` waits for: those alive and subscribed now."""
        return sorted(n for n in self.live_workers() if topic in self.workers[n]['topics'])

    def on_router(self, message: tuple, out: list) -> None:
        frames, user = message
        if len(frames) != 3:
            log.warning('dropping a worker message with %d frames', len(frames))
            return
        ident, verb, payload = frames
        worker = ident.split(b'/', 1)[0].decode('utf-8', 'replace')    # NAME/RANDOM (the agent's routing id)
        if self.enrolled and (user != worker or self.enrolled.allowed_topics(worker) is False):
            # The authenticated key decides who this is, never the name the peer claims.
            log.warning('dropping a %r claiming to be %r from key %r', verb, worker, user)
            return
        try:
            msg = p.unpack(payload)
        except ValueError:
            log.warning('dropping a %r from %s: payload is not a JSON object', verb[:32], worker)
            return
        try:
            if verb == p.SYNC:
                out.append([ident, p.CALLS, p.pack(self.on_sync(worker, ident, msg))])
            elif verb == p.STARTED:
                run_id, started = p.text(msg.get('run_id'), 200), p.number(msg.get('started'))
                if run_id and started and self.may_report(worker, run_id) and \
                        self.journal.set_started(run_id, worker, started):
                    self.touched.add(run_id)
            elif verb == p.RESULT:
                run_id = p.text(msg.get('run_id'), 200)
                if not run_id:
                    raise ValueError('no run_id')
                if self.may_report(worker, run_id) and self.journal.set_result(run_id, worker, msg):
                    self.touched.add(run_id)
                    if isinstance(msg.get('output'), str):    # absent when the command wrote nothing
                        dropped = msg.get('output_dropped')
                        self.journal.add_output(run_id, worker, dropped if p.is_int(dropped) and dropped > 0 else 0,
                                                msg['output'], complete=True)
                    self.count_end(run_id)
                    # Successes are in the journal (and the worker's log); failures deserve a line here.
                    self.log_lines.append((logging.DEBUG if msg['state'] == 'succeeded' else logging.INFO,
                                           about(run_id),
                                           'run %s: %s on %s', run_id, msg['state'], worker))
                self.acks.setdefault(ident, []).append(run_id)
            elif verb == p.OUTPUT:    # output of a running command, so far: for people watching it
                run_id, offset = p.text(msg.get('run_id'), 200), msg.get('offset')
                if run_id and p.is_int(offset) and offset >= 0 and isinstance(msg.get('text'), str) \
                        and self.may_report(worker, run_id):
                    self.journal.add_output(run_id, worker, offset, msg['text'])
            elif verb == p.BYE:
                w = self.workers.get(worker)
                if w:    # remembered (its cursor still guards pruning), no longer expected
                    w['seen'] = float('-inf')
                    self.journal.save_worker(worker, w['topics'], w['cursors'],
                                             time.time() - self.worker_timeout - 1)
                log.info('worker %s left', worker)
            else:
                log.warning('dropping unknown verb %r from %s', verb[:32], worker)
        except (KeyError, TypeError, ValueError) as e:
            log.warning('dropping a bad %r from %s: %s', verb[:32], worker, str(e)[:200])

    def count_end(self, run_id: str) -> None:
        """If that result was the run's last, count the run as ended (for /metrics)."""
        ended = self.journal.ended(run_id)
        if ended:
            job, state, seconds = ended
            self.runs_ended[job, state] = self.runs_ended.get((job, state), 0) + 1
            self.durations.setdefault(job, Histogram()).observe(seconds)

    def may_report(self, worker: str, run_id: str) -> bool:
        """Only a worker the run waits for, or one subscribed to its topic (catching up), reports on it."""
        topic = self.journal.topic_of(run_id)
        if topic is None:
            return False
        w = self.workers.get(worker)
        if (w and topic in w['topics']) or worker in self.journal.workers_of(run_id):
            return True
        log.warning('refused a result for run %s (topic %s) from %s, which is not expected for it',
                    run_id, topic, worker)
        return False

    def agent_topics(self, name: str) -> set | None:
        """The topics of the worker or semaphore `name` (all: enrolled and not seen yet), or None: no agent."""
        if name in self.workers:
            return self.workers[name]['topics']
        allowed = self.enrolled.allowed_topics(name) if self.enrolled else False
        if allowed is False:
            return None
        return allowed if allowed is not None else {j.topic for j in self.jobs.values()}

    def on_sync(self, worker: str, ident: bytes, msg: dict) -> dict:
        """Register or refresh a worker and hand it the calls it has not seen."""
        given = msg.get('topics') if isinstance(msg.get('topics'), list) else []
        topics = sorted({t for t in given[:1000] if isinstance(t, str) and NAME_RE.match(t) and len(t) <= 200})
        allowed = self.enrolled.allowed_topics(worker) if self.enrolled else None
        if allowed is not None:
            refused = [t for t in topics if t not in allowed]
            if refused:
                log.warning('worker %s may not receive %s; ignoring those topics', worker, ', '.join(refused))
            topics = [t for t in topics if t in allowed]
        cursors = msg.get('cursors') if isinstance(msg.get('cursors'), dict) else {}
        calls, new_cursors = [], {}
        for topic in topics:
            head = self.journal.heads.get(topic, 0)
            cursor = cursors.get(topic)
            if not p.is_int(cursor) or not 0 <= cursor <= head:
                new_cursors[topic] = head    # a new subscription starts now
                continue
            if len(calls) >= SYNC_BATCH:     # one bounded answer; `more` asks for the rest
                new_cursors[topic] = cursor
                continue
            oldest = self.journal.oldest_seq(topic)
            if oldest is not None and cursor < oldest - 1:
                log.warning('worker %s is behind the journal on %s: calls %d to %d were pruned',
                            worker, topic, cursor + 1, oldest - 1)
            batch = self.journal.calls_after(topic, cursor, SYNC_BATCH - len(calls))
            calls += batch
            new_cursors[topic] = batch[-1]['seq'] if batch else cursor
        more = any(seq < self.journal.heads.get(t, 0) for t, seq in new_cursors.items())
        calls.sort(key=lambda c: c['created'])    # oldest first across topics: deadlines come first
        now = time.monotonic()
        old = self.workers.get(worker)
        if old is None or now - old['seen'] > self.worker_timeout:
            log.info('worker %s joined for topics %s', worker, ', '.join(topics))
        w = self.workers[worker] = {'topics': set(topics), 'seen': now, 'seen_at': time.time(),
                                    'cursors': new_cursors,
                                    'running': msg['running'] if p.is_int(msg.get('running')) else 0,
                                    'saved': old['saved'] if old else float('-inf'), 'ident': ident}
        if old is None or old['topics'] != w['topics'] or now - w['saved'] >= 10.0 or more:
            self.journal.save_worker(worker, topics, new_cursors, w['seen_at'])
            w['saved'] = now
        return {'calls': calls, 'cursors': new_cursors, 'more': more}

    def close(self) -> None:
        if self.auth:
            self.auth.stop()
        for front in self.fronts:
            front.close()
        self.pub.close()
        self.router.close()
        self.journal.close()
