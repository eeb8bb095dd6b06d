"""What the broker shows besides single runs: chains with their fan-in gates, and the status page."""
import base64
import hashlib
import itertools
import os
import re

from .jobfile import Job, release_key, target_job
from .journal import Journal

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
        key = job.semaphore['key']
        if key:
            return str(run['params'].get(key, ''))
        return str(run['parent'] or '') if job.semaphore['count'] == 'all' else ''

    def arrivals(self, job: Job, value: str, limit: int = 10000) -> list[dict]:
        key = job.semaphore['key']
        if key:
            return self.journal.summaries("r.job = ? AND json_extract(r.params, '$.' || ?) = ?",
                                          (job.name, key, value), limit)
        if job.semaphore['count'] == 'all':
            return self.journal.summaries('r.job = ? AND r.parent = ?', (job.name, value), limit)
        return self.journal.summaries('r.job = ?', (job.name,), limit)

    def gate(self, job: Job, value: str) -> dict:
        key, count = job.semaphore['key'], job.semaphore['count']
        arrivals = self.arrivals(job, value)
        counted = [a for a in arrivals if a['state'] == 'succeeded']    # the semaphore's answer: counted
        need = count if count != 'all' else len(self.journal.workers_of(value)) if value else 0
        released = self.journal.run_by_key(release_key(job.name, value))
        arrived = len(counted)
        if released:    # released means `need` were counted, even if some counts are not reported yet
            arrived = max(arrived, need)
        came = {a['parent'] for a in arrivals}
        waiting = []
        if count == 'all':
            parent = self.journal.summary(value) if value else None
            if parent and parent['state'] in ('pending', 'running'):
                waiting.append(parent)
        else:
            for feeder in self.feeders.get(job.name, []):
                if key:
                    runs = self.journal.summaries("r.job = ? AND json_extract(r.params, '$.' || ?) = ?",
                                                  (feeder, key, value), MAX_CHAIN)
                else:    # one gate for ever: only runs still going can be on their way
                    runs = [r for r in self.journal.summaries('r.job = ?', (feeder,), MAX_CHAIN)
                            if r['state'] in ('pending', 'running')]
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
        found = self.journal.summaries('r.job IN (%s)' % ','.join('?' * len(names)), tuple(names), 5000) \
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
