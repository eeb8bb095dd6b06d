"""What the broker shows: the read-only HTTP handlers, chains with their fan-in gates, the status page."""
import base64
import hashlib
import itertools
import os
import re
import time

from .jobfile import Job, release_key, target_job
from .journal import Journal
from .m2 import HttpError, Raw
from .metrics import Stats, broker_metrics
from .protocol import OPEN_STATES, SUCCEEDED

MAX_CHAIN = 300    # runs in one chain answer; a bigger one is cut (and says so)
MAX_GATES = 200
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'page.html')


class Gates:
    """Fan-in gates as the journal shows them: the arrivals a semaphore counted, and what is missing."""

    def __init__(self, journal: Journal, jobs: dict[str, Job]):
        self.journal = journal
        self.jobs = jobs
        # Feeders of a gate: the jobs whose handlers trigger the semaphore job.
        self.feeders: dict[str, list[str]] = {}
        for name, job in sorted(jobs.items()):
            for target in {target_job(job.on_success), target_job(job.on_failure)}:
                if target in jobs and jobs[target].semaphore:
                    self.feeders.setdefault(target, []).append(name)

    def value_of(self, job: Job, run: dict) -> str:
        """Which gate of `job` an arrival run counts towards (as the semaphore decides it)."""
        return job.gate(run['params'], run['parent'])

    def arrivals(self, job: Job, value: str, limit: int = 10000) -> list[dict]:
        key = job.semaphore['key']
        if key:
            return self.journal.find([job.name], param=(key, value), limit=limit)
        if job.semaphore['count'] == 'all':
            return self.journal.find([job.name], parent=value, limit=limit)
        return self.journal.find([job.name], limit=limit)

    def gate(self, job: Job, value: str) -> dict:
        key, count = job.semaphore['key'], job.semaphore['count']
        arrivals = self.arrivals(job, value)
        counted = [a for a in arrivals if a['state'] == SUCCEEDED]    # the semaphore's answer: counted
        need = count if count != 'all' else len(self.journal.workers_of(value)) if value else 0
        released = self.journal.run_by_key(release_key(job.name, value))
        arrived = len(counted)
        if released:    # released means `need` were counted, even if some counts are not reported yet
            arrived = max(arrived, need)
        came = {a['parent'] for a in arrivals}
        waiting = []
        if count == 'all':
            parent = self.journal.summary(value) if value else None
            if parent and parent['state'] in OPEN_STATES:
                waiting.append(parent)
        else:
            for feeder in self.feeders.get(job.name, []):
                if key:
                    runs = self.journal.find([feeder], param=(key, value), limit=MAX_CHAIN)
                else:    # one gate for ever: only runs still going can be on their way
                    runs = [r for r in self.journal.find([feeder], limit=MAX_CHAIN)
                            if r['state'] in OPEN_STATES]
                waiting += [r for r in runs if r['run_id'] not in came]
        return {'id': f'{job.name}:{value}', 'job': job.name, 'key': key, 'value': value,
                'need': need, 'arrived': arrived, 'released': released,
                'arrivals': [{'run_id': a['run_id'], 'from': a['parent'],
                              'from_job': self._job_of(a['parent'])} for a in arrivals],
                'waiting': [{'run_id': w['run_id'], 'job': w['job'], 'state': w['state']}
                            for w in waiting[:MAX_CHAIN]],
                'missing': max(0, need - arrived)}

    def _job_of(self, run_id: str | None) -> str | None:
        row = self.journal.run_row(run_id) if run_id else None
        return row['job'] if row else None

    def seen(self, job_name: str | None = None):
        """(semaphore job, gate value, released?) of the gates in the journal's last arrivals, newest first."""
        names = [n for n, j in self.jobs.items() if j.semaphore and job_name in (None, n)]
        found = self.journal.find(names, limit=5000) \
            if names else []
        done = set()
        for run in found:
            job = self.jobs[run['job']]
            value = self.value_of(job, run)
            if (job.name, value) not in done:
                done.add((job.name, value))
                yield job, value, self.journal.run_by_key(release_key(job.name, value)) is not None

    def all(self, job_name: str | None = None, open_only: bool = False) -> list[dict]:
        """Gates seen in the journal, newest first."""
        wanted = ((job, value) for job, value, released in self.seen(job_name) if not (open_only and released))
        return [self.gate(job, value) for job, value in itertools.islice(wanted, MAX_GATES)]

    def open_counts(self) -> dict[str, int]:
        """Gates with arrivals and no release yet, per semaphore job (for /metrics)."""
        counts = {name: 0 for name, job in self.jobs.items() if job.semaphore}
        for job, _, released in self.seen():
            counts[job.name] += not released
        return counts

    def chain(self, run_id: str) -> dict | None:
        """The runs linked to `run_id` (ancestors, descendants, and everything through its gates)."""
        if not self.journal.exists(run_id):
            return None
        root = run_id
        for _ in range(MAX_CHAIN):
            parent = self.journal.run_row(root)['parent']
            if not parent or not self.journal.exists(parent):
                break
            root = parent
        runs, gates, todo = {}, {}, [root, run_id]
        while todo and len(runs) < MAX_CHAIN:
            rid = todo.pop(0)
            if rid in runs or rid is None:
                continue
            run = self.journal.summary(rid)
            if run is None:
                continue
            run['gate'] = None
            runs[rid] = run
            todo += run['children']
            job = self.jobs.get(run['job'])
            if job is not None and job.semaphore:
                gate_id = f'{job.name}:{self.value_of(job, run)}'
                run['gate'] = gate_id
                if gate_id not in gates:
                    gate = gates[gate_id] = self.gate(job, self.value_of(job, run))
                    todo += [a['from'] for a in gate['arrivals']] + [a['run_id'] for a in gate['arrivals']]
                    todo += [w['run_id'] for w in gate['waiting']] + [gate['released']]
        for run in runs.values():
            del run['key']
        return {'run_id': run_id, 'root': root, 'runs': runs, 'gates': gates, 'truncated': any(r and r not in runs for r in todo)}


class Page:
    """The status page (one static file) and the Content-Security-Policy that lets only it run."""

    def __init__(self, path: str = PAGE):
        with open(path, 'rb') as f:
            self.body = f.read()
        text = self.body.decode()

        def hashes(tag: str) -> str:
            found = re.findall(rf'<{tag}>(.*?)</{tag}>', text, re.S)
            return ' '.join("'sha256-%s'" % base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
                            for s in found) or "'none'"
        self.headers = {
            'Content-Security-Policy': f"default-src 'none'; script-src {hashes('script')}; "
                                       f"style-src {hashes('style')}; connect-src 'self'; img-src 'self' data:; "
                                       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
            'X-Content-Type-Options': 'nosniff',
            'Cache-Control': 'no-cache',
        }


class Views:
    """The read-only handlers of the HTTP API; front.py routes to them by name."""

    def __init__(self, jobs: dict[str, Job], journal: Journal, registry, stats: Stats, waiting):
        self.jobs = jobs
        self.journal = journal
        self.registry = registry        # back.Registry: the workers and semaphores
        self.stats = stats
        self.waiting = waiting          # () -> how many wait= requests are held
        self.gates = Gates(journal, jobs)
        self.paths: list[str] = []      # every path served (front.py fills it in)

    def index(self, ask):
        if 'text/html' in ask.req.header('accept'):    # a browser: the status page
            page = Page()    # read each time: a few kilobytes, and an edited page needs no restart
            return Raw(page.body, 'text/html; charset=utf-8', page.headers)
        return {'service': 'jobz', 'paths': self.paths}

    def health(self, ask):
        return {'ok': True, 'uptime': round(time.time() - self.stats.started_at, 3),
                'workers': len(self.registry.live()), 'jobs': len(self.jobs)}

    def workers(self, ask):
        now, out, held = time.monotonic(), {}, self.journal.pool_held()
        for name, peer in sorted(self.registry.peers.items()):
            lag = {t: max(0, self.journal.heads.get(t, 0) - c) for t, c in peer.cursors.items()}
            out[name] = {'topics': sorted(peer.topics), 'alive': self.registry.alive(peer, now),
                         'last_heartbeat': peer.last_seen(), 'seconds_ago': round(now - peer.seen, 3),
                         'lag': lag, 'running': peer.running, 'running_runs': self.journal.running_on(name),
                         'slots': peer.slots, 'pool_calls': held.get(name, 0),
                         'free_slots': max(0, peer.slots - peer.busy - held.get(name, 0))}
        return out

    def runs(self, ask):
        limit = number(ask.q, 'limit', 20, 1, 1000)
        return {'runs': self.journal.recent(ask.q.get('job') or None, int(limit))}

    def job_status(self, ask):
        status = self.journal.status(required(ask.q, 'run_id'))
        if status is None:
            raise HttpError(404, f"unknown run {ask.q['run_id']!r}")
        return status

    def job_output(self, ask):
        q = ask.q
        run_id = required(q, 'run_id')
        status = self.journal.summary(run_id, children=False)
        if status is None:
            raise HttpError(404, f'unknown run {run_id!r}')
        offset = int(number(q, 'offset', 0, 0, 2 ** 53))
        workers = self.journal.output(run_id, q.get('worker') or None, offset)
        if q.get('worker') and not workers:
            raise HttpError(404, f"run {run_id} has no worker {q['worker']!r}")
        return {'run_id': run_id, 'state': status['state'], 'workers': workers}

    def chain(self, ask):
        chain = self.gates.chain(required(ask.q, 'run_id'))
        if chain is None:
            raise HttpError(404, f"unknown run {ask.q['run_id']!r}")
        return chain

    def gates_of(self, ask):
        job = ask.q.get('job') or None
        if job is not None and not (job in self.jobs and self.jobs[job].semaphore):
            raise HttpError(404, f'no semaphore job {job!r}')
        return {'gates': self.gates.all(job, open_only=ask.q.get('open') in ('1', 'true', 'yes'))}

    def metrics(self, ask):
        return Raw(broker_metrics(self.stats, self.registry, self.journal, self.gates, self.waiting()),
                   'text/plain; version=0.0.4; charset=utf-8')


def required(q: dict, name: str) -> str:
    if not q.get(name):
        raise HttpError(400, f'missing parameter {name!r}')
    return q[name]


def number(q: dict, name: str, default, low: float, high: float):
    if name not in q:
        return default
    try:
        value = float(q[name])
    except ValueError:
        value = float('nan')
    if not low <= value <= high:
        raise HttpError(400, f'parameter {name!r} must be a number from {low:g} to {high:g}')
    return value
