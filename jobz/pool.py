"""Work pools: each call of a `run_on: one` job is started by exactly one worker of its topic.

The steps, each in the broker's burst transaction (nothing is sent before its commit):
1. A trigger journals the run and puts its call in the pool table, queued (no worker). It gets
   no place in its topic's sequence (seq < 0), so no worker ever catches up on it by SYNC.
2. GIVE: the call, oldest first per topic, goes to the live worker of the topic with the most
   room (its --concurrency, less the other calls it holds, less the pool calls it has).
   Journaled, then sent: ASSIGN.
3. The worker records the call (state `taking`, durably) and asks for it: TAKE.
4. TAKE is granted only if the call is still that worker's (or queued again): journaled as
   taken, then GO. Otherwise REFUSE, and the worker drops it. Only after GO does the worker
   mark it started and run it, as any call.
5. Its RESULT ends it (the pool row goes). An `interrupted` result (the worker stopped while it
   ran it) queues it again when its job's `retry:` allows another attempt, to be given out to
   any worker of the topic once the backoff has passed.
A call given but not taken goes back to the queue when its worker is no longer alive, or
reconnects (it may never have seen the ASSIGN).

Why the guarantees hold at every crash point:
- Never started twice: a worker starts a pool call only after GO, and GO follows a journaled
  TAKE that named that worker; the journal never names two takers (the update is conditional on
  `NOT taken`), and a call once taken is never given out again - unless that very worker
  reported it interrupted and the job asked for a retry. A worker stopped with an ASSIGN (or
  paused, SIGSTOP) that wakes after the call went elsewhere asks with TAKE and is refused.
- Never lost: until its RESULT, the call stays in the pool table, committed before the trigger
  was answered. The broker crashing after GIVE: given calls of a worker that reconnects, or is
  gone, are queued again. After TAKE journaled but before GO went out: the worker still has the
  call as `taking`, resends TAKE, and gets GO again (the call is still its). The worker crashing
  after TAKE: it finds the call `taking` (TAKE again) or started (it reports it interrupted, as
  for any call), so the run ends, or runs again under `retry:`.
- Survives a broker SIGKILL: every step is in the journal before anything is sent.
"""
import logging
import time

from . import protocol as p
from .burst import Burst
from .jobfile import Job
from .journal import Journal
from .logs import about

log = logging.getLogger('jobz.broker')


class Pool:
    def __init__(self, journal: Journal, jobs: dict[str, Job], registry):
        self.journal = journal
        self.jobs = jobs
        self.registry = registry        # back.Registry: who is alive, on which topics, with how many slots
        self.given: dict[str, int] = {}     # worker -> how many calls it was given in all (spreads ties)
        self.busy = True                # the table may hold calls: look at it (until a look finds none)

    def room(self, held: dict[str, int]) -> dict[str, int]:
        """Free slots of each live worker that takes pool calls: its slots, less its other calls and the pool calls it holds."""
        now, out = time.monotonic(), {}
        for name, peer in self.registry.peers.items():
            if peer.slots > 0 and peer.ident and self.registry.alive(peer, now):
                out[name] = peer.slots - peer.busy - held.get(name, 0)
        return out

    def of_topic(self, topic: str, room: dict[str, int]) -> dict[str, int]:
        return {w: n for w, n in room.items() if topic in self.registry.peers[w].topics}

    def add(self, run_id: str, topic: str, burst: Burst) -> str | None:
        """A new pool call (already journaled, queued): give it out now if it is first in line."""
        self.busy = True
        if self.journal.pool_queue(topic, 1) != [run_id]:
            return None    # older calls of the topic wait: they go first
        worker = self.best(self.of_topic(topic, self.room(self.journal.pool_held())))
        if worker:
            self.give(run_id, worker, burst)
        return worker

    def best(self, room: dict[str, int]) -> str | None:
        fits = [w for w, n in room.items() if n > 0]
        return max(fits, key=lambda w: (room[w], -self.given.get(w, 0)), default=None)

    def give(self, run_id: str, worker: str, burst: Burst) -> None:
        self.journal.pool_give(run_id, worker)
        self.given[worker] = self.given.get(worker, 0) + 1
        burst.sends.append([self.registry.peers[worker].ident, p.ASSIGN, p.pack(self.journal.call(run_id))])

    def assign(self, burst: Burst) -> None:
        """Queue again what dead workers were given, then give out queued calls to workers with room."""
        if not self.busy:
            return
        held = self.journal.pool_held()
        for worker in [w for w in held if not self.alive(w)]:
            self.requeue(worker)
            held.pop(worker)
        if not held and not self.journal.pool_queued():
            self.busy = False    # nothing in the pool: no more looking until a call comes
            return
        room = {w: n for w, n in self.room(held).items() if n > 0}
        # Only the topics of workers with room are looked at; the oldest queue goes first.
        oldest = self.journal.pool_oldest({t for w in room for t in self.registry.peers[w].topics})
        for topic in sorted(oldest, key=oldest.get):
            mine = self.of_topic(topic, room)
            free = sum(n for n in mine.values() if n > 0)
            for run_id in self.journal.pool_queue(topic, free) if free else ():
                worker = self.best(mine)
                self.give(run_id, worker, burst)
                mine[worker] -= 1
                room[worker] -= 1

    def alive(self, worker: str) -> bool:
        peer = self.registry.peers.get(worker)
        return peer is not None and self.registry.alive(peer)

    def requeue(self, worker: str) -> None:
        """The calls given to `worker` that it has not taken go back to the queue, in their old places."""
        untaken = self.journal.pool_untaken(worker)
        for run_id in untaken:
            self.journal.pool_give(run_id, None)
        if untaken:
            self.busy = True
            log.info('%d pool call(s) given to %s, which did not take them, are queued again', len(untaken), worker)

    def take(self, worker: str, ident: bytes, run_id: str, burst: Burst) -> None:
        """TAKE: GO if the call is this worker's (now, or already), else REFUSE."""
        row = self.journal.pool_row(run_id)
        if self.journal.pool_take(run_id, worker) or (row and row['taken'] and row['worker'] == worker):
            burst.sends.append([ident, p.GO, p.pack({'run_id': run_id})])
            burst.touched.add(run_id)
        else:
            log.info('pool call %s is not for %s (any more): refused', run_id, worker)
            burst.sends.append([ident, p.REFUSE, p.pack({'run_id': run_id})])

    def reported(self, worker: str, run_id: str, state: str) -> None:
        """A worker's result for a pool call ends it, or (interrupted, with retry: left) queues it again."""
        row = self.journal.pool_row(run_id)
        if row is None:
            return
        job = self.jobs.get(self.journal.run_row(run_id)['job'])
        if state == p.INTERRUPTED and job and job.retry and row['attempt'] <= job.retry['count']:
            delay = job.retry['backoff'] * 2 ** (row['attempt'] - 1)    # as a worker retries its own calls
            self.journal.pool_again(run_id, worker, delay)
            self.journal.add_note(run_id, worker, f"attempt {row['attempt']} on {worker} was interrupted; queued "
                                                  f"again in {delay:g}s (retry {row['attempt']} of {job.retry['count']})")
            self.busy = True
            log.warning('run %s: interrupted on %s; queued again for any worker of %s in %gs', run_id, worker,
                        row['topic'], delay, extra=about(run_id, job.name))
        else:
            self.journal.pool_done(run_id)
