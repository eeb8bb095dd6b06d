"""The HTTP side of the broker: one table from path to handler, who is calling, the held requests.

A request goes on_http -> handle -> route (checks, then its handler from the routing table) ->
job_start, which journals the run and puts its call in the burst; the broker publishes it and
answers once the burst is committed.
"""
import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from . import defaults, protocol as p
from .access import Access, NotYet
from .burst import Burst
from .jobfile import Job, ParamError, prepare_params
from .journal import Journal
from .logs import about
from .m2 import BadMessage, Connection, HttpError, Raw, Request, encode
from .pool import Pool
from .tls import ClientCerts
from .views import Views, number, required

log = logging.getLogger('jobz.broker')

MAX_WAIT = 3600.0
MAX_WAITERS = 1000               # wait= requests held at once
MAX_WAITERS_PER_CLIENT = 100     # ... of them from one client (certificate name, or plain:ADDRESS)
KEEP_ALIVE_EVERY = 3.0           # seconds between Mongrel2 keep-alives for held requests (its min_ping is 10)
PARK_FOR = 5.0                   # seconds a handler call may wait for the result of its run to arrive


@dataclass
class Caller:
    name: str     # the client certificate's enrolled name (or cert:FINGERPRINT), or plain:ADDRESS
    tls: bool     # came through the HTTPS front end


@dataclass
class Ask:
    """One request as a handler sees it."""
    req: Request
    q: dict           # query and form values
    caller: Caller
    burst: Burst      # where a handler puts what must wait for the commit


def new_run_id() -> str:
    # 48 random bits a second: even at 10,000 triggers a second a repeat is a one-in-10^7 event
    # (32 bits made one at 5,000/s about every five minutes); the caller still checks.
    return time.strftime('%Y%m%d-%H%M%S-') + secrets.token_hex(6)


class Front:
    def __init__(self, jobs: dict[str, Job], journal: Journal, views: Views, access: Access, expected, pool: Pool, *,
                 clients: ClientCerts | None = None, hostnames: str = defaults.HOSTNAMES, max_body: int = 65536):
        self.jobs = jobs
        self.journal = journal
        self.views = views
        self.access = access
        self.expected = expected        # topic -> the workers a new run on it waits for
        self.pool = pool                # run_on: one jobs: each call to one worker
        self.clients = clients
        # Host names served ('*': any). A browser on another site that rebinds its own name to our
        # address sends that name: refused, so it cannot read our answers.
        self.hostnames = {h.strip().lower().strip('[]') for h in hostnames.split(',') if h.strip()}
        self.max_body = max_body
        self.waits = Waits()
        self.parked: list[tuple[str, Request, float]] = []    # (run_id, handler call, until): see handle()
        # path -> (methods, handler). No HEAD on job_start and job_note: a link checker must not start jobs.
        self.routes = {
            '/': (('GET', 'HEAD'), views.index),
            '/job_start': (('GET', 'POST'), self.job_start),
            '/job_note': (('GET', 'POST'), self.job_note),
            '/job_status': (('GET', 'HEAD'), views.job_status),
            '/jobs': (('GET', 'HEAD'), self.catalog),
            '/workers': (('GET', 'HEAD'), views.workers),
            '/runs': (('GET', 'HEAD'), views.runs),
            '/health': (('GET', 'HEAD'), views.health),
            '/job_output': (('GET', 'HEAD'), views.job_output),
            '/chain': (('GET', 'HEAD'), views.chain),
            '/gates': (('GET', 'HEAD'), views.gates_of),
            '/metrics': (('GET', 'HEAD'), views.metrics),
        }
        views.paths = sorted(self.routes)

    # -- a request, from Mongrel2's message to its answer ---------------------------------------
    def on_http(self, raw: bytes, conn: Connection, burst: Burst) -> None:
        try:
            req = Request.parse(raw, conn)
        except BadMessage as e:
            log.warning('dropping a Mongrel2 message that does not parse: %s', e)
            return
        if req.is_disconnect():
            self.waits.forget(req, burst)
            return    # answering a disconnect makes Mongrel2 loop forever
        self.handle(req, burst)

    def refuse(self, raw: bytes, conn: Connection) -> None:
        """Answer 503 at once: the journal cannot be reached, so nothing can be started or read."""
        try:
            req = Request.parse(raw, conn)
        except BadMessage:
            return
        if not req.is_disconnect():
            conn.answer(req, 503, {'error': 'the journal is unreachable: nothing was started; try again'})

    def handle(self, req: Request, burst: Burst, park_until: float | None = None) -> None:
        """Answer a request (into the burst). One that fails leaves nothing behind: its journal writes
        are undone, and what it added to the burst is forgotten."""
        mark = burst.mark()
        try:
            with self.journal.savepoint():
                answer = self.route(req, burst)
        except NotYet as e:
            burst.rewind(mark)
            # A handler call that overtook its run's result (they travel apart): it waits for the
            # result a moment, then is handled again; past PARK_FOR the worker is told to retry.
            if park_until is None or time.monotonic() < park_until:
                self.parked.append((e.run_id, req, park_until or time.monotonic() + PARK_FOR))
            else:
                burst.answers.append((req, e.status, {'error': str(e)}))
            return
        except HttpError as e:
            burst.rewind(mark)
            burst.answers.append((req, e.status, {'error': str(e), **e.extra}))
            return
        except Exception:
            burst.rewind(mark)
            log.exception('error handling %s %s', req.method, req.path)
            burst.answers.append((req, 500, {'error': 'internal error; see the broker log'}))
            return
        if answer is not None:    # None: a wait= request, answered when the run ends or time runs out
            status, body = answer if isinstance(answer, tuple) else (200, answer)
            burst.answers.append((req, status, body))

    def unpark(self, burst: Burst) -> None:
        """Handle again the handler calls whose runs' results came in this burst."""
        if self.parked and burst.touched:
            ready = [x for x in self.parked if x[0] in burst.touched]
            self.parked = [x for x in self.parked if x[0] not in burst.touched]
            for _, req, until in ready:
                self.handle(req, burst, until)

    def route(self, req: Request, burst: Burst) -> dict | Raw | tuple | None:
        problem = req.ambiguity()
        if problem:
            raise HttpError(400, problem)
        self.check_host(req)
        path = str(req.headers.get('PATH', req.path))
        methods, handler = self.routes.get(path, (None, None))
        if handler is None:
            raise HttpError(404, f'unknown path {path!r}', paths=sorted(self.routes))
        if req.method not in methods:
            raise HttpError(405, f'method {req.method} not allowed on {path}; use {", ".join(methods)}')
        if len(req.body) > self.max_body:
            raise HttpError(413, f'request body over {self.max_body} bytes')
        if path in ('/job_start', '/job_note'):
            self.check_same_site(req)
        caller = Caller(self.who(req), req.front.tls)
        # Lone surrogates (from JSON escapes) cannot be stored: replace them like bad UTF-8.
        query = dict(parse_qsl(req.query.encode('utf-8', 'replace').decode(), keep_blank_values=True,
                               errors='replace'))
        if req.method == 'POST' and req.body:
            ctype = req.header('content-type')
            if not ctype.startswith('application/x-www-form-urlencoded'):
                raise HttpError(400, 'a POST body must be application/x-www-form-urlencoded')
            query.update(parse_qsl(req.body.decode('utf-8', 'replace'), keep_blank_values=True))
        return handler(Ask(req, query, caller, burst))

    # -- who is calling, and from where ---------------------------------------------------------
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
        site, origin = req.header('sec-fetch-site'), req.header('origin')
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

    # -- the handlers that write --------------------------------------------------------------
    def job_start(self, ask: Ask):
        q, caller = ask.q, ask.caller
        job = self.jobs.get(required(q, 'job_name'))
        if job is None:
            raise HttpError(404, f"unknown job {q['job_name']!r}")
        if not self.access.may_start(caller.name, caller.tls, job.name):
            raise HttpError(403, f'{caller.name} may not start job {job.name}')
        wait = number(q, 'wait', None, 0, MAX_WAIT)
        key = q.get('key') or None
        if key is not None and len(key) > 200:
            raise HttpError(400, "parameter 'key' is longer than 200 characters")
        parent = q.get('parent') or None
        self.access.check_link(job, key, parent, caller.name, caller.tls)
        run_id = self.journal.run_by_key(key) if key else None
        if run_id is not None and self.journal.run_row(run_id)['job'] != job.name:
            raise HttpError(409, f'key {key!r} is already used by a run of job {self.journal.run_row(run_id)["job"]}')
        if run_id is None:
            run_id, params, sanitized, workers = self.start(job, q, key, parent, caller, ask.burst)
            if wait is None:    # answered from what was just written: no need to read it back
                answer = {'run_id': run_id, 'job': job.name, 'topic': job.topic, 'params': params,
                          'sanitized': sanitized, 'workers': workers, 'existing': False,
                          'status_url': f'/job_status?run_id={run_id}'}
                if job.run_on == 'one':
                    answer['queued'] = not workers    # waiting for a worker with room
                return answer
            existing = False
        else:
            existing = True
        status = self.journal.status(run_id)
        if wait is not None:
            if status['state'] in p.RUN_ENDED:
                return (200 if status['state'] == p.SUCCEEDED else 500), status
            self.waits.hold(run_id, ask.req, caller.name, wait, ask.burst)
            return None
        return {'run_id': run_id, 'job': status['job'], 'topic': status['topic'],
                'params': status['params'], 'sanitized': status['sanitized'],
                'workers': sorted(status['workers']), 'existing': existing,
                'status_url': f'/job_status?run_id={run_id}'}

    def start(self, job: Job, q: dict, key: str | None, parent: str | None, caller: Caller,
              burst: Burst) -> tuple[str, dict, list, list]:
        """Journal a new run of `job` (in the burst's transaction), put its call in the burst.

        Returns (run id, parameters, the names of those sanitized, the workers expected)."""
        try:
            params, sanitized = prepare_params(job, q)
        except ParamError as e:
            raise HttpError(400, str(e)) from None
        run_id = new_run_id()
        while self.journal.exists(run_id):    # taken (in this burst, too): draw again
            run_id = new_run_id()
        pool = job.run_on == 'one'
        workers = [] if pool else self.expected(job.topic)
        call = self.journal.add_run(run_id, job.name, job.topic, params, sanitized, key, workers, parent,
                                    job.expires, caller.name, pool=pool)
        if pool:    # not published: given to one worker with room, now or when one has some
            worker = self.pool.add(run_id, job.topic, burst)
            workers = [worker] if worker else []
        else:
            burst.calls.append(call)
        burst.started.append(job.name)
        burst.logs.append((logging.INFO, about(run_id, job.name), 'run %s: job %s on topic %s, seq %d, by %s',
                           run_id, job.name, job.topic, call['seq'], caller.name))
        return run_id, params, sanitized, workers

    def job_note(self, ask: Ask):
        run_id, note = required(ask.q, 'run_id'), required(ask.q, 'note')[:2000]
        if not self.journal.exists(run_id):
            raise HttpError(404, f'unknown run {run_id!r}')
        self.access.check_note(run_id, ask.caller.name, ask.caller.tls)
        # Over HTTPS the note is signed with the certificate's name, whatever `worker=` says.
        worker = ask.caller.name if ask.caller.tls else ask.q.get('worker', '')[:200] or None
        self.journal.add_note(run_id, worker, note)
        return {'run_id': run_id, 'noted': note}

    def catalog(self, ask: Ask):
        return {name: job.describe() for name, job in sorted(self.jobs.items())
                if self.access.may_start(ask.caller.name, ask.caller.tls, name)}

    # -- clock work ---------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Answer waits whose time ran out, send keep-alives, tell overdue parked calls to retry."""
        self.waits.tick(now, self.journal)
        if self.parked and min(until for _, _, until in self.parked) <= now:
            for _, req, _ in [x for x in self.parked if x[2] <= now]:
                req.front.reply_http(req, 503, encode({'error': 'the result of the run this handler call comes '
                                                                'from has not arrived; try again'}))
            self.parked = [x for x in self.parked if x[2] > now]


class Waits:
    """Requests held by `wait=` until their run ends: kept alive, capped, freed when their client goes."""

    def __init__(self):
        self.held: dict[str, list[tuple[Request, str, float]]] = {}    # run_id -> [(request, caller, deadline)]
        self.keep_alive_due = 0.0

    def count(self) -> int:
        return sum(len(w) for w in self.held.values())

    def hold(self, run_id: str, req: Request, caller: str, wait: float, burst: Burst) -> None:
        """Hold `req` (once the burst commits) until run_id ends or `wait` seconds pass."""
        held = [c for ws in self.held.values() for _, c, _ in ws] + [c for _, _, c, _ in burst.waits]
        if len(held) >= MAX_WAITERS:
            raise HttpError(503, f'too many requests waiting (at most {MAX_WAITERS}); poll job_status instead')
        if held.count(caller) >= MAX_WAITERS_PER_CLIENT:
            raise HttpError(503, f'{caller} has {MAX_WAITERS_PER_CLIENT} requests waiting already; '
                                 'poll job_status instead')
        burst.waits.append((run_id, req, caller, time.monotonic() + wait))

    def keep(self, burst: Burst) -> None:
        """After the commit: the burst's waits are held from now on."""
        for run_id, req, caller, deadline in burst.waits:
            self.held.setdefault(run_id, []).append((req, caller, deadline))
            burst.touched.add(run_id)    # it may have ended meanwhile

    def answer(self, run_ids, journal: Journal) -> None:
        """Answer the waits of runs that ended: 200 if all succeeded, else 500, with the run status."""
        for run_id in run_ids:
            if run_id not in self.held:
                continue
            status = journal.status(run_id)
            if status['state'] in p.RUN_ENDED:
                code = 200 if status['state'] == p.SUCCEEDED else 500
                for req, _, _ in self.held.pop(run_id):
                    req.front.reply_http(req, code, encode(status))

    def forget(self, gone: Request, burst: Burst) -> None:
        """The client of a held request went away (Mongrel2 said so): free its place."""
        def same(req: Request) -> bool:
            return req.conn_id == gone.conn_id and req.front is gone.front
        burst.waits[:] = [w for w in burst.waits if not same(w[1])]
        for run_id, waits in list(self.held.items()):
            left = [w for w in waits if not same(w[0])]
            if left:
                self.held[run_id] = left
            else:
                del self.held[run_id]

    def tick(self, now: float, journal: Journal) -> None:
        if now >= self.keep_alive_due:
            # Mongrel2 closes a connection quiet for limits.min_ping; these are quiet on purpose.
            self.keep_alive_due = now + KEEP_ALIVE_EVERY
            targets: dict[tuple, list[bytes]] = {}
            for waits in self.held.values():
                for req, _, _ in waits:
                    targets.setdefault((req.front, req.sender), []).append(req.conn_id)
            for (front, sender), conn_ids in targets.items():
                front.keep_alive(sender, conn_ids)
        for run_id, waits in list(self.held.items()):
            expired = [w for w in waits if w[2] <= now]
            if expired:
                status = journal.status(run_id)
                for req, _, _ in expired:
                    req.front.reply_http(req, 504, encode(status))
                left = [w for w in waits if w[2] > now]
                if left:
                    self.held[run_id] = left
                else:
                    del self.held[run_id]

