"""The broker's journal: runs, per-worker results, output, notes, pool calls, the worker registry
and the lease; in SQLite (a file) or PostgreSQL (db.py holds what differs).

What the broker does with it:
- transactions: begin(), commit() (durable before anything is answered, published or
  acknowledged), rollback(), savepoint() around each message so one bad message is undone
  alone, changes() (whether a burst wrote anything), reachable() (PostgreSQL: connected, or
  connecting again);
- the lease, on a shared (PostgreSQL) journal: take_lease(), renew_lease(), release_lease(),
  lease_holder(); commit() proves it (lease.py);
- pool calls: pool_queue(), pool_waiting(), pool_oldest(), pool_queued(), pool_held(), pool_row(),
  pool_give(), pool_take(), pool_untaken(), pool_again(), pool_done();
- runs: add_run() (which gives the call its next sequence number on its topic, kept in
  `heads`), exists(), run_row(), run_by_key(), topic_of(), calls_after() and oldest_seq()
  (catch-up), children();
- results: set_started(), set_result() (the first final result wins), result_state(),
  workers_of(), running_on(), ended(); output: add_output(), output(); add_note();
- reading: status(), find() (light records of the runs of some jobs, by a parameter's value or
  a parent) with its forms summary(), recent(), open_runs(); count_runs(), size();
- the worker registry: load_workers(), save_worker(), forget_worker(); prune().
Nothing outside this module touches the database connection; db.py opens it (SQLite or PostgreSQL).
"""
import json
import time

from .db import open_db
from .protocol import FINAL_STATES, OPEN_STATES, PENDING, RUNNING, is_int, number, run_state, text

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id    TEXT PRIMARY KEY,
    job       TEXT NOT NULL,
    topic     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    params    TEXT NOT NULL,
    sanitized TEXT NOT NULL,
    key       TEXT UNIQUE,
    created   DOUBLE PRECISION NOT NULL,
    parent    TEXT,                 -- the run whose handler (or semaphore release) triggered this one
    expires   DOUBLE PRECISION,     -- wall-clock time after which workers report `expired`
    by        TEXT,                 -- who triggered it: client certificate name, or plain:ADDRESS
    UNIQUE (topic, seq)
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, created);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent);
CREATE TABLE IF NOT EXISTS results (
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    worker      TEXT NOT NULL,
    state       TEXT NOT NULL,
    rc          INTEGER,
    signal      TEXT,
    reason      TEXT,
    started     DOUBLE PRECISION,
    finished    DOUBLE PRECISION,
    output_tail TEXT,
    PRIMARY KEY (run_id, worker)
);
CREATE INDEX IF NOT EXISTS results_open ON results (worker) WHERE state IN {open_states};
CREATE TABLE IF NOT EXISTS outputs (        -- a run's output per worker, bounded: the start is dropped first
    run_id   TEXT NOT NULL REFERENCES runs (run_id),
    worker   TEXT NOT NULL,
    text     TEXT NOT NULL,
    dropped  INTEGER NOT NULL,              -- characters dropped before `text`
    complete INTEGER NOT NULL,              -- 1 once the worker's result brought the whole output
    PRIMARY KEY (run_id, worker)
);
CREATE TABLE IF NOT EXISTS notes (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    worker TEXT,
    at     DOUBLE PRECISION NOT NULL,
    note   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_run ON notes (run_id);
CREATE TABLE IF NOT EXISTS pool (           -- calls of run_on: one jobs until their worker reports on them
    run_id  TEXT PRIMARY KEY REFERENCES runs (run_id),
    topic   TEXT NOT NULL,
    worker  TEXT,                           -- the worker it is given to; NULL: queued, waiting for room
    taken   INTEGER NOT NULL DEFAULT 0,     -- 1 once that worker has it (TAKE journaled): it may have started
    since   DOUBLE PRECISION NOT NULL,      -- when it joined the queue (first in, first out per topic)
    attempt INTEGER NOT NULL DEFAULT 1,     -- the how-manieth time it is given out (retry: after an interrupted one)
    due     DOUBLE PRECISION                -- a retry waits for its backoff until then (wall clock); NULL: now
);
CREATE INDEX IF NOT EXISTS pool_queue ON pool (topic, since) WHERE worker IS NULL;
CREATE INDEX IF NOT EXISTS pool_worker ON pool (worker) WHERE worker IS NOT NULL;
CREATE TABLE IF NOT EXISTS workers (        -- the registry, so a restarted broker knows who to expect
    name      TEXT PRIMARY KEY,
    topics    TEXT NOT NULL,
    cursors   TEXT NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS lease (          -- which broker is active, when several share the journal (lease.py)
    name    TEXT PRIMARY KEY,
    holder  TEXT,                           -- the active broker (host/pid/random), or NULL
    url     TEXT,                           -- the URL of its front end, for clients that reach a standby
    epoch   BIGINT NOT NULL DEFAULT 0,      -- +1 at every take-over: a broker's commits carry the epoch it took
    expires DOUBLE PRECISION NOT NULL DEFAULT 0   -- the database's clock, in seconds since 1970
);
INSERT INTO lease (name) VALUES ('broker') ON CONFLICT DO NOTHING;
"""
# Any change to SCHEMA takes a new version (and a step in upgrade()): a journal at this version is
# not given the schema script again.
SCHEMA_VERSION = 3    # 1: before pool retries waited (no pool.due); 2: written down from here on; 3: lease


class LeaseLost(Exception):
    """Another broker took the lease: this one may not commit (nor publish what it did not commit)."""
MAX_OUTPUT = 1 << 20    # characters of output kept per run and worker
IS_OPEN = f'IN {OPEN_STATES!r}'    # SQL: a worker's state is still open (the names are plain words)
SET_RESULT = ("INSERT INTO results (run_id, worker, state, rc, signal, reason, started, finished, output_tail) "
              "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM runs WHERE run_id = ?) "
              "ON CONFLICT (run_id, worker) DO UPDATE SET state = excluded.state, rc = excluded.rc, "
              "signal = excluded.signal, reason = excluded.reason, started = excluded.started, "
              "finished = excluded.finished, output_tail = excluded.output_tail "
              f"WHERE results.state {IS_OPEN}")    # a final result is recorded once; repeats change nothing


class Savepoint:
    """A savepoint as a context manager (a class, not a generator: it runs once per message)."""

    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.savepoint()

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.db.undo_savepoint()
        else:
            self.db.release_savepoint()


def worker_record(r) -> dict:
    """One worker's part of a run's status."""
    duration = (r['finished'] - r['started']) if r['finished'] and r['started'] else None
    return {'state': r['state'], 'rc': r['rc'], 'signal': r['signal'], 'reason': r['reason'],
            'started': r['started'], 'finished': r['finished'], 'duration': duration, 'output_tail': r['output_tail']}


def summary_record(r) -> dict:
    """A light run record from a row of the summary query (each worker's state as `w=state` pairs)."""
    workers = dict(pair.split('=', 1) for pair in (r['states'] or '').split(',') if pair)
    ended = workers and not any(s in OPEN_STATES for s in workers.values())
    finished = r['finished'] if ended else None
    return {'run_id': r['run_id'], 'job': r['job'], 'state': run_state(workers.values()),
            'params': json.loads(r['params']), 'created': r['created'], 'finished': finished,
            'duration': finished - r['created'] if finished else None,
            'parent': r['parent'], 'triggered_by': r['by'], 'key': r['key'], 'workers': workers,
            'queued': bool(r['queued'])}


class Journal:
    def __init__(self, where: str):
        """`where`: a SQLite file, or a postgresql:// URL."""
        self.db = open_db(where)
        # Only a new or older journal gets the schema script: its CREATEs (IF NOT EXISTS, but they
        # still lock the tables) would deadlock with the active broker's writes when a second broker
        # starts on a shared journal.
        if self.version() != SCHEMA_VERSION:
            self.db.script(SCHEMA.format(open_states=repr(OPEN_STATES)))
            self.upgrade()
        self.heads, self.pool_heads = self._heads()
        self.stale = False
        self.shared = self.db.engine == 'postgresql'    # several brokers may use it: one at a time (lease.py)
        self.lease: tuple | None = None    # (holder, epoch, seconds) while this broker holds the lease
        self.fenced_at = 0.0               # monotonic time of the last commit that proved the lease
        self.begun = 0                     # changes() when the transaction began

    def version(self) -> int | None:
        """The journal's schema version; None for a new journal (or one from before versions)."""
        try:
            row = self.db.execute('SELECT version FROM schema_version').fetchone()
        except self.db.Error:
            self.db.rollback()
            return None    # no such table yet
        return row[0] if row else None

    def upgrade(self) -> None:
        """Bring a journal written by an older jobz to this schema, in one transaction."""
        self.db.begin()
        self.db.lock_setup()
        (version,) = self.db.execute('SELECT version FROM schema_version').fetchone() or (None,)
        if version is None:    # a new journal, or one from before the version was written down (1)
            if 'due' not in self.db.columns('pool'):
                self.db.execute('ALTER TABLE pool ADD COLUMN due DOUBLE PRECISION')
            self.db.execute('INSERT INTO schema_version VALUES (?)', (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            self.db.rollback()
            raise RuntimeError(f'the journal {self.db.describe()} was written by a newer jobz '
                               f'(schema {version}; this one knows {SCHEMA_VERSION})')
        elif version < SCHEMA_VERSION:    # 2 -> 3: the lease table, which the schema script made
            self.db.execute('UPDATE schema_version SET version = ?', (SCHEMA_VERSION,))
        self.db.commit()

    def begin(self) -> None:
        if not self.db.in_transaction:
            self.db.begin()
            self.begun = self.db.changes
            if self.stale:    # after a rollback: the sequence heads as the journal has them
                self.heads, self.pool_heads = self._heads()
                self.stale = False

    def commit(self) -> None:
        """Make everything since begin() durable (SQLite synchronous=FULL, or PostgreSQL's COMMIT).

        On a shared (PostgreSQL) journal a transaction that wrote anything proves first that this
        broker still holds the lease, and renews it (LeaseLost if not: then nothing of it is committed)."""
        if self.db.in_transaction:
            if self.shared and self.db.changes != self.begun:
                self._fence()
            self.db.commit()
            if self.lease:
                self.fenced_at = time.monotonic()

    # -- the lease: one active broker among several (lease.py says why this is safe) --------------
    def take_lease(self, holder: str, url: str, seconds: float) -> bool:
        """Take the lease if it ran out (one transaction, committed); True if it is ours now."""
        now = self.db.clock
        self.db.begin()
        try:
            row = self.db.execute(f'UPDATE lease SET holder = ?, url = ?, epoch = epoch + 1, expires = {now} + ? '
                                  f"WHERE name = 'broker' AND expires < {now} RETURNING epoch",
                                  (holder, url, seconds)).fetchone()
            self.db.commit()
        except Exception:
            self.db.rollback()
            raise
        if row is None:
            return False
        self.lease, self.fenced_at, self.stale = (holder, row[0], seconds), time.monotonic(), True
        return True

    def _fence(self) -> None:
        if self.lease is None:    # never had it, or lost it: a shared journal takes writes only from the holder
            raise LeaseLost('this broker does not hold the lease')
        holder, epoch, seconds = self.lease
        now = self.db.clock
        cur = self.db.execute(f"UPDATE lease SET expires = {now} + ? WHERE name = 'broker' AND holder = ? "
                              f'AND epoch = ? AND expires > {now}', (seconds, holder, epoch))
        if cur.rowcount != 1:
            self.lease = None
            raise LeaseLost(f'lease {epoch} of {holder} ran out or was taken over')

    def renew_lease(self) -> None:
        """Prove and renew the lease in a transaction of its own (LeaseLost if it is gone)."""
        self.begin()
        try:
            self._fence()
            self.db.commit()
        except BaseException:
            self.rollback()
            raise
        self.fenced_at = time.monotonic()

    def release_lease(self) -> None:
        """Stopping cleanly: let a standby take over at once instead of waiting for the lease to run out."""
        if self.lease and self.reachable(retry=False):
            holder, epoch, _ = self.lease
            self.begin()
            self.db.execute("UPDATE lease SET expires = 0 WHERE name = 'broker' AND holder = ? AND epoch = ?",
                            (holder, epoch))
            self.db.commit()
        self.lease = None

    def lease_holder(self) -> dict:
        """{holder, url, epoch, left}: who holds the lease and for how many seconds more (negative: ran out)."""
        row = self.db.execute(f"SELECT holder, url, epoch, expires - {self.db.clock} FROM lease "
                              "WHERE name = 'broker'").fetchone()
        return {'holder': row[0], 'url': row[1], 'epoch': row[2], 'left': row[3]}

    def rollback(self) -> None:
        self.db.rollback()
        self.stale = True

    def reachable(self, retry: bool = True) -> bool:
        """Whether the database can be used (always, for SQLite); after PostgreSQL went away,
        with `retry`, try to connect again in the background (at most once a second)."""
        return self.db.reachable(retry)

    def _heads(self) -> tuple[dict, dict]:
        """Per topic: the last sequence number given (calls > 0), and the last given to a pool call (< 0)."""
        rows = self.db.execute('SELECT topic, max(seq), min(seq) FROM runs GROUP BY topic').fetchall()
        return {t: hi for t, hi, _ in rows if hi > 0}, {t: lo for t, _, lo in rows if lo < 0}

    def savepoint(self) -> 'Savepoint':
        """Inside the open transaction: `with journal.savepoint():` undoes only what the block wrote if it
        raises (and re-raises)."""
        return Savepoint(self.db)

    def changes(self) -> int:
        """A number that grows with every row written: compare two readings to see whether anything was."""
        return self.db.changes

    def add_run(self, run_id: str, job: str, topic: str, params: dict, sanitized: list,
                key: str | None, workers: list[str], parent: str | None = None,
                expires: float | None = None, by: str | None = None, pool: bool = False) -> dict:
        """Journal a new run (inside the open transaction); return its call.

        A pool call takes the next number below zero instead: workers never catch up on it (they
        catch up on seq > their cursor); the broker gives it to one of them (pool.py)."""
        if pool:
            seq = self.pool_heads.get(topic, 0) - 1
            self.pool_heads[topic] = seq
        else:
            seq = self.heads.get(topic, 0) + 1
            self.heads[topic] = seq
        created = time.time()
        expires_at = created + expires if expires else None
        self.db.execute('INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                        (run_id, job, topic, seq, json.dumps(params), json.dumps(sanitized), key, created,
                         parent, expires_at, by))
        self.db.executemany('INSERT INTO results (run_id, worker, state) VALUES (?, ?, ?)',
                            [(run_id, w, PENDING) for w in workers])
        if pool:
            self.db.execute('INSERT INTO pool (run_id, topic, since) VALUES (?, ?, ?)', (run_id, topic, created))
        return self._call(run_id, job, topic, seq, params, key, created, parent, expires_at)

    def _call(self, run_id, job, topic, seq, params, key, created, parent, expires_at) -> dict:
        call = {'run_id': run_id, 'job': job, 'topic': topic, 'seq': seq, 'params': params,
                'key': key, 'created': created}
        if seq < 0:
            call['pool'] = True
        if parent:
            # A semaphore with `count: all` needs to know whom the parent run waited for.
            call['parent'] = parent
            call['parent_workers'] = self.workers_of(parent)
        if expires_at:
            call['expires_at'] = expires_at
        return call

    def workers_of(self, run_id: str) -> list[str]:
        return [r[0] for r in self.db.execute('SELECT worker FROM results WHERE run_id = ? ORDER BY worker',
                                              (run_id,))]

    def result_state(self, run_id: str, worker: str) -> str | None:
        """The state `worker` has for `run_id`, or None when it has none there."""
        row = self.db.execute('SELECT state FROM results WHERE run_id = ? AND worker = ?', (run_id, worker)).fetchone()
        return row[0] if row else None

    def run_row(self, run_id: str):
        return self.db.execute('SELECT * FROM runs WHERE run_id = ?', (run_id,)).fetchone()

    def topic_of(self, run_id: str) -> str | None:
        row = self.db.execute('SELECT topic FROM runs WHERE run_id = ?', (run_id,)).fetchone()
        return row[0] if row else None

    def exists(self, run_id: str) -> bool:
        return self.db.execute('SELECT 1 FROM runs WHERE run_id = ?', (run_id,)).fetchone() is not None

    def run_by_key(self, key: str) -> str | None:
        row = self.db.execute('SELECT run_id FROM runs WHERE key = ?', (key,)).fetchone()
        return row[0] if row else None

    def calls_after(self, topic: str, seq: int, limit: int) -> list[dict]:
        rows, size = [], 0
        for r in self.db.execute('SELECT * FROM runs WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?',
                                 (topic, seq, limit)):
            rows.append(r)
            size += len(r['params'])
            if size > 1 << 20:      # about a megabyte per answer; the worker asks again for more
                break
        return [self._call(r['run_id'], r['job'], r['topic'], r['seq'], json.loads(r['params']), r['key'],
                           r['created'], r['parent'], r['expires']) for r in rows]

    def oldest_seq(self, topic: str) -> int | None:
        return self.db.execute('SELECT min(seq) FROM runs WHERE topic = ? AND seq > 0', (topic,)).fetchone()[0]

    def call(self, run_id: str) -> dict | None:
        r = self.run_row(run_id)
        return self._call(r['run_id'], r['job'], r['topic'], r['seq'], json.loads(r['params']), r['key'],
                          r['created'], r['parent'], r['expires']) if r else None

    # -- the pool: calls of run_on: one jobs -------------------------------
    def pool_queue(self, topic: str, limit: int) -> list[str]:
        """The run ids of the oldest calls of `topic` waiting for a worker, first in, first out."""
        return [r[0] for r in self.db.execute(
            'SELECT run_id FROM pool WHERE worker IS NULL AND topic = ? AND (due IS NULL OR due <= ?) '
            'ORDER BY since, run_id LIMIT ?', (topic, time.time(), limit))]

    def pool_waiting(self) -> dict[str, tuple[int, float]]:
        """topic -> (calls waiting for a worker, when the oldest of them joined the queue)."""
        return {t: (n, since) for t, n, since in self.db.execute(
            'SELECT topic, count(*), min(since) FROM pool WHERE worker IS NULL GROUP BY topic')}

    def pool_oldest(self, topics) -> dict[str, float]:
        """topic -> when its oldest call waiting for a worker joined the queue (topics with none left out)."""
        out = {}
        for topic in topics:
            (since,) = self.db.execute('SELECT min(since) FROM pool WHERE worker IS NULL AND topic = ?',
                                       (topic,)).fetchone()
            if since is not None:
                out[topic] = since
        return out

    def pool_queued(self) -> bool:
        return bool(self.db.execute('SELECT EXISTS (SELECT 1 FROM pool WHERE worker IS NULL)').fetchone()[0])

    def pool_held(self) -> dict[str, int]:
        """worker -> pool calls given to it or taken by it that it has not reported on."""
        return dict(self.db.execute('SELECT worker, count(*) FROM pool WHERE worker IS NOT NULL GROUP BY worker'))

    def pool_row(self, run_id: str):
        return self.db.execute('SELECT * FROM pool WHERE run_id = ?', (run_id,)).fetchone()

    def pool_give(self, run_id: str, worker: str | None) -> None:
        """Give a call to `worker` (None: back to the queue, in its old place) unless one has taken it."""
        self.db.execute('UPDATE pool SET worker = ? WHERE run_id = ? AND taken = 0', (worker, run_id))

    def pool_take(self, run_id: str, worker: str) -> bool:
        """`worker` asked for the call: if it is its (or nobody's), it has it now and may start it."""
        cur = self.db.execute('UPDATE pool SET worker = ?, taken = 1 WHERE run_id = ? AND taken = 0 '
                              'AND (worker = ? OR worker IS NULL)', (worker, run_id, worker))
        if cur.rowcount:
            self.db.execute('INSERT INTO results (run_id, worker, state) VALUES (?, ?, ?) ON CONFLICT DO NOTHING',
                            (run_id, worker, PENDING))
        return cur.rowcount > 0

    def pool_untaken(self, worker: str) -> list[str]:
        return [r[0] for r in self.db.execute('SELECT run_id FROM pool WHERE worker = ? AND taken = 0', (worker,))]

    def pool_again(self, run_id: str, worker: str, delay: float) -> None:
        """Queue a call again, to be given out after `delay` seconds, after `worker` reported it interrupted."""
        now = time.time()
        self.db.execute('UPDATE pool SET worker = NULL, taken = 0, attempt = attempt + 1, since = ?, due = ? '
                        'WHERE run_id = ?', (now, now + delay, run_id))
        self.db.execute('DELETE FROM results WHERE run_id = ? AND worker = ?', (run_id, worker))

    def pool_done(self, run_id: str) -> None:
        self.db.execute('DELETE FROM pool WHERE run_id = ?', (run_id,))

    def set_started(self, run_id: str, worker: str, started: float) -> bool:
        cur = self.db.execute(
            "INSERT INTO results (run_id, worker, state, started) "
            "SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM runs WHERE run_id = ?) "
            "ON CONFLICT (run_id, worker) DO UPDATE SET state = excluded.state, started = excluded.started "
            "WHERE results.state = ?", (run_id, worker, RUNNING, started, run_id, PENDING))
        return cur.rowcount > 0

    def set_result(self, run_id: str, worker: str, r: dict) -> bool:
        """Record a final result once; a resent result changes nothing."""
        state = r.get('state')
        if state not in FINAL_STATES:
            raise ValueError(f'unknown result state {state!r}')
        rc = r.get('rc') if is_int(r.get('rc')) else None
        tail = r.get('output_tail') if isinstance(r.get('output_tail'), str) else ''
        values = (run_id, worker, state, rc, text(r.get('signal'), 50), text(r.get('reason')),
                  number(r.get('started')), number(r.get('finished')), tail[-65536:])
        cur = self.db.execute(SET_RESULT, values + (run_id,))
        return cur.rowcount > 0

    def add_note(self, run_id: str, worker: str | None, note: str) -> None:
        self.db.execute('INSERT INTO notes VALUES (?, ?, ?, ?)', (run_id, worker, time.time(), note))

    def status(self, run_id: str) -> dict | None:
        run = self.db.execute('SELECT * FROM runs WHERE run_id = ?', (run_id,)).fetchone()
        if run is None:
            return None
        workers = {r['worker']: worker_record(r) for r in
                   self.db.execute('SELECT * FROM results WHERE run_id = ? ORDER BY worker', (run_id,))}
        notes = [{'worker': n['worker'], 'at': n['at'], 'note': n['note']}
                 for n in self.db.execute('SELECT * FROM notes WHERE run_id = ? ORDER BY at', (run_id,))]
        return {'run_id': run_id, 'job': run['job'], 'topic': run['topic'], 'seq': run['seq'],
                'state': run_state([w['state'] for w in workers.values()]),
                'params': json.loads(run['params']), 'sanitized': json.loads(run['sanitized']),
                'key': run['key'], 'created': run['created'], 'expires': run['expires'],
                'parent': run['parent'], 'children': self.children(run_id), 'triggered_by': run['by'],
                'workers': workers, 'notes': notes, 'queued': self.queued(run_id) if run['seq'] < 0 else False}

    def queued(self, run_id: str) -> bool:
        """A pool call no worker has taken yet: waiting in the queue (or given, not yet taken)."""
        row = self.pool_row(run_id)
        return row is not None and not row['taken']

    def find(self, jobs=(), param: tuple[str, str] | None = None, parent: str | None = None,
             limit: int = 1000) -> list[dict]:
        """Light records of the runs of `jobs` (any job if none), newest first; only those whose parameter
        param[0] is param[1], or whose parent is `parent`, when given."""
        where, args = ['TRUE'], []
        if jobs:
            where.append('r.job IN (%s)' % ','.join('?' * len(jobs)))
            args += list(jobs)
        if param:
            where.append(self.db.json_field('r.params') + ' = ?')
            args += list(param)
        if parent:
            where.append('r.parent = ?')
            args.append(parent)
        return self._summaries(' AND '.join(where), tuple(args), limit)

    def _summaries(self, where: str = 'TRUE', args: tuple = (), limit: int = 1000) -> list[dict]:
        """Light run records (newest first), with each worker's state, from one query."""
        states = self.db.agg("s.worker || '=' || s.state")
        rows = self.db.execute(
            "SELECT r.run_id, r.job, r.params, r.created, r.parent, r.by, r.key, max(s.finished) AS finished, "
            f"{states} AS states, "
            "r.seq < 0 AND EXISTS (SELECT 1 FROM pool p WHERE p.run_id = r.run_id AND p.taken = 0) AS queued "
            f"FROM runs r LEFT JOIN results s USING (run_id) WHERE {where} "
            "GROUP BY r.run_id ORDER BY r.created DESC LIMIT ?", args + (limit,))
        return [summary_record(r) for r in rows]

    def summary(self, run_id: str, children: bool = True) -> dict | None:
        found = self._summaries('r.run_id = ?', (run_id,), 1)
        if not found:
            return None
        if children:
            found[0]['children'] = self.children(run_id)
        return found[0]

    def children(self, run_id: str) -> list[str]:
        return [r[0] for r in self.db.execute('SELECT run_id FROM runs WHERE parent = ? ORDER BY created',
                                              (run_id,))]

    def recent(self, job: str | None, limit: int) -> list[dict]:
        return self.find([job] if job else (), limit=limit)

    def open_runs(self) -> list[dict]:
        """Runs some worker has still to finish (the partial index keeps this cheap)."""
        return self._summaries(f'r.run_id IN (SELECT run_id FROM results WHERE state {IS_OPEN})', limit=100000)

    def running_on(self, worker: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            'SELECT run_id FROM results WHERE worker = ? AND state = ? ORDER BY started', (worker, RUNNING))]

    def ended(self, run_id: str) -> tuple[str, str, float] | None:
        """(job, state, seconds from trigger to the last finish) once no worker is left to report; else None."""
        row = self.db.execute(
            f"SELECT r.job, r.created, max(s.finished), {self.db.agg('s.state')} FROM results s JOIN runs r "
            'USING (run_id) WHERE s.run_id = ? GROUP BY r.run_id', (run_id,)).fetchone()
        if row is None:
            return None
        job, created, finished, states = row
        states = states.split(',') if states else []
        if not states or any(s in OPEN_STATES for s in states):
            return None
        return job, run_state(states), max(0.0, (finished or created) - created)

    # -- output ------------------------------------------------------------
    def add_output(self, run_id: str, worker: str, offset: int, text: str, complete: bool = False) -> None:
        """Store output starting at character `offset` of the stream; a complete one replaces what was there."""
        row = self.db.execute('SELECT text, dropped, complete FROM outputs WHERE run_id = ? AND worker = ?',
                              (run_id, worker)).fetchone()
        if row is not None and row['complete']:
            return    # the result's whole output is in: late pieces change nothing
        if complete or row is None or offset > row['dropped'] + len(row['text']):
            stored, dropped = '', offset    # first piece, the whole output, or a piece went missing
        else:
            stored, dropped = row['text'], row['dropped']
            text = text[dropped + len(stored) - offset:]    # only what is new
        stored += text
        cut = max(0, len(stored) - MAX_OUTPUT)
        self.db.execute('INSERT INTO outputs VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, worker) DO UPDATE '
                        'SET text = excluded.text, dropped = excluded.dropped, complete = excluded.complete',
                        (run_id, worker, stored[cut:], dropped + cut, int(complete)))

    def output(self, run_id: str, worker: str | None, offset: int) -> dict:
        """Per worker: the output from `offset` on, where to go on from, and whether more can come."""
        out = {}
        one = (' AND s.worker = ?', (worker,)) if worker is not None else ('', ())
        for r in self.db.execute(
                'SELECT s.worker, s.state, o.text, o.dropped, o.complete FROM results s LEFT JOIN outputs o '
                f'USING (run_id, worker) WHERE s.run_id = ?{one[0]} ORDER BY s.worker', (run_id, *one[1])):
            text, dropped = r['text'] or '', r['dropped'] or 0
            start = max(offset, dropped)
            out[r['worker']] = {'output': text[start - dropped:], 'offset': start,
                                'next': max(start, dropped + len(text)), 'dropped': dropped,
                                'complete': bool(r['complete']) or r['state'] not in OPEN_STATES}
        return out

    # -- the worker registry ---------------------------------------------
    def load_workers(self) -> list[tuple]:
        return [(r['name'], json.loads(r['topics']), json.loads(r['cursors']), r['last_seen'])
                for r in self.db.execute('SELECT * FROM workers')]

    def save_worker(self, name: str, topics: list, cursors: dict, last_seen: float) -> None:
        self.db.execute('INSERT INTO workers VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET '
                        'topics = excluded.topics, cursors = excluded.cursors, last_seen = excluded.last_seen',
                        (name, json.dumps(sorted(topics)), json.dumps(cursors), last_seen))

    def forget_worker(self, name: str) -> None:
        self.db.execute('DELETE FROM workers WHERE name = ?', (name,))

    # -- pruning ------------------------------------------------------------
    def prune(self, older_than: float, slowest: dict[str, int], limit: int = 5000) -> int:
        """Delete up to `limit` runs created before `older_than` that every worker has taken.

        `slowest` maps a topic to the lowest cursor among workers still remembered;
        a topic missing from it holds nothing back."""
        doomed = []
        # A pool call still in the pool (queued, or out with a worker) is not done: it stays.
        rows = self.db.execute('SELECT run_id, topic, seq FROM runs WHERE created < ? AND run_id NOT IN '
                               '(SELECT run_id FROM pool) ORDER BY created LIMIT ?', (older_than, limit)).fetchall()
        for run_id, topic, seq in rows:
            # The newest run of a topic stays: it carries the sequence on across a restart (the
            # newest pool call, most negative, outlives the older ones anyway).
            if seq <= slowest.get(topic, seq) and seq < self.heads.get(topic, 0):
                doomed.append((run_id,))
        for table in ('notes', 'outputs', 'results', 'runs'):
            self.db.executemany(f'DELETE FROM {table} WHERE run_id = ?', doomed)
        return len(doomed)

    def count_runs(self) -> int:
        return self.db.execute('SELECT count(*) FROM runs').fetchone()[0]

    def size(self) -> int:
        """Bytes on disk: SQLite's database and its write-ahead log; PostgreSQL's database."""
        return self.db.size()

    def close(self) -> None:
        self.db.close()
