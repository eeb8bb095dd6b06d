"""Several front ends on one PostgreSQL journal: which broker is active, and how the others wait.

Exactly one broker is active: the one holding the lease, a row of the journal (table `lease`:
holder, epoch, expiry on the database's own clock). The others stand by: they answer every
request 503 with the active front end's URL, bind no worker socket, and try every half second
to take the lease. The steps, and why two brokers never both act:

1. Taking over is one statement, committed: `UPDATE lease SET holder = me, epoch = epoch + 1,
   expires = now + LEASE WHERE expires < now`. PostgreSQL runs such updates of one row one
   after the other, so at most one standby wins an expired lease, and it gets a new epoch.
2. The active broker renews the lease every RENEW_EVERY seconds, and **every transaction that
   wrote anything proves the lease as its last statement before COMMIT**:
   `UPDATE lease SET expires = now + LEASE WHERE holder = me AND epoch = mine AND expires > now`.
   If that changes no row, the lease ran out or was taken: the transaction is rolled back
   (LeaseLost) and nothing of it happened.
3. Fencing follows from the row lock: the proving UPDATE locks the lease row until COMMIT, so a
   take-over either committed before it (and then the proving UPDATE finds another epoch and
   the commit is abandoned) or waits for that commit (and then finds the lease renewed; or, if
   even the renewed lease ran out meanwhile, takes it only after that commit, and so sees all
   of it). The commits of two brokers therefore never interleave: a broker that was paused, cut
   off from the database or came back from the dead commits nothing after it lost the lease.
   It publishes, acknowledges and answers only what it committed (broker.py): at worst, right
   after its last commit, calls that the journal holds anyway, and workers know every call by
   its run id and start none twice.
4. A broker that finds it lost the lease (a commit refused, a renewal refused, or the database
   unreachable for longer than the lease) answers its burst 503, closes its worker sockets, and
   goes back to standing by. Stopping cleanly, it gives the lease up (expires = 0), so a standby
   takes over at once.
5. The new active broker loads everything from the journal, as a restarted broker does, and
   binds its worker sockets; workers, connected to every front end's addresses, reach it and
   catch up by SYNC as after a restart. Keys (`key=`, a gate's release key) are unique in the
   shared journal: a retried trigger starts at most once, whichever broker it reaches.

The clock is the database's: brokers' clocks may disagree. A standby takes over at the soonest
LEASE seconds after the active broker last proved its lease.
"""
import logging
import os
import secrets
import socket
import time

import zmq

from .m2 import BadMessage, Connection, Request

log = logging.getLogger('jobz.broker')

LEASE = 3.0          # seconds a proof of the lease holds
RENEW_EVERY = 1.0    # seconds between renewals while nothing else commits
TRY_EVERY = 0.5      # seconds between a standby's attempts to take over


def holder_name() -> str:
    """This broker process, as the lease names it: host, PID and a random part (a restart is someone new)."""
    return f'{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}'


def stand_by(journal, fronts: list[Connection], me: str, url: str, stopping) -> bool:
    """Answer every request 503 (with the active front end's URL) until this broker takes the lease.

    True once the lease is ours; False if `stopping()` came first."""
    poller = zmq.Poller()
    for front in fronts:
        poller.register(front.reqs, zmq.POLLIN)
    active, next_try, said = None, 0.0, False
    while not stopping():
        now = time.monotonic()
        if now >= next_try:
            next_try = now + TRY_EVERY
            try:
                if journal.reachable() and journal.take_lease(me, url, LEASE):
                    # Taken at once: a normal start; taken after standing by: a take-over, worth a warning.
                    log.log(logging.WARNING if said else logging.INFO, 'this broker is now the active one '
                            '(lease epoch %d, after %s)', journal.lease[1], active or 'nobody')
                    return True
                active = journal.lease_holder()['url'] if journal.reachable(retry=False) else None
            except journal.db.Error as e:
                log.warning('standby: the journal answered %s', str(e).strip()[:300])
            if not said:
                log.info('standing by; the active front end: %s', active or 'not known yet')
                said = True
        events = dict(poller.poll(100))
        for front in fronts:
            if front.reqs in events:
                refuse(front, active)
    return False


def refuse(front: Connection, active: str | None) -> None:
    """Answer what waits on this front end 503: a standby starts nothing and has nothing to show."""
    while front.reqs.get(zmq.EVENTS) & zmq.POLLIN:
        try:
            req = Request.parse(front.reqs.recv(zmq.NOBLOCK), front)
        except (BadMessage, zmq.Again):
            continue
        if not req.is_disconnect():
            front.answer(req, 503, {'error': 'this front end is standing by; ask the active one',
                                    'active': active})
