"""The semaphore: counts completions per key value and releases the next job once."""
import logging
import time

from .agent import Agent
from .logs import about
from .jobfile import Job, check_call, handler_url, release_key
from .protocol import FAILED, SUCCEEDED

log = logging.getLogger('jobz.semaphore')

SCHEMA = """
CREATE TABLE IF NOT EXISTS arrivals (
    job TEXT NOT NULL, gate TEXT NOT NULL, source TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (job, gate, source)
);
CREATE TABLE IF NOT EXISTS released (
    job TEXT NOT NULL, gate TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (job, gate)
);
"""


class Semaphore:
    def __init__(self, agent: Agent, jobs: dict[str, Job], *, name: str, url: str):
        self.agent = agent
        self.jobs = {n: j for n, j in jobs.items() if j.semaphore}
        self.name = name
        self.url = url
        self.stop_requests = 0
        agent.db.executescript(SCHEMA)
        # Counting is one transaction, so a call caught mid-way simply counts now.
        for call in agent.queued() + [c for c, _ in agent.interrupted()]:
            self.handle(call)

    def request_stop(self, signum=None, frame=None) -> None:
        self.stop_requests += 1    # only a flag; the loop ends at its next turn

    def run(self) -> None:
        while not self.stop_requests:
            calls, _ = self.agent.poll(100)
            for call in calls:
                self.handle(call)
            self.agent.tick(time.monotonic())
            self.agent.commit()    # one fsync for every call counted in this turn
        self.agent.flush()

    def handle(self, call: dict) -> None:
        run_id = str(call['run_id'])
        job = self.jobs.get(call.get('job'))
        params = call.get('params') if isinstance(call.get('params'), dict) else {}
        if job is None:
            self.fail(run_id, f"no semaphore job {call.get('job')!r} on {self.name}")
            return
        try:
            check_call(call, job)    # our own rules, whatever the broker sent
        except ValueError as e:
            log.error('run %s: refused: %s', run_id, e, extra=about(run_id, job.name))
            self.fail(run_id, f'refused: {e}')
            return
        key = job.semaphore['key']
        if key and not params.get(key):
            self.fail(run_id, f'call has no value for key {key!r}')
            return
        need = job.semaphore['count']
        if need == 'all':
            # Every worker the parent run waited for; one gate per parent unless a key says otherwise.
            need = len(call.get('parent_workers') or [])
            if not need:
                self.fail(run_id, "count: all needs a trigger from a job's handler (no parent run)")
                return
        gate = job.gate(params, call.get('parent'))
        # A completion is identified by its trigger's idempotency key (run, worker, outcome),
        # so a handler call that was retried is counted once.
        source = str(call.get('key') or run_id)
        started = time.time()
        # Arrival, count and release go into this turn's transaction with the result: all or nothing.
        db = self.agent.write()
        db.execute('INSERT OR IGNORE INTO arrivals VALUES (?, ?, ?, ?)', (job.name, gate, source, time.time()))
        (n,) = db.execute('SELECT count(*) FROM arrivals WHERE job = ? AND gate = ?', (job.name, gate)).fetchone()
        done = db.execute('SELECT 1 FROM released WHERE job = ? AND gate = ?', (job.name, gate)).fetchone()
        label = key or ('parent' if job.semaphore['count'] == 'all' else 'gate')
        tail, urls = f'{n} of {need} for {label}={gate}', []
        if not done and n >= need:
            db.execute('INSERT INTO released VALUES (?, ?, ?)', (job.name, gate, time.time()))
            tail += '; released'
            log.info('semaphore %s released for %s=%s', job.name, label, gate, extra=about(run_id, job.name))
            urls = self.release_urls(job, params, run_id, gate)
        self.agent.finish(run_id, {'state': SUCCEEDED, 'rc': 0, 'started': started, 'finished': time.time(),
                                   'output_tail': tail}, urls)
        log.info('semaphore %s: %s', job.name, tail, extra=about(run_id, job.name))

    def fail(self, run_id: str, reason: str) -> None:
        self.agent.finish(run_id, {'state': FAILED, 'reason': reason})

    def release_urls(self, job: Job, params: dict, run_id: str, gate: str) -> list[str]:
        try:
            # Deterministic key: a restarted semaphore can never release the same gate twice.
            url = handler_url(job, SUCCEEDED, run_id, params, self.name, 0, self.url, release_key(job.name, gate))
        except KeyError as e:
            log.error('semaphore %s: on_success needs %r, which the call does not carry', job.name, e.args[0],
                      extra=about(run_id, job.name))
            return []
        return [url] if url else []
