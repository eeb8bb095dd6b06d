#!/usr/bin/env python3
"""jobz semaphore: counts completions of semaphore jobs and releases each gate exactly once."""
import logging
import os
import signal
import sys

import zmq

from jobz import defaults
from jobz.agent import Agent
from jobz.cli import Parser, load_or_exit, setup_logging
from jobz.jobfile import NAME_RE
from jobz.semaphore import Semaphore

log = logging.getLogger('jobz.semaphore')


def parse_args(argv=None):
    ap = Parser(description=__doc__)
    ap.option('--name', env='JOBZ_NAME', default=defaults.HOSTNAME + '-semaphore',
              help='semaphore name, unique among workers (its counts are kept under it)')
    ap.jobs_option()
    ap.option('--home', env='JOBZ_HOME', default=defaults.HOME, help='state folder')
    ap.option('--pub', env='JOBZ_PUB', default=defaults.PUB, help="broker's address for live calls")
    ap.option('--router', env='JOBZ_ROUTER', default=defaults.ROUTER, help="broker's address for sync and results")
    ap.option('--url', env='JOBZ_URL', default=defaults.URL, help='front-end base URL for on_success')
    ap.option('--sync-interval', env='JOBZ_SYNC_INTERVAL', default=1.0, type=float,
              help='seconds between syncs (heartbeats) with the broker')
    ap.add_argument('-v', '--verbose', action='store_true', help='log debug messages')
    args = ap.parse_args(argv)
    if not NAME_RE.match(args.name):
        ap.error(f'--name {args.name!r} may only hold letters, digits and _ . -')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    jobs = load_or_exit(args.jobs, log)
    topics = sorted({j.topic for j in jobs.values() if j.semaphore})
    if not topics:
        sys.exit('error: the job files define no semaphore job')
    os.makedirs(args.home, exist_ok=True)
    ctx = zmq.Context()
    agent = Agent(ctx, args.name, topics, pub=args.pub, router=args.router,
                  db_path=os.path.join(args.home, f'semaphore-{args.name}.db'), sync_interval=args.sync_interval)
    sem = Semaphore(agent, jobs, name=args.name, url=args.url)
    signal.signal(signal.SIGTERM, sem.request_stop)
    signal.signal(signal.SIGINT, sem.request_stop)
    log.info('semaphore %s up: jobs %s', args.name, ', '.join(sorted(sem.jobs)))
    sem.run()
    agent.close()
    ctx.term()
    return 0


if __name__ == '__main__':
    sys.exit(main())
