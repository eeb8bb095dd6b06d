#!/usr/bin/env python3
"""jobz broker: the Mongrel2 handler that journals runs and publishes calls to workers."""
import logging
import os
import signal
import socket
import sys

import zmq

from jobz import defaults
from jobz.broker import Broker, connect_fronts
from jobz.cli import Parser, check_curve, home_or_exit, is_loopback, load_or_exit, setup_logging
from jobz.curve import Enrolled
from jobz.db import redact
from jobz.journal import Journal
from jobz.lease import holder_name, stand_by
from jobz.tls import ClientCerts

log = logging.getLogger('jobz.broker')


def parse_args(argv=None):
    ap = Parser(description=__doc__)
    ap.jobs_option()
    ap.option('--home', env='JOBZ_HOME', default=defaults.HOME, help='state folder (journal.db)')
    ap.option('--journal', env='JOBZ_JOURNAL', default=None, shown='HOME/journal.db',
              help='where the journal lives: a SQLite file, or postgresql://USER@HOST:PORT/DB (the password '
                   'from ~/.pgpass, PGPASSFILE or this variable, never the command line: ps shows it)')
    ap.option('--front-url', env='JOBZ_FRONT_URL', default=f'http://{socket.gethostname()}:{defaults.PORT}',
              help='the URL clients reach this front end by: with several front ends on one PostgreSQL '
                   'journal, a standby names the active one by it (503 with "active")')
    ap.option('--pub', env='JOBZ_PUB', default=defaults.PUB, help='bind address for live calls to workers')
    ap.option('--router', env='JOBZ_ROUTER', default=defaults.ROUTER,
              help='bind address for worker sync, results and heartbeats')
    ap.option('--m2-recv', env='JOBZ_M2_RECV', default=defaults.M2_RECV,
              help="Mongrel2 handler send_spec (requests come from here)")
    ap.option('--m2-send', env='JOBZ_M2_SEND', default=defaults.M2_SEND,
              help="Mongrel2 handler recv_spec (replies go here)")
    ap.option('--m2-ident', env='JOBZ_M2_IDENT', default=defaults.M2_IDENT,
              help="the handler's send_ident/recv_ident in mongrel2.conf")
    ap.option('--m2-tls-recv', env='JOBZ_M2_TLS_RECV', default=None, shown=f'none; mongrel2.conf has {defaults.M2_TLS_RECV}',
              help='send_spec of the TLS front end (client certificates required)')
    ap.option('--m2-tls-send', env='JOBZ_M2_TLS_SEND', default=None, shown=f'none; mongrel2.conf has {defaults.M2_TLS_SEND}',
              help='recv_spec of the TLS front end')
    ap.option('--clients', env='JOBZ_CLIENTS', default=None, shown='any certificate from the CA',
              help='folder of client certificates (NAME.crt) allowed on the TLS front end; re-read when it changes')
    ap.option('--hostnames', env='JOBZ_HOSTNAMES', default=defaults.HOSTNAMES,
              help="comma-separated host names clients may call us by (the Host header); others get 403, so a "
                   "DNS-rebinding page cannot read the API; '*': any")
    ap.option('--worker-timeout', env='JOBZ_WORKER_TIMEOUT', default=30.0, type=float,
              help='seconds without a heartbeat before a worker is no longer expected for new runs')
    ap.option('--max-body', env='JOBZ_MAX_BODY', default=65536, type=int,
              help='largest request body accepted, in bytes (larger: 413)')
    ap.option('--keep-days', env='JOBZ_KEEP_DAYS', default=30.0, type=float,
              help='runs older than this are pruned from the journal once every worker has taken them')
    ap.option('--pub-hwm', env='JOBZ_PUB_HWM', default=10000, type=int,
              help='calls queued per worker before live delivery drops (they are caught up by sync)')
    ap.option('--curve-secret', env='JOBZ_CURVE_SECRET', default=None,
              help="the broker's CURVE secret key file (broker.key_secret); with --enrolled: "
                   'workers must authenticate and all traffic is encrypted')
    ap.option('--enrolled', env='JOBZ_ENROLLED', default=None,
              help='folder of enrolled worker public keys (NAME.key), re-read when it changes')
    ap.flag('--insecure', env='JOBZ_INSECURE',
            help='allow --pub/--router on an address beyond loopback without CURVE: anyone who reaches them '
                 'can then read every call and forge results')
    ap.logging_options()
    args = ap.parse_args(argv)
    check_curve(ap, args.curve_secret, args.enrolled, '--enrolled')
    if not args.curve_secret and not args.insecure:
        for flag, addr in (('--pub', args.pub), ('--router', args.router)):
            if not is_loopback(addr):
                ap.error(f'{flag} {addr}: an address beyond loopback needs CURVE (--curve-secret and --enrolled): '
                         'without it anyone who reaches the port reads every call and can forge results. '
                         'Add --insecure (JOBZ_INSECURE=1) only on a network you trust entirely')
    if bool(args.m2_tls_recv) != bool(args.m2_tls_send):
        ap.error('--m2-tls-recv and --m2-tls-send go together')
    if args.clients and not os.path.isdir(args.clients):
        ap.error(f'--clients {args.clients}: no such folder')
    return args


def open_journal_or_exit(where: str) -> Journal:
    try:
        return Journal(where)
    except Exception as e:    # sqlite3 or psycopg: the engine's own words say what is wrong
        sys.exit(f'error: --journal {redact(where)}: {redact(str(e))}')


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args, 'broker')
    jobs = load_or_exit(args.jobs, log)     # validate everything before binding a socket
    home_or_exit(args.home)
    journal = open_journal_or_exit(args.journal or os.path.join(args.home, 'journal.db'))
    ctx = zmq.Context()
    fronts = connect_fronts(ctx, args.m2_recv, args.m2_send, args.m2_ident, args.m2_tls_recv, args.m2_tls_send)
    me, now = holder_name(), {'stopping': False, 'broker': None}

    def stop(signum, frame):
        now['stopping'] = True    # only flags: the loop finishes its burst and leaves
        if now['broker']:
            now['broker'].stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not now['stopping']:
        # On a shared (PostgreSQL) journal, one broker at a time: the others stand by (jobz/lease.py).
        if journal.shared and not stand_by(journal, fronts, me, args.front_url, lambda: now['stopping']):
            break
        broker = now['broker'] = Broker(
            jobs, journal, ctx, m2_recv=args.m2_recv, m2_send=args.m2_send, fronts=fronts,
            pub=args.pub, router=args.router, worker_timeout=args.worker_timeout,
            max_body=args.max_body, keep_days=args.keep_days, pub_hwm=args.pub_hwm,
            curve_secret=args.curve_secret, enrolled=Enrolled(args.enrolled) if args.enrolled else None,
            clients=ClientCerts(args.clients) if args.clients else None, hostnames=args.hostnames)
        log.info('broker up: %d jobs, pub %s, router %s, journal %s', len(jobs), args.pub, args.router,
                 journal.db.describe())
        broker.run()
        broker.close(fronts=False)
        now['broker'] = None
        if not broker.lost:
            break
    journal.release_lease()
    for front in fronts:
        front.close()
    journal.close()
    ctx.term()
    return 0


if __name__ == '__main__':
    sys.exit(main())
