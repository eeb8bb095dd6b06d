"""Who may do what through the front end.

- A client certificate enrolled with a `# jobs:` line (`jobz-ca client NAME --jobs ...`) starts
  only those jobs; the certificate of a worker or semaphore (named as the agent, as the Ansible
  roles issue them) starts only the jobs its handlers name. Others start any job.
- The idempotency keys jobz makes itself belong to the run they come from: RUN.WORKER.STATE (a
  worker's handler call) and semaphore.JOB.GATE (a gate's release). Only a trigger linked to that
  run (parent=RUN) of a job that run's handler names may use one, and over HTTPS only the agent
  that ran it: nobody can take such a key first and so stop (or steer) the real next step.
- A gate arrival, a trigger of a semaphore job, must be such a handler call, for a run its worker
  has finished: a gate counts real completions, each once.
- parent= and notes over HTTPS come only from a worker of that run.

Over the plain front end (loopback unless configured otherwise) nobody is authenticated, so the
rules that need a caller's identity hold over HTTPS only.
"""
from fnmatch import fnmatchcase

from .jobfile import HANDLER_KEY_RE, RELEASE_KEY_PREFIX, Job, release_key, target_job
from .journal import Journal
from .m2 import HttpError
from .tls import ClientCerts


class NotYet(HttpError):
    """A handler call that came before the result it follows: the broker holds it for that result."""

    def __init__(self, run_id: str, message: str):
        super().__init__(503, message)
        self.run_id = run_id


class Access:
    def __init__(self, jobs: dict[str, Job], journal: Journal, clients: ClientCerts | None, agent_topics):
        self.jobs = jobs
        self.journal = journal
        self.clients = clients
        self.agent_topics = agent_topics    # name -> the topics of that worker or semaphore, or None
        self.targets = {name: {target_job(job.on_success), target_job(job.on_failure)} - {None}
                        for name, job in jobs.items()}

    def may_start(self, who: str, tls: bool, job: str) -> bool:
        """May this caller start `job`?"""
        if not tls:
            return True
        patterns = self.clients.jobs.get(who) if self.clients else None
        if patterns is not None:
            return any(fnmatchcase(job, p) for p in patterns)
        topics = self.agent_topics(who)
        if topics is not None:    # an agent's certificate: what its handlers name
            return any(job in self.targets[j.name] for j in self.jobs.values() if j.topic in topics)
        return True

    def check_link(self, job: Job, key: str | None, parent: str | None, who: str, tls: bool) -> None:
        """Refuse (HttpError) a trigger whose key or parent the caller may not use."""
        row = self.journal.run_row(parent) if parent else None
        if parent and row is None:
            raise HttpError(400, f'unknown parent run {parent!r}')
        handler = HANDLER_KEY_RE.match(key or '')
        if handler:
            self._check_handler_call(job, key, parent, row, *handler.groups(), who=who, tls=tls)
            return
        if key and key.startswith(RELEASE_KEY_PREFIX):
            gate_job = self.jobs.get(row['job']) if row else None
            if gate_job is None or not gate_job.semaphore or not key.startswith(release_key(gate_job.name, '')) \
                    or target_job(gate_job.on_success) != job.name:
                raise HttpError(403, f"keys starting with {RELEASE_KEY_PREFIX!r} are the releases of semaphores: "
                                     "only a gate's own release may use one")
        elif job.semaphore:
            raise HttpError(403, f'{job.name} is a semaphore job: it counts completions, so only the handler '
                                 'calls of the jobs that feed it may trigger it')
        if parent and tls and who not in self.journal.workers_of(parent):
            raise HttpError(403, f'only a worker of run {parent} may name it as parent')

    def _check_handler_call(self, job: Job, key: str, parent: str | None, row, run: str, worker: str,
                            state: str, *, who: str, tls: bool) -> None:
        if parent != run:
            raise HttpError(403, f'key {key!r} belongs to the handler call of run {run}: '
                                 f'only a trigger with parent={run} may use it')
        source = self.jobs.get(row['job'])
        if source is None or target_job(source.handler(state)) != job.name:
            raise HttpError(403, f'key {key!r}: the job of run {run} does not start {job.name} when it {state}')
        if tls and who != worker:
            raise HttpError(403, f'key {key!r} belongs to worker {worker}')
        have = self.journal.result_state(run, worker)
        # The worker reports its result before it calls the handler, but the two travel apart.
        if have is None or (job.semaphore and have != state):
            raise NotYet(run, f'run {run} has no {state} result from {worker} yet; try again')

    def check_note(self, run_id: str, who: str, tls: bool) -> None:
        if tls and who not in self.journal.workers_of(run_id):
            raise HttpError(403, f'only a worker of run {run_id} may add notes to it')
