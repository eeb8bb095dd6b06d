"""The broker link of a worker or semaphore, with its own durable state (SQLite).

The agent keeps, per topic, a cursor (the last sequence number it has taken),
the calls it has taken (queued, started, done) and an outbox of results until
the broker acknowledges them; its handler URLs wait in the same database until
they are called (handlers.py).

Writes go into one transaction per loop turn: the owner calls commit() once a
turn, which makes everything durable with one fsync and only then sends the
messages that depended on it (STARTED, RESULT). Under load a turn carries many
calls, so the cost of durability is shared instead of paid per call.
"""
import json
import logging
import random
import secrets
import sqlite3
import time

import zmq

from . import protocol as p
from .curve import make_client
from .files import private_file
from .handlers import HandlerCalls

log = logging.getLogger('jobz.agent')

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (topic TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    run_id   TEXT PRIMARY KEY,
    call     TEXT NOT NULL,
    state    TEXT NOT NULL,        -- queued, started, done
    at       REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS calls_state ON calls (state, at);
CREATE TABLE IF NOT EXISTS outbox (run_id TEXT PRIMARY KEY, result TEXT NOT NULL);
"""
ANNOUNCE_MS = 10        # a job still running this long after its start is announced (STARTED)
RESEND_AFTER = 3.0      # seconds without an ACK before a result is sent again
KEEP_DONE = 7 * 86400.0 # how long the ids of done calls are kept to recognise a replay


def broker_sockets(ctx: zmq.Context, name: str, topics: list[str], pub: str, router: str, rcvhwm: int,
                   curve: tuple | None) -> tuple[zmq.Socket, zmq.Socket]:
    """A SUB for live calls and a DEALER for the rest, connected to the broker.

    `pub` and `router` may each name several front ends (comma-separated): only the active broker
    binds its ports, so the sockets talk to whichever is active."""
    sub = ctx.socket(zmq.SUB)
    sub.rcvhwm = rcvhwm       # past it live calls drop; the gap triggers a SYNC
    dealer = ctx.socket(zmq.DEALER)
    # NAME/RANDOM: the broker reads our name from it, and under CURVE checks it against our key.
    # The random part, sent only inside the encrypted handshake, keeps another peer from taking
    # over our connection at the broker by claiming the same routing id.
    dealer.routing_id = name.encode() + b'/' + secrets.token_hex(16).encode()
    dealer.sndhwm = 10000
    # Messages only to a connection that is up: never queued for a front end that is standing by
    # (a message that cannot go now is sent again: results until acknowledged, SYNC every second).
    dealer.immediate = True
    for sock in (sub, dealer):
        sock.linger = 0
        sock.maxmsgsize = 16 << 20      # a CALLS answer is kept near 1 MB by the broker
        # ZMTP heartbeats: a hung broker or a silent network drop closes the connection within
        # seconds, and ZeroMQ reconnects. A random base interval keeps many workers from
        # knocking on a restarted broker all at the same moment.
        sock.heartbeat_ivl, sock.heartbeat_timeout, sock.heartbeat_ttl = 1000, 3000, 6000
        sock.reconnect_ivl = random.randint(100, 400)
        sock.reconnect_ivl_max = 5000
        if curve:
            make_client(sock, *curve)    # pins the broker's public key
    for topic in topics:
        sub.subscribe(p.topic_frame(topic))
    for addr in pub.split(','):
        sub.connect(addr.strip())
    for addr in router.split(','):
        dealer.connect(addr.strip())
    return sub, dealer


class Agent:
    def __init__(self, ctx: zmq.Context, name: str, topics: list[str], *, pub: str, router: str,
                 db_path: str, sync_interval: float = 1.0, running=lambda: 0, rcvhwm: int = 1000, slots: int = 0,
                 curve_secret: str | None = None, broker_key: str | None = None, tls=None, fronts=()):
        self.name = name
        self.topics = sorted(set(topics))
        self.sync_interval = sync_interval
        self.running = running          # how many jobs the owner runs now (for /workers)
        self.slots = slots              # commands the owner runs at once: room for pool calls (0: none)
        self.busy = lambda: 0           # the owner's calls that are not pool calls, queued or running
        self.asked_at: dict[str, float] = {}   # run_id -> when TAKE was last sent for a pool call
        self.ctx, self.addrs, self.rcvhwm = ctx, (pub, router), rcvhwm
        self.curve = (curve_secret, broker_key) if curve_secret else None
        self.sub = self.dealer = None
        self._connect()
        self.heard = time.monotonic()   # when the broker last said anything
        self.silent = False
        self.reconnect_due = float('inf')   # while silent: when to drop and rebuild the sockets
        self.prune_due = self.outbox_due = 0.0    # monotonic times of clock work
        self.db = sqlite3.connect(private_file(db_path), isolation_level=None)
        self.db.execute('PRAGMA journal_mode=WAL')
        self.db.execute('PRAGMA synchronous=FULL')
        self.db.executescript(SCHEMA)
        self.cursors = dict(self.db.execute('SELECT topic, seq FROM cursors'))
        self.sync_due = 0.0             # monotonic time of the next SYNC
        self.sync_sent = None           # monotonic time the SYNC in flight was sent
        self.sent_at: dict[str, float] = {}   # run_id -> when its result was last sent
        self.outgoing: list[tuple[bytes, dict]] = []   # messages waiting for this turn's commit
        # STARTED goes out one turn after the start, and only if the job still runs then: a short
        # job's RESULT (which carries its start time) says it all, with one message less.
        self.starting: dict[str, float] = {}     # run_id -> start time, marked in this turn
        self.announce: dict[str, float] = {}     # run_id -> start time, to announce at this commit
        self.handlers = HandlerCalls(self.db, self.write, tls, fronts)    # on_success/on_failure URLs to call

    def _connect(self) -> None:
        """(Re)build the SUB and DEALER sockets and connect them to the broker."""
        for sock in (self.sub, self.dealer):
            if sock is not None:
                sock.close(0)
        self.sub, self.dealer = broker_sockets(self.ctx, self.name, self.topics, *self.addrs, self.rcvhwm, self.curve)

    # -- receiving calls --------------------------------------------------
    def poll(self, timeout_ms: int, fds=()) -> tuple[list[dict], list[int]]:
        """Wait for input; return (new calls, the given fds that are readable)."""
        self.announce.update(self.starting)
        self.starting = {}
        if self.announce:
            timeout_ms = min(timeout_ms, ANNOUNCE_MS)
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self.handlers.wake_r, zmq.POLLIN)
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        events = dict(poller.poll(timeout_ms))
        calls = []
        if self.sub in events:
            calls += self._take_live()
        if self.dealer in events:
            calls += self._take_replies()
        if self.handlers.wake_r in events:
            self.handlers.woken()
        return calls, [fd for fd in fds if fd in events]

    def _take_live(self) -> list[dict]:
        payloads = []
        for _ in range(1000):
            try:
                payloads.append(self.sub.recv_multipart(zmq.NOBLOCK)[-1])
            except zmq.Again:
                break
        return self._live(payloads)

    def _live(self, payloads: list[bytes]) -> list[dict]:
        """Take live calls (from PUB, or sent directly): advance cursors, note gaps, store."""
        calls, gap = [], False
        for payload in payloads:
            try:
                call = p.unpack(payload)
            except ValueError:
                call = None
            if not p.is_call(call, self.topics) or call['seq'] < 0:    # pool calls come by ASSIGN only
                log.warning('dropping a live call that is not well-formed')
                continue
            seq, topic = call['seq'], call['topic']
            cursor = self.cursors.get(topic)
            if cursor is None:
                gap = True    # not synced yet: SYNC decides where this topic starts
            elif seq == cursor + 1:
                self.cursors[topic] = seq
            elif seq > cursor + 1:
                gap = True    # PUB dropped something; SYNC fetches it from the journal
            calls.append(call)
        if gap:
            self.sync_due = 0.0
        return self._store(calls)

    def _take_replies(self) -> list[dict]:
        calls, acked = [], []
        for _ in range(1000):
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 2:
                log.warning('dropping a broker message with %d frames', len(frames))
                continue
            verb, payload = frames
            self.heard = time.monotonic()
            try:
                msg = p.unpack(payload)
                if verb == p.CALLS:
                    calls += self._on_calls(msg)
                elif verb == p.CALL:
                    calls += self._live([payload])
                elif verb == p.ACK:
                    ids = msg.get('run_ids') if isinstance(msg.get('run_ids'), list) else [msg.get('run_id')]
                    acked += [r for r in ids if isinstance(r, str)]
                elif verb == p.ASSIGN:
                    self._assigned(msg)
                elif verb in (p.GO, p.REFUSE):
                    run_id = msg.get('run_id')
                    if not isinstance(run_id, str):
                        raise ValueError('no run id')
                    if verb == p.GO:
                        calls += self._go(run_id)
                    else:
                        self._refused(run_id)
            except ValueError:
                log.warning('dropping a bad %r from the broker', verb[:32])
        if acked:
            self.write().executemany('DELETE FROM outbox WHERE run_id = ?', [(r,) for r in acked])
            for run_id in acked:
                self.sent_at.pop(run_id, None)
        return calls

    # -- pool calls: ASSIGN, then TAKE (recorded first), then GO or REFUSE (see pool.py) --------
    def _assigned(self, call) -> None:
        """A pool call given to us: record it as `taking` and ask for it (TAKE goes out after the commit)."""
        if not (p.is_call(call, self.topics) and call.get('pool') and call['seq'] < 0):
            log.warning('dropping an ASSIGN that is not a pool call of our topics')
            return
        db = self.write()
        db.execute("INSERT OR IGNORE INTO calls (run_id, call, state, at) VALUES (?, ?, 'taking', ?)",
                   (call['run_id'], json.dumps(call), time.time()))
        (state,) = db.execute('SELECT state FROM calls WHERE run_id = ?', (call['run_id'],)).fetchone()
        if state == 'taking':    # else we had it already (taken, run, done): never twice
            self.outgoing.append((p.TAKE, {'run_id': call['run_id']}))
            self.asked_at[call['run_id']] = time.monotonic()

    def _go(self, run_id) -> list[dict]:
        """The broker says the pool call is ours: it joins the calls to run."""
        self.asked_at.pop(run_id, None)
        row = self.db.execute("SELECT call FROM calls WHERE run_id = ? AND state = 'taking'", (run_id,)).fetchone()
        if row is None:
            return []    # a GO again (our TAKE was sent twice): we have it already
        self.write().execute("UPDATE calls SET state = 'queued' WHERE run_id = ?", (run_id,))
        return [json.loads(row[0])]

    def _refused(self, run_id) -> None:
        """The pool call went to another worker meanwhile: forget it."""
        self.asked_at.pop(run_id, None)
        self.write().execute("DELETE FROM calls WHERE run_id = ? AND state = 'taking'", (run_id,))

    def _on_calls(self, msg: dict) -> list[dict]:
        self.sync_sent = None
        given = msg.get('calls') if isinstance(msg.get('calls'), list) else []
        calls = [c for c in given if p.is_call(c, self.topics) and c['seq'] > 0]
        if len(calls) < len(given):
            log.warning('dropping %d calls that are not well-formed', len(given) - len(calls))
        cursors = msg.get('cursors') if isinstance(msg.get('cursors'), dict) else {}
        for topic, seq in cursors.items():
            if topic in self.topics and p.is_int(seq) and seq >= 0:
                self.cursors[topic] = seq    # the journal's word wins (re-fetched calls are ignored)
        self.sync_due = 0.0 if msg.get('more') else time.monotonic() + self.sync_interval
        return self._store(calls)

    def _store(self, calls: list[dict]) -> list[dict]:
        """Journal new calls as queued and save cursors (in this turn's transaction); return the new ones."""
        db, new, now = self.write(), [], time.time()
        for call in calls:
            cur = db.execute("INSERT OR IGNORE INTO calls (run_id, call, state, at) VALUES (?, ?, 'queued', ?)",
                             (call['run_id'], json.dumps(call), now))
            if cur.rowcount:
                new.append(call)
        db.executemany('INSERT OR REPLACE INTO cursors VALUES (?, ?)', self.cursors.items())
        return new

    def queued(self) -> list[dict]:
        return [json.loads(c) for (c,) in self.db.execute(
            "SELECT call FROM calls WHERE state = 'queued' ORDER BY at")]

    def interrupted(self) -> list[tuple[dict, int]]:
        """(call, times started) of calls that were running when the owner stopped."""
        return [(json.loads(c), n) for c, n in self.db.execute(
            "SELECT call, attempts FROM calls WHERE state = 'started' ORDER BY at")]

    # -- the transaction of a loop turn -----------------------------------
    def write(self) -> sqlite3.Connection:
        """The database, inside this turn's transaction (begun on first use)."""
        if not self.db.in_transaction:
            self.db.execute('BEGIN')
        return self.db

    def commit(self) -> None:
        """Make this turn's writes durable (one fsync), then send the messages that waited for it."""
        if self.db.in_transaction:
            self.db.execute('COMMIT')
        out, self.outgoing = self.outgoing, []
        out += [(p.STARTED, {'run_id': r, 'started': t}) for r, t in self.announce.items()]
        self.announce = {}
        for verb, msg in out:
            self._send(verb, msg)
        # Handler URLs this turn recorded are durable now: out they go, before the owner spawns
        # anything (a fan-in's arrival waited a whole turn of spawns for this).
        self.handlers.start_due(time.monotonic())

    # -- reporting --------------------------------------------------------
    def mark_started(self, calls: list[dict]) -> None:
        """Record calls as started; the owner commits before it runs them."""
        now = time.time()
        self.write().executemany("UPDATE calls SET state = 'started', at = ?, attempts = attempts + 1 "
                                 "WHERE run_id = ?", [(now, c['run_id']) for c in calls])

    def started(self, run_id: str, at: float) -> None:
        """A command is running: say so (STARTED) next turn, unless its RESULT comes first."""
        self.starting[run_id] = at

    def finish(self, run_id: str, result: dict, urls: list[str] = ()) -> None:
        """Record a result and its handler URLs (in this turn's transaction); sent once the turn commits."""
        now = time.time()
        db = self.write()
        result = dict(result, run_id=run_id)
        self.starting.pop(run_id, None)
        self.announce.pop(run_id, None)
        db.execute("UPDATE calls SET state = 'done', at = ? WHERE run_id = ?", (now, run_id))
        db.execute('INSERT OR REPLACE INTO outbox VALUES (?, ?)', (run_id, json.dumps(result)))
        self.handlers.add(list(urls))
        self.outgoing.append((p.RESULT, result))
        self.sent_at[run_id] = time.monotonic()

    def send_output(self, run_id: str, offset: int, text: str) -> None:
        """Output of a running command, best effort: its result carries the whole of it anyway."""
        self._send(p.OUTPUT, {'run_id': run_id, 'offset': offset, 'text': text})

    def _send(self, verb: bytes, msg: dict) -> bool:
        """Send now if a broker is connected; False if not (the outbox and SYNC carry it later)."""
        try:
            self.dealer.send_multipart([verb, p.pack(msg)], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False    # never block the loop

    # -- clock work -------------------------------------------------------
    def tick(self, now: float) -> None:
        silence = now - self.heard
        if silence > max(3.0, 3 * self.sync_interval) and not self.silent:
            log.warning('broker silent for %.1fs; reconnecting, and catching up once it answers', silence)
            self.silent = True
            self.reconnect_due = now + random.uniform(5.0, 10.0)
        elif silence < self.sync_interval and self.silent:
            log.info('broker answering again')
            self.silent = False
            self.reconnect_due = float('inf')
        if now >= self.reconnect_due:
            # ZeroMQ gives up on a peer that refused our key once (say, before we were
            # enrolled); fresh sockets try again. Randomised, so workers don't come all at once.
            log.info('still no answer from the broker; rebuilding the connection')
            self._connect()
            self.sync_sent = None
            self.reconnect_due = now + random.uniform(10.0, 30.0)
        if self.sync_sent is not None and now - self.sync_sent > max(5.0, 3 * self.sync_interval):
            self.sync_sent = None    # the answer was lost (broker restart): ask again
        if self.sync_sent is None and now >= self.sync_due:
            if self._send(p.SYNC, {'topics': self.topics, 'cursors': self.cursors, 'running': self.running(),
                                   'slots': self.slots, 'busy': self.busy()}):
                self.sync_sent = now    # else no broker is connected yet: again at the next tick
        if now >= self.outbox_due:    # once a second is plenty: a result is resent after RESEND_AFTER
            self.outbox_due = now + 1.0
            for run_id, result in self.db.execute('SELECT run_id, result FROM outbox').fetchall():
                if now - self.sent_at.get(run_id, 0.0) >= RESEND_AFTER:
                    self._send(p.RESULT, json.loads(result))
                    self.sent_at[run_id] = now
            # Pool calls we asked for with no answer yet (a broker restart, a lost message): ask again.
            for (run_id,) in self.db.execute("SELECT run_id FROM calls WHERE state = 'taking'").fetchall():
                if now - self.asked_at.get(run_id, 0.0) >= RESEND_AFTER:
                    self._send(p.TAKE, {'run_id': run_id})
                    self.asked_at[run_id] = now
        self.handlers.tick(now)
        if now >= self.prune_due:
            self.prune_due = now + 3600.0
            self.prune()

    def prune(self) -> None:
        """Forget done calls after KEEP_DONE; the journal will not hand them out again by then."""
        self.write().execute("DELETE FROM calls WHERE state = 'done' AND at < ?", (time.time() - KEEP_DONE,))

    def flush(self, timeout: float = 3.0) -> None:
        """Before leaving: give unacknowledged results and handler calls a moment to go out."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and any(self.pending()):
            self.poll(50)
            self.tick(time.monotonic())
            self.commit()

    def pending(self) -> tuple[int, int]:
        """(results not yet acknowledged, handler calls not yet made)."""
        return (self.db.execute('SELECT count(*) FROM outbox').fetchone()[0],
                self.handlers.pending())

    def close(self) -> None:
        self.commit()
        self._send(p.BYE, {})
        self.handlers.close()
        self.sub.close()
        self.dealer.close(linger=500)
        self.db.close()
