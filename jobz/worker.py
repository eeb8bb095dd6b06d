"""The worker: runs its own configured command for each call of its topics."""
import codecs
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field

from .agent import Agent
from .logs import about
from .jobfile import Job, check_call, handler_key, handler_url, render_command
from .protocol import EXPIRED, FAILED, INTERRUPTED, SUCCEEDED

log = logging.getLogger('jobz.worker')
SHELL = '/bin/sh'
OUTPUT_EVERY = 0.5    # seconds between OUTPUT messages of a running command that writes


@dataclass
class Running:
    call: dict
    pid: int
    output: int                     # read end of the pipe the command writes stdout and stderr to
    started: float                  # time.time(), shown to people
    deadline: float | None          # monotonic
    kill_at: float | None = None    # monotonic; set once TERM was sent
    why_killed: str | None = None
    # Output so far, as text: the last --output-max characters, and how many came in all.
    text: str = ''
    total: int = 0
    sent: int = 0                   # characters already sent to the broker while running (OUTPUT)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder('utf-8')('replace'))


def describe_exit(rc: int) -> tuple[int | None, str | None, str]:
    """(exit code, signal name, human reason) from a return code (negative: killed by that signal)."""
    if rc >= 0:
        return rc, None, f'exit code {rc}'
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f'signal {-rc}'
    hint = ' (SIGKILL: out of memory, or killed by hand?)' if -rc == signal.SIGKILL else ''
    return None, name, f'killed by {name}{hint}'


class Worker:
    def __init__(self, agent: Agent, jobs: dict[str, Job], *, name: str, url: str,
                 concurrency: int, kill_grace: float = 5.0, output_tail: int = 4096,
                 output_max: int = 262144):
        self.agent = agent
        self.jobs = jobs
        self.name = name
        self.url = url
        self.concurrency = concurrency
        self.kill_grace = kill_grace
        self.output_tail = output_tail
        self.output_max = max(output_max, output_tail)
        self.output_due = 0.0
        self.running: dict[int, Running] = {}     # pidfd -> running job
        # Output pipe -> its job; None once the job was reported but something it left running
        # still holds the pipe: read to the end and dropped, so a straggler never gets SIGPIPE.
        self.pipes: dict[int, Running | None] = {}
        self.environ = dict(os.environ)           # read once: os.environ decodes on every access
        self.queue = deque(agent.queued())
        self.stop_requests = 0
        agent.running = lambda: len(self.running)
        # What this worker holds besides pool calls: the broker counts those itself.
        agent.busy = lambda: (sum(not r.call.get('pool') for r in self.running.values())
                              + sum(not c.get('pool') for c in self.queue))
        self.delayed: list[tuple[float, dict]] = []   # (monotonic due time, call) of retries
        for call, attempts in agent.interrupted():
            self.interrupted(call, attempts)

    def interrupted(self, call: dict, attempts: int) -> None:
        """A call that was running when this worker stopped: retry it if its job says so, else report it."""
        job = self.jobs.get(call.get('job'))
        # A pool call's retry is the broker's to give: to any worker of the topic (pool.py).
        retry = job.retry if job and not call.get('pool') else None
        if retry and attempts <= retry['count']:
            delay = retry['backoff'] * 2 ** (attempts - 1)
            log.warning('run %s was running when this worker stopped; retry %d of %d in %.0fs',
                        call['run_id'], attempts, retry['count'], delay, extra=about(call['run_id'], job.name))
            self.delayed.append((time.monotonic() + delay, call))
            return
        log.warning('run %s was running when this worker stopped; reporting it interrupted', call['run_id'],
                    extra=about(call['run_id'], call.get('job')))
        self.report_unrun(call, INTERRUPTED, 'the worker stopped while it ran'
                          + (f' (after {attempts} attempts)' if attempts > 1 else ''))

    def report_unrun(self, call: dict, state: str, reason: str) -> None:
        """Report a call that did not run to its end (interrupted, expired); on_failure still fires."""
        job = self.jobs.get(call.get('job'))
        urls = self.handler_urls(job, call, state, None) if job else []
        self.agent.finish(str(call['run_id']), {'state': state, 'reason': reason, 'finished': time.time()}, urls)

    def request_stop(self, signum=None, frame=None) -> None:
        # Only set a flag: the loop does the work, outside the signal handler.
        self.stop_requests += 1

    def run(self) -> None:
        cold_done = False
        while not (self.stop_requests and not self.running):
            calls, ready = self.agent.poll(self._timeout_ms(), [*self.running, *self.pipes])
            if not self.stop_requests:
                self.queue.extend(calls)    # when stopping, they stay queued on disk for next start
            for fd in ready:
                if fd in self.pipes:
                    self.read_output(fd)
            for fd in ready:
                if fd in self.running:
                    self.reap(fd)
            if self.stop_requests >= 2 and not cold_done:
                log.warning('second stop request: killing %d running job(s)', len(self.running))
                for r in self.running.values():
                    r.why_killed = 'worker shut down'
                    self._killpg(r, signal.SIGKILL)
                cold_done = True
            ready_to_run = [] if self.stop_requests else self.start_queued()
            self.agent.commit()    # one fsync for the turn: calls taken, started, finished
            for call, job, command, env in ready_to_run:
                self.spawn(call, job, command, env)
            self.tick(time.monotonic())    # clock work after the spawns, which wait for nothing else
            self.agent.commit()    # what the clock work or a failed spawn recorded
        for fd in self.pipes:
            os.close(fd)
        self.agent.flush()

    def _timeout_ms(self) -> int:
        return 100 if not self.stop_requests else 50

    def tick(self, now: float) -> None:
        for r in list(self.running.values()):
            if r.deadline is not None and now >= r.deadline and r.kill_at is None:
                log.warning('run %s: timeout; sending TERM to its process group', r.call['run_id'],
                            extra=about(r.call['run_id'], r.call['job']))
                r.why_killed = 'timeout'
                self._killpg(r, signal.SIGTERM)
                r.kill_at = now + self.kill_grace
            elif r.kill_at is not None and now >= r.kill_at:
                self._killpg(r, signal.SIGKILL)
                r.kill_at = float('inf')
        if now >= self.output_due:
            self.output_due = now + OUTPUT_EVERY
            self.send_output()
        self.agent.tick(now)

    def send_output(self) -> None:
        """Send what running commands wrote since last time, for people following a run live."""
        for r in self.running.values():
            if r.total > r.sent:
                start = max(r.sent, r.total - len(r.text))    # what was dropped meanwhile is gone
                self.agent.send_output(str(r.call['run_id']), start, r.text[start - r.total:])
                r.sent = r.total

    def _killpg(self, r: Running, sig: int) -> None:
        try:
            os.killpg(r.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass    # already gone

    # -- starting ----------------------------------------------------------
    def start_queued(self) -> list[tuple]:
        """Take queued calls up to the concurrency, mark them started; the caller commits, then spawns."""
        now = time.monotonic()
        if self.delayed:
            self.queue.extend(c for due, c in self.delayed if due <= now)
            self.delayed = [(due, c) for due, c in self.delayed if due > now]
        batch = []
        while self.queue and len(self.running) + len(batch) < self.concurrency:
            call = self.queue.popleft()
            expires = call.get('expires_at')
            if isinstance(expires, (int, float)) and time.time() > expires:
                # Info, not a warning: the job asked for it (`expires:`), and its result says so.
                log.info('run %s expired before it could start; not running it', call.get('run_id'),
                            extra=about(call.get('run_id'), call.get('job')))
                self.report_unrun(call, EXPIRED, 'expired before it could start '
                                  f'({time.time() - expires:.0f}s past its deadline)')
                continue
            try:
                job, command, env = self.prepare(call)
            except Exception as e:    # whatever a call holds, it never takes the worker down
                log.error('run %s: refused: %s', call.get('run_id'), e, extra=about(call.get('run_id'), call.get('job')))
                self.agent.finish(str(call['run_id']), {'state': FAILED, 'reason': f'refused: {e}'})
                continue
            batch.append((call, job, command, env))
        if batch:
            self.agent.mark_started([c for c, _, _, _ in batch])
        return batch

    def prepare(self, call: dict) -> tuple[Job, str, dict]:
        """Check a call against this worker's own job files; raise ValueError with the reason."""
        job = self.jobs.get(call.get('job'))
        if job is None or not job.command:
            raise ValueError(f"no command for job {call.get('job')!r} on worker {self.name}")
        check_call(call, job)    # a broker must never be able to make us run new shell words
        params = call['params']
        values = dict(params, job_name=job.name, run_id=call['run_id'])
        command = render_command(job.command, values)
        env = dict(self.environ, JOBZ_RUN_ID=values['run_id'], JOBZ_JOB=job.name,
                   JOBZ_WORKER=self.name, JOBZ_URL=self.url)
        env.update({f'JOBZ_PARAM_{k.upper()}': v for k, v in params.items()})
        return job, command, env

    def spawn(self, call: dict, job: Job, command: str, env: dict) -> None:
        run_id = str(call['run_id'])
        try:
            # A pipe, not a file: a command with no output costs no file system work at all (a
            # file's create and unlink would ride along with every fsync of our database).
            output, out = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(output, False)    # our end only: the command writes as usual
            started = time.time()    # the command's start, as reported: right before the spawn
            try:
                # posix_spawn (vfork underneath) costs half of subprocess.Popen's time in this process.
                # A session of its own, so a timeout can kill the whole process group; SIGPIPE back to
                # its default, which Python ignores; our other descriptors are all close-on-exec.
                pid = os.posix_spawn(SHELL, [SHELL, '-c', command], env, setsid=True,
                                     setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                                     file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                                   (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)])
            except OSError:
                os.close(output)
                raise
            finally:
                os.close(out)
            pidfd = os.pidfd_open(pid)
        except (OSError, ValueError) as e:
            log.error('run %s: cannot start: %s', run_id, e, extra=about(run_id, job.name))
            self.agent.finish(run_id, {'state': FAILED, 'reason': f'cannot start: {e}'})
            return
        deadline = time.monotonic() + job.timeout if job.timeout else None
        self.running[pidfd] = self.pipes[output] = Running(call, pid, output, started, deadline)
        self.agent.started(run_id, started)
        log.debug('run %s: started %s (pid %d)', run_id, job.name, pid, extra=about(run_id, job.name))

    # -- finishing ---------------------------------------------------------
    def reap(self, pidfd: int) -> None:
        r = self.running.pop(pidfd)
        _, status = os.waitpid(r.pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        os.close(pidfd)
        if self.pipes.get(r.output) is r:    # else it reached its end already (and was closed)
            self.read_output(r.output, drain=True)
        if self.pipes.get(r.output) is r:
            self.pipes[r.output] = None    # still held open by something the command left running
        if r.why_killed:
            self._killpg(r, signal.SIGKILL)   # sweep what is left of the group
        r.text += r.decoder.decode(b'', final=True)
        finished = time.time()
        code, sig, reason = describe_exit(rc)
        if r.why_killed:
            reason = f'{r.why_killed}; {reason}'
        state = SUCCEEDED if rc == 0 and not r.why_killed else FAILED
        result = {'state': state, 'rc': code, 'signal': sig, 'reason': reason,
                  'started': r.started, 'finished': finished,
                  'output_tail': r.text[max(0, len(r.text) - self.output_tail):]}
        if r.text:    # the whole output (bounded) goes with the result, acknowledged like it
            result.update(output=r.text, output_dropped=r.total - len(r.text))
        job = self.jobs[r.call['job']]
        urls = self.handler_urls(job, r.call, state, rc)
        self.agent.finish(str(r.call['run_id']), result, urls)
        log.info('run %s: %s %s (%s, %.3fs)', r.call['run_id'], job.name, state, reason,
                 finished - r.started, extra=about(r.call['run_id'], job.name))

    def read_output(self, fd: int, drain: bool = False) -> None:
        """Read what a command wrote (all there is, when it has ended); keep the tail, close at the end."""
        r = self.pipes[fd]
        for _ in range(64 if drain else 1):    # bounded: a straggler may write without pause
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not data:
                del self.pipes[fd]
                os.close(fd)
                return
            if r is not None:
                text = r.decoder.decode(data)
                r.total += len(text)
                r.text += text
                if len(r.text) > self.output_max:
                    r.text = r.text[len(r.text) - self.output_max:]

    def handler_urls(self, job: Job, call: dict, state: str, rc: int | None) -> list[str]:
        run_id = str(call['run_id'])
        try:
            url = handler_url(job, state, run_id, call.get('params') or {}, self.name, rc, self.url,
                              handler_key(run_id, self.name, state))
        except KeyError as e:
            log.error('run %s: handler URL needs %r, which the call does not carry', run_id, e.args[0],
                      extra=about(run_id, job.name))
            return []
        return [url] if url else []
