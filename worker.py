#!/usr/bin/env python3
"""jobz worker: connects out to the broker and runs its own command for each call of its topics."""
import logging
import os
import signal
import sys

import zmq

from jobz import defaults
from jobz.agent import Agent
from jobz.cli import Parser, home_or_exit, load_or_exit, setup_logging
from jobz.jobfile import NAME_RE
from jobz.worker import Worker
from jobz.tls import client_context

log = logging.getLogger('jobz.worker')


def parse_args(argv=None):
    ap = Parser(description=__doc__)
    ap.option('--name', env='JOBZ_NAME', default=defaults.HOSTNAME,
              help='worker name, unique among workers (its state is kept under it)')
    ap.jobs_option()
    ap.option('--topics', env='JOBZ_TOPICS', default=None, shown='the topics of the jobs with a command',
              help='comma-separated topics to subscribe to')
    ap.agent_options()
    ap.option('--concurrency', env='JOBZ_CONCURRENCY', default=os.cpu_count() or 1, type=int,
              shown='the number of CPUs', help='jobs run at once')
    ap.option('--kill-grace', env='JOBZ_KILL_GRACE', default=5.0, type=float,
              help='seconds between TERM and KILL when a job times out')
    ap.option('--output-tail', env='JOBZ_OUTPUT_TAIL', default=4096, type=int,
              help='characters of output shown in a run\'s status')
    ap.option('--output-max', env='JOBZ_OUTPUT_MAX', default=262144, type=int,
              help='characters of output kept per run (the start is dropped first), for /job_output')
    args = ap.parse_agent_args(argv)
    if args.concurrency < 1:
        ap.error('--concurrency must be at least 1')
    if not 0 <= args.output_tail <= args.output_max <= 1 << 20:
        ap.error('need 0 <= --output-tail <= --output-max <= 1048576')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args, f'worker:{args.name}')
    jobs = load_or_exit(args.jobs, log)
    topics = args.topics.split(',') if args.topics else sorted({j.topic for j in jobs.values() if j.command})
    topics = [t.strip() for t in topics if t.strip()]
    bad = [t for t in topics if not NAME_RE.match(t)]
    if bad or not topics:
        sys.exit(f'error: no usable topics ({", ".join(bad) or "the job files define no command jobs"})')
    home_or_exit(args.home)
    urls = [u.strip() for u in args.url.split(',') if u.strip()]    # several front ends: the first first
    ctx = zmq.Context()
    agent = Agent(ctx, args.name, topics, pub=args.pub, router=args.router,
                  db_path=os.path.join(args.home, f'worker-{args.name}.db'), sync_interval=args.sync_interval,
                  rcvhwm=args.rcvhwm, curve_secret=args.curve_secret, broker_key=args.broker_key,
                  tls=client_context(args.tls_cert, args.tls_key, args.tls_ca), fronts=urls,
                  slots=args.concurrency)
    worker = Worker(agent, jobs, name=args.name, url=urls[0],
                    concurrency=args.concurrency, kill_grace=args.kill_grace, output_tail=args.output_tail,
                    output_max=args.output_max)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    log.info('worker %s up: topics %s, concurrency %d, broker %s', args.name, ', '.join(topics),
             args.concurrency, args.router)
    worker.run()
    agent.close()
    ctx.term()
    log.info('worker %s stopped', args.name)
    return 0


if __name__ == '__main__':
    sys.exit(main())
