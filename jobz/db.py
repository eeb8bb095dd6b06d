"""The two engines the broker's journal runs on: SQLite (a file under --home) and PostgreSQL.

journal.py writes its SQL once, in what both understand (`?` placeholders, ON CONFLICT upserts,
DOUBLE PRECISION times); what differs is here: connecting, transactions, counting changes, the
two functions that are spelled differently, and the size on disk. Nothing else opens the database.
"""
import logging
import os
import re
import sqlite3
import threading
import time

from .files import private_file

log = logging.getLogger('jobz.journal')
# libpq: give up on a connection that hangs (a partition, a dead host) within seconds, not TCP's minutes.
CONNECT = {'connect_timeout': 2, 'keepalives': 1, 'keepalives_idle': 2, 'keepalives_interval': 1,
           'keepalives_count': 2, 'tcp_user_timeout': 4000}
RECONNECT_EVERY = 1.0    # seconds between attempts while PostgreSQL cannot be reached


def redact(text: str) -> str:
    """`text` with the password of any URL in it replaced by ***, for messages and logs."""
    return re.sub(r'(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@', r'\1***@', text)


def open_db(where: str) -> 'SQLite | Postgres':
    """`postgresql://…` (or `postgres://…`): PostgreSQL through psycopg 3; anything else: a SQLite file."""
    if where.startswith(('postgresql://', 'postgres://')):
        return Postgres(where)
    return SQLite(where)


class SQLite:
    engine = 'sqlite'
    clock = "((julianday('now') - 2440587.5) * 86400.0)"    # SQL: the database's clock, seconds since 1970
    Error = sqlite3.Error
    Row = sqlite3.Row

    def __init__(self, path: str):
        # isolation_level=None: we open and commit transactions ourselves, in batches.
        self.conn = sqlite3.connect(private_file(path), isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute('PRAGMA journal_mode=WAL')
        self.conn.execute('PRAGMA synchronous=FULL')    # a commit is on disk when COMMIT returns
        self.execute = self.conn.execute
        self.executemany = self.conn.executemany
        self.script = self.conn.executescript

    def begin(self) -> None:
        self.conn.execute('BEGIN IMMEDIATE')

    @staticmethod
    def lock_setup() -> None:
        """In a transaction: keep others from setting the schema up at the same time (BEGIN IMMEDIATE does)."""

    def savepoint(self) -> None:
        self.conn.execute('SAVEPOINT msg')

    def release_savepoint(self) -> None:
        self.conn.execute('RELEASE msg')

    def undo_savepoint(self) -> None:
        self.conn.execute('ROLLBACK TO msg')
        self.conn.execute('RELEASE msg')

    def commit(self) -> None:
        self.conn.execute('COMMIT')

    def rollback(self) -> None:
        # A COMMIT that failed (a full disk, say) may have rolled back already: then nothing to undo.
        if self.conn.in_transaction:
            self.conn.execute('ROLLBACK')

    @staticmethod
    def reachable(retry: bool = True) -> bool:
        return True    # a file: its failures are errors of a statement, not of a connection

    def close(self) -> None:
        self.conn.close()

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @property
    def changes(self) -> int:
        return self.conn.total_changes

    @staticmethod
    def agg(expr: str) -> str:
        """SQL: the values of `expr` in a group, joined by commas."""
        return f"group_concat({expr})"

    @staticmethod
    def json_field(column: str) -> str:
        """SQL: the text of the field (named by the next `?`) of the JSON object in `column`."""
        return f"json_extract({column}, '$.' || ?)"

    def columns(self, table: str) -> list[str]:
        return [r['name'] for r in self.conn.execute(f'PRAGMA table_info({table})')]

    def size(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        path = self.conn.execute('PRAGMA database_list').fetchone()[2]
        return sum(os.path.getsize(p) for p in (path, path + '-wal') if p and os.path.exists(p))

    def describe(self) -> str:
        return self.conn.execute('PRAGMA database_list').fetchone()[2]


class Row(tuple):
    """A result row read both ways, as sqlite3.Row is: row[0] and row['name']."""
    __slots__ = ()
    names: dict = {}

    def __getitem__(self, key):
        return tuple.__getitem__(self, self.names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.names)


class Postgres:
    """One connection, in autocommit mode: like the SQLite side, transactions are our own BEGIN and COMMIT.

    synchronous_commit must stay `on` (PostgreSQL's default): then COMMIT returns once the
    commit is on disk (and on the synchronous standbys, if the operator has any)."""
    engine = 'postgresql'
    clock = 'extract(epoch FROM clock_timestamp())::float8'    # now, not the transaction's start (now())

    def __init__(self, url: str):
        import psycopg    # only needed here: SQLite users need not install it
        self.psycopg = psycopg
        self.Error = psycopg.Error
        self.url = url
        self.changes = 0
        self.retry_at = 0.0
        self.unreleased = False            # savepoint(): a RELEASE still to send
        self.fresh = self.trying = None    # reachable(): a connection made in a thread, and that thread
        self.conn = self._connect()
        self.Row = Row

    def _connect(self):
        return self.psycopg.connect(self.url, autocommit=True, row_factory=self._rows, **CONNECT)

    _kinds: dict = {}

    @classmethod
    def _rows(cls, cursor):
        """psycopg's row factory: a Row class that knows this query's column names (one per column list)."""
        names = tuple(c.name for c in cursor.description or ())
        kind = cls._kinds.get(names)
        if kind is None:
            kind = cls._kinds[names] = type('Row', (Row,), {'__slots__': (), 'names': {n: i for i, n in enumerate(names)}})
        return kind

    def execute(self, sql: str, args=()):
        cur = self.conn.execute(sql.replace('%', '%%').replace('?', '%s'), args)
        if cur.rowcount > 0 and (cur.statusmessage or '').startswith(('INSERT', 'UPDATE', 'DELETE')):
            self.changes += cur.rowcount
        return cur

    def executemany(self, sql: str, rows) -> None:
        rows = list(rows)
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(sql.replace('%', '%%').replace('?', '%s'), rows)
            self.changes += len(rows)

    # Two brokers starting on a new journal at once set it up one after the other.
    SETUP_LOCK = 'SELECT pg_advisory_xact_lock(7412657)'

    def script(self, sql: str) -> None:
        # No parameters: several statements in one go, and in one transaction.
        self.conn.execute(f'{self.SETUP_LOCK}; {sql}')

    def lock_setup(self) -> None:
        self.conn.execute(self.SETUP_LOCK)

    def begin(self) -> None:
        self.conn.execute('BEGIN')
        self.unreleased = False

    # A savepoint per message costs two round trips; the release is sent with the next savepoint
    # (or made moot by COMMIT), one round trip per message fewer. Statements in between still
    # belong to the last message's savepoint, but nothing rolls back to it any more: the same
    # as if it had been released.
    def savepoint(self) -> None:
        self.conn.execute('RELEASE msg; SAVEPOINT msg' if self.unreleased else 'SAVEPOINT msg')
        self.unreleased = False

    def release_savepoint(self) -> None:
        self.unreleased = True

    def undo_savepoint(self) -> None:
        self.conn.execute('ROLLBACK TO msg; RELEASE msg')
        self.unreleased = False

    def commit(self) -> None:
        # COMMIT of a transaction that already failed is a ROLLBACK that PostgreSQL does not call an
        # error: it must not pass for a commit here.
        if self.conn.info.transaction_status == self.psycopg.pq.TransactionStatus.INERROR:
            raise self.psycopg.errors.InFailedSqlTransaction('the transaction failed before COMMIT')
        cur = self.conn.execute('COMMIT')
        if cur.statusmessage != 'COMMIT':
            raise self.psycopg.errors.InFailedSqlTransaction(f'COMMIT answered {cur.statusmessage}')

    def rollback(self) -> None:
        """Undo the open transaction; on a lost connection there is nothing left to undo (the server did)."""
        if self.conn.broken or self.conn.closed:
            return
        try:
            if self.in_transaction:
                self.conn.execute('ROLLBACK')
        except self.psycopg.OperationalError:
            pass    # the connection went with it: reachable() connects again

    def reachable(self, retry: bool = True) -> bool:
        """True while connected. Otherwise False at once, and (with `retry`, at most once a second)
        a new connection is tried in a thread: connecting to a host that does not answer takes
        seconds, and meanwhile the broker keeps answering 503. The next call after it succeeded
        puts it in place."""
        if not (self.conn.broken or self.conn.closed):
            return True
        if self.fresh is not None:
            self.conn.close()
            self.conn, self.fresh = self.fresh, None
            log.warning('the journal is reachable again (%s)', self.describe())
            return True
        now = time.monotonic()
        if retry and now >= self.retry_at and not (self.trying and self.trying.is_alive()):
            self.retry_at = now + RECONNECT_EVERY
            self.trying = threading.Thread(target=self._reconnect, name='journal-reconnect', daemon=True)
            self.trying.start()
        return False

    def _reconnect(self) -> None:
        """In the thread reachable() starts: leave a new connection in self.fresh, or log why not."""
        try:
            self.fresh = self._connect()
        except self.psycopg.OperationalError as e:
            log.warning('the journal is unreachable: %s', redact(str(e)).strip().splitlines()[-1][:300])

    @property
    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != self.psycopg.pq.TransactionStatus.IDLE

    def close(self) -> None:
        if self.trying:
            self.trying.join()
        for conn in (self.conn, self.fresh):
            if conn is not None:
                conn.close()

    @staticmethod
    def agg(expr: str) -> str:
        return f"string_agg({expr}, ',')"

    @staticmethod
    def json_field(column: str) -> str:
        return f"({column}::jsonb ->> ?)"

    def columns(self, table: str) -> list[str]:
        return [r[0] for r in self.execute('SELECT column_name FROM information_schema.columns '
                                           'WHERE table_schema = current_schema() AND table_name = ?', (table,))]

    def size(self) -> int:
        return self.execute('SELECT pg_database_size(current_database())').fetchone()[0]

    def describe(self) -> str:
        info = self.conn.info
        return f'postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}'
