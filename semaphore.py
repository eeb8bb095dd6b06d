#!/usr/bin/env python3
"""jobz semaphore: counts completions of semaphore jobs and releases each gate exactly once."""
import logging
import os
import signal
import sys

import zmq

from jobz import defaults
from jobz.agent import Agent
from jobz.cli import Parser, home_or_exit, load_or_exit, setup_logging
from jobz.semaphore import Semaphore
from jobz.tls import client_context

log = logging.getLogger('jobz.semaphore')


def parse_args(argv=None):
    ap = Parser(description=__doc__)
    ap.option('--name', env='JOBZ_NAME', default=defaults.HOSTNAME + '-semaphore',
              help='semaphore name, unique among workers (its counts are kept under it)')
    ap.jobs_option()
    ap.option('--topics', env='JOBZ_TOPICS', default=None, shown='the topics of every semaphore job',
              help='comma-separated semaphore topics to count (several semaphores can share the gates out)')
    ap.agent_options()
    return ap.parse_agent_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args, f'semaphore:{args.name}')
    jobs = load_or_exit(args.jobs, log)
    ours = sorted({j.topic for j in jobs.values() if j.semaphore})
    if not ours:
        sys.exit('error: the job files define no semaphore job')
    topics = sorted({t.strip() for t in (args.topics or '').split(',') if t.strip()}) or ours
    if set(topics) - set(ours):
        sys.exit(f'error: --topics: no semaphore job has topic {", ".join(sorted(set(topics) - set(ours)))}')
    home_or_exit(args.home)
    urls = [u.strip() for u in args.url.split(',') if u.strip()]    # several front ends: the first first
    ctx = zmq.Context()
    agent = Agent(ctx, args.name, topics, pub=args.pub, router=args.router,
                  db_path=os.path.join(args.home, f'semaphore-{args.name}.db'), sync_interval=args.sync_interval,
                  rcvhwm=args.rcvhwm, curve_secret=args.curve_secret, broker_key=args.broker_key,
                  tls=client_context(args.tls_cert, args.tls_key, args.tls_ca), fronts=urls)
    sem = Semaphore(agent, jobs, name=args.name, url=urls[0])
    signal.signal(signal.SIGTERM, sem.request_stop)
    signal.signal(signal.SIGINT, sem.request_stop)
    log.info('semaphore %s up: jobs %s', args.name, ', '.join(sorted(sem.jobs)))
    sem.run()
    agent.close()
    ctx.term()
    return 0


if __name__ == '__main__':
    sys.exit(main())
