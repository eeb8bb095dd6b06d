"""The worker side of the broker: the registry of workers and semaphores, and what they tell it.

Workers connect out to the broker's ROUTER and send SYNC (register, heartbeat, catch up),
STARTED, OUTPUT, RESULT and BYE. Each is handled inside the broker's burst transaction;
answers and acknowledgements wait in the burst until its commit (see broker.py).
"""
import logging
import time
from dataclasses import dataclass

from . import protocol as p
from .burst import Burst
from .curve import Enrolled
from .jobfile import NAME_RE, Job
from .journal import Journal
from .logs import about
from .pool import Pool

log = logging.getLogger('jobz.broker')

SYNC_BATCH = 500        # calls per CALLS answer
SAVE_EVERY = 10.0       # seconds between registry writes of a worker whose topics did not change


@dataclass
class Peer:
    """A worker or semaphore as the broker knows it."""
    name: str
    topics: set[str]
    cursors: dict[str, int]             # topic -> the last sequence number it had taken at its last SYNC
    seen: float                         # time.monotonic() it was last heard (long ago: it said goodbye)
    running: int = 0                    # commands it said it runs
    slots: int = 0                      # commands it runs at once (0: it takes no pool calls)
    busy: int = 0                       # the calls it holds that are not pool calls (queued or running)
    ident: bytes | None = None          # routing id of the connection its last SYNC came on
    saved: float = float('-inf')        # time.monotonic() its registry row was last written

    def last_seen(self) -> float:
        """When it was last heard, as a wall-clock time (for people and for the journal)."""
        return time.time() - (time.monotonic() - self.seen)


class Registry:
    """The workers and semaphores the broker knows, kept in the journal across restarts."""

    def __init__(self, journal: Journal, timeout: float):
        self.journal = journal
        self.timeout = timeout          # seconds without a heartbeat before a peer is not expected
        self.peers: dict[str, Peer] = {}
        now, wall = time.monotonic(), time.time()
        for name, topics, cursors, last_seen in journal.load_workers():
            # Back from the journal: a worker seen just before a restart is still expected.
            self.peers[name] = Peer(name, set(topics), cursors, now - (wall - last_seen), saved=now)

    def alive(self, peer: Peer, now: float | None = None) -> bool:
        return (now or time.monotonic()) - peer.seen <= self.timeout

    def live(self) -> list[str]:
        now = time.monotonic()
        return [n for n, peer in self.peers.items() if self.alive(peer, now)]

    def expected(self, topic: str) -> list[str]:
        """Workers a new run on `topic` waits for: those alive and subscribed now."""
        now = time.monotonic()
        return sorted(n for n, peer in self.peers.items() if topic in peer.topics and self.alive(peer, now))

    def save(self, peer: Peer) -> None:
        self.journal.save_worker(peer.name, peer.topics, peer.cursors, peer.last_seen())
        peer.saved = time.monotonic()

    def forget(self, names) -> None:
        for name in names:
            self.journal.forget_worker(name)
            del self.peers[name]


def count(msg: dict, key: str) -> int:
    """A small count a worker reports (0 when it is missing or makes no sense)."""
    value = msg.get(key)
    return value if p.is_int(value) and 0 <= value < 1 << 20 else 0


class Back:
    def __init__(self, journal: Journal, jobs: dict[str, Job], registry: Registry, enrolled: Enrolled | None,
                 pool: Pool):
        self.journal = journal
        self.jobs = jobs
        self.registry = registry
        self.enrolled = enrolled
        self.pool = pool

    def on_router(self, frames: list[bytes], user: str | None, out: Burst) -> None:
        """One message from a worker (its frames, and the name ZAP gave its key, under CURVE)."""
        if len(frames) != 3:
            log.warning('dropping a worker message with %d frames', len(frames))
            return
        ident, verb, payload = frames
        worker = ident.split(b'/', 1)[0].decode('utf-8', 'replace')    # NAME/RANDOM: the agent's routing id
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
            with self.journal.savepoint():    # a message that fails half-way leaves nothing behind
                self.dispatch(worker, ident, verb, msg, out)
        except (KeyError, TypeError, ValueError) as e:
            log.warning('dropping a bad %r from %s: %s', verb[:32], worker, str(e)[:200])

    def dispatch(self, worker: str, ident: bytes, verb: bytes, msg: dict, out: Burst) -> None:
        if verb == p.SYNC:
            out.replies.append([ident, p.CALLS, p.pack(self.sync(worker, ident, msg))])
        elif verb == p.STARTED:
            run_id, started = p.text(msg.get('run_id'), 200), p.number(msg.get('started'))
            if run_id and started and self.may_report(worker, run_id) and \
                    self.journal.set_started(run_id, worker, started):
                out.touched.add(run_id)
        elif verb == p.RESULT:
            self.result(worker, ident, msg, out)
        elif verb == p.OUTPUT:    # output of a running command, so far: for people watching it
            run_id, offset = p.text(msg.get('run_id'), 200), msg.get('offset')
            if run_id and p.is_int(offset) and offset >= 0 and isinstance(msg.get('text'), str) \
                    and self.may_report(worker, run_id):
                self.journal.add_output(run_id, worker, offset, msg['text'])
        elif verb == p.TAKE:
            run_id = p.text(msg.get('run_id'), 200)
            if run_id and self.may_report(worker, run_id):
                self.pool.take(worker, ident, run_id, out)
        elif verb == p.BYE:
            peer = self.registry.peers.get(worker)
            if peer:    # remembered (its cursor still guards pruning), no longer expected
                peer.seen = time.monotonic() - self.registry.timeout - 1
                self.registry.save(peer)
            log.info('worker %s left', worker)
        else:
            log.warning('dropping unknown verb %r from %s', verb[:32], worker)

    def result(self, worker: str, ident: bytes, msg: dict, out: Burst) -> None:
        run_id = p.text(msg.get('run_id'), 200)
        if not run_id:
            raise ValueError('no run_id')
        if self.may_report(worker, run_id) and self.journal.set_result(run_id, worker, msg):
            out.touched.add(run_id)
            self.pool.reported(worker, run_id, msg['state'])
            if isinstance(msg.get('output'), str):    # absent when the command wrote nothing
                dropped = msg.get('output_dropped')
                self.journal.add_output(run_id, worker, dropped if p.is_int(dropped) and dropped > 0 else 0,
                                        msg['output'], complete=True)
            ended = self.journal.ended(run_id)
            if ended:
                out.ended.append(ended)
            # Successes are in the journal (and the worker's log); failures deserve a line here.
            out.logs.append((logging.DEBUG if msg['state'] == p.SUCCEEDED else logging.INFO, about(run_id),
                             'run %s: %s on %s', run_id, msg['state'], worker))
        out.acks.setdefault(ident, []).append(run_id)

    def may_report(self, worker: str, run_id: str) -> bool:
        """Only a worker the run waits for, or one subscribed to its topic (catching up), reports on it."""
        topic = self.journal.topic_of(run_id)
        if topic is None:
            return False
        peer = self.registry.peers.get(worker)
        if (peer and topic in peer.topics) or worker in self.journal.workers_of(run_id):
            return True
        log.warning('refused a result for run %s (topic %s) from %s, which is not expected for it',
                    run_id, topic, worker)
        return False

    def sync(self, worker: str, ident: bytes, msg: dict) -> dict:
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
        heads = self.journal.heads
        for topic in topics:
            head = heads.get(topic, 0)
            cursor = cursors.get(topic)
            if not p.is_int(cursor) or not 0 <= cursor <= head:
                new_cursors[topic] = head    # a new subscription starts now
                continue
            if cursor == head or len(calls) >= SYNC_BATCH:    # up to date; or one bounded answer (`more`)
                new_cursors[topic] = cursor
                continue
            oldest = self.journal.oldest_seq(topic)
            if oldest is not None and cursor < oldest - 1:
                log.warning('worker %s is behind the journal on %s: calls %d to %d were pruned',
                            worker, topic, cursor + 1, oldest - 1)
            batch = self.journal.calls_after(topic, cursor, SYNC_BATCH - len(calls))
            calls += batch
            new_cursors[topic] = batch[-1]['seq'] if batch else cursor
        more = any(seq < heads.get(t, 0) for t, seq in new_cursors.items())
        calls.sort(key=lambda c: c['created'])    # oldest first across topics: deadlines come first
        now = time.monotonic()
        old = self.registry.peers.get(worker)
        if old is None or not self.registry.alive(old, now):
            log.info('worker %s joined for topics %s', worker, ', '.join(topics))
        peer = self.registry.peers[worker] = Peer(
            worker, set(topics), new_cursors, now, count(msg, 'running'), count(msg, 'slots'), count(msg, 'busy'),
            ident, old.saved if old else float('-inf'))
        if old is not None and old.ident != ident:
            self.pool.requeue(worker)    # a new connection: what the old one was given may be lost
        if old is None or old.topics != peer.topics or now - peer.saved >= SAVE_EVERY or more:
            self.registry.save(peer)
        return {'calls': calls, 'cursors': new_cursors, 'more': more}

    def agent_topics(self, name: str) -> set | None:
        """The topics of the worker or semaphore `name` (all: enrolled and not seen yet), or None: no agent."""
        if name in self.registry.peers:
            return self.registry.peers[name].topics
        allowed = self.enrolled.allowed_topics(name) if self.enrolled else False
        if allowed is False:
            return None
        return allowed if allowed is not None else {j.topic for j in self.jobs.values()}
