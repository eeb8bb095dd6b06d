"""The broker's SQLite journal: runs, per-worker results and progress notes."""
import json
import sqlite3
import time

from .protocol import FINAL_STATES

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id    TEXT PRIMARY KEY,
    job       TEXT NOT NULL,
    topic     TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    params    TEXT NOT NULL,
    sanitized TEXT NOT NULL,
    key       TEXT UNIQUE,
    created   REAL NOT NULL,
    UNIQUE (topic, seq)
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, created);
CREATE TABLE IF NOT EXISTS results (
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    worker      TEXT NOT NULL,
    state       TEXT NOT NULL,
    rc          INTEGER,
    signal      TEXT,
    reason      TEXT,
    started     REAL,
    finished    REAL,
    output_tail TEXT,
    PRIMARY KEY (run_id, worker)
);
CREATE TABLE IF NOT EXISTS notes (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    worker TEXT,
    at     REAL NOT NULL,
    note   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_run ON notes (run_id);
"""
OPEN = ('pending', 'running')


def run_state(worker_states: list[str]) -> str:
    """A run's state from its workers' states: the one rule, used everywhere."""
    if not worker_states or all(s == 'pending' for s in worker_states):
        return 'pending'
    if any(s in OPEN for s in worker_states):
        return 'running'
    return 'succeeded' if all(s == 'succeeded' for s in worker_states) else 'failed'


class Journal:
    def __init__(self, path: str):
        # isolation_level=None: we open and commit transactions ourselves, in batches.
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute('PRAGMA journal_mode=WAL')
        self.db.execute('PRAGMA synchronous=FULL')
        self.db.executescript(SCHEMA)
        self.heads = {r[0]: r[1] for r in self.db.execute('SELECT topic, max(seq) FROM runs GROUP BY topic')}
        self.in_tx = False

    def begin(self) -> None:
        if not self.in_tx:
            self.db.execute('BEGIN IMMEDIATE')
            self.in_tx = True

    def commit(self) -> None:
        """Make everything since begin() durable (synchronous=FULL) in one fsync."""
        if self.in_tx:
            self.db.execute('COMMIT')
            self.in_tx = False

    def rollback(self) -> None:
        if self.in_tx:
            self.db.execute('ROLLBACK')
            self.in_tx = False
            self.heads = {r[0]: r[1] for r in self.db.execute('SELECT topic, max(seq) FROM runs GROUP BY topic')}

    def add_run(self, run_id: str, job: str, topic: str, params: dict, sanitized: list,
                key: str | None, workers: list[str]) -> dict:
        """Journal a new run (inside the open transaction); return its call."""
        seq = self.heads.get(topic, 0) + 1
        created = time.time()
        self.db.execute('INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                        (run_id, job, topic, seq, json.dumps(params), json.dumps(sanitized), key, created))
        self.db.executemany("INSERT INTO results (run_id, worker, state) VALUES (?, ?, 'pending')",
                            [(run_id, w) for w in workers])
        self.heads[topic] = seq
        return {'run_id': run_id, 'job': job, 'topic': topic, 'seq': seq,
                'params': params, 'key': key, 'created': created}

    def run_by_key(self, key: str) -> str | None:
        row = self.db.execute('SELECT run_id FROM runs WHERE key = ?', (key,)).fetchone()
        return row[0] if row else None

    def calls_after(self, topic: str, seq: int, limit: int) -> list[dict]:
        rows = self.db.execute('SELECT * FROM runs WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?',
                               (topic, seq, limit))
        return [{'run_id': r['run_id'], 'job': r['job'], 'topic': r['topic'], 'seq': r['seq'],
                 'params': json.loads(r['params']), 'key': r['key'], 'created': r['created']}
                for r in rows]

    def set_started(self, run_id: str, worker: str, started: float) -> bool:
        cur = self.db.execute(
            "INSERT INTO results (run_id, worker, state, started) "
            "SELECT ?, ?, 'running', ? WHERE EXISTS (SELECT 1 FROM runs WHERE run_id = ?) "
            "ON CONFLICT (run_id, worker) DO UPDATE SET state = 'running', started = excluded.started "
            "WHERE results.state = 'pending'", (run_id, worker, started, run_id))
        return cur.rowcount > 0

    def set_result(self, run_id: str, worker: str, r: dict) -> bool:
        """Record a final result once; a resent result changes nothing."""
        state = r.get('state')
        if state not in FINAL_STATES:
            raise ValueError(f'unknown result state {state!r}')
        values = (run_id, worker, state, r.get('rc'), r.get('signal'), r.get('reason'),
                  r.get('started'), r.get('finished'), str(r.get('output_tail') or '')[-65536:])
        cur = self.db.execute(
            "INSERT INTO results (run_id, worker, state, rc, signal, reason, started, finished, output_tail) "
            "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM runs WHERE run_id = ?) "
            "ON CONFLICT (run_id, worker) DO UPDATE SET state = excluded.state, rc = excluded.rc, "
            "signal = excluded.signal, reason = excluded.reason, started = excluded.started, "
            "finished = excluded.finished, output_tail = excluded.output_tail "
            "WHERE results.state IN ('pending', 'running')", values + (run_id,))
        return cur.rowcount > 0

    def add_note(self, run_id: str, worker: str | None, note: str) -> None:
        self.db.execute('INSERT INTO notes VALUES (?, ?, ?, ?)', (run_id, worker, time.time(), note))

    def status(self, run_id: str) -> dict | None:
        run = self.db.execute('SELECT * FROM runs WHERE run_id = ?', (run_id,)).fetchone()
        if run is None:
            return None
        workers = {}
        for r in self.db.execute('SELECT * FROM results WHERE run_id = ? ORDER BY worker', (run_id,)):
            duration = (r['finished'] - r['started']) if r['finished'] and r['started'] else None
            workers[r['worker']] = {'state': r['state'], 'rc': r['rc'], 'signal': r['signal'],
                                    'reason': r['reason'], 'started': r['started'],
                                    'finished': r['finished'], 'duration': duration,
                                    'output_tail': r['output_tail']}
        notes = [{'worker': n['worker'], 'at': n['at'], 'note': n['note']}
                 for n in self.db.execute('SELECT * FROM notes WHERE run_id = ? ORDER BY at', (run_id,))]
        return {'run_id': run_id, 'job': run['job'], 'topic': run['topic'], 'seq': run['seq'],
                'state': run_state([w['state'] for w in workers.values()]),
                'params': json.loads(run['params']), 'sanitized': json.loads(run['sanitized']),
                'key': run['key'], 'created': run['created'], 'workers': workers, 'notes': notes}

    def recent(self, job: str | None, limit: int) -> list[dict]:
        if job:
            rows = self.db.execute('SELECT run_id FROM runs WHERE job = ? ORDER BY created DESC LIMIT ?',
                                   (job, limit))
        else:
            rows = self.db.execute('SELECT run_id FROM runs ORDER BY created DESC LIMIT ?', (limit,))
        out = []
        for (run_id,) in rows.fetchall():
            s = self.status(run_id)
            out.append({k: s[k] for k in ('run_id', 'job', 'state', 'params', 'created')}
                       | {'workers': {w: v['state'] for w, v in s['workers'].items()}})
        return out

    def close(self) -> None:
        self.db.close()
