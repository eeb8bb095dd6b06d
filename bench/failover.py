#!/usr/bin/env python3
"""Failover: two front ends on one PostgreSQL journal; how long triggers go unanswered when the
active one dies.

A throwaway PostgreSQL cluster (jobz/postgres.py), front ends a and b (Mongrel2 and a broker
each) and two workers connected to both. A client sends keyed triggers at --rate/s, each to the
front end that answered last and, if that one is down or standing by, to the other (as a cron
line with two URLs does). Then --kills times: the active front end's broker and Mongrel2 are
SIGKILLed (its host dies) while the triggers go on; failover = the last 200 from the old active
front end -> the first 200 from the new one. The killed front end is started again and stands
by; the next kill takes the other one. Afterwards every accepted run is checked to have run once
on each worker.

Usage: .venv/bin/python bench/failover.py [--kills 5] [--rate 50]
"""
import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

import common
import stacks
from jobz.harness import TwoFronts, http_or_down, wait_for
from jobz.postgres import Cluster

RATE = 50.0    # keyed triggers per second
JOBS_YAML = """
count:
  command: "true"
"""


class Client(threading.Thread):
    """Keyed triggers at `rate`/s to whichever front end is active; when each got its 200s."""

    def __init__(self, urls: list[str], rate: float):
        super().__init__(daemon=True)
        self.urls, self.rate = list(urls), rate
        self.ok: list[tuple[float, str, str]] = []    # (time answered, front end, run id)
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.wait(1 / self.rate):
            i += 1
            while not self.stop.is_set():    # this trigger until one front end takes it
                for url in list(self.urls):
                    status, body = http_or_down(f'{url}/job_start?job_name=count&key=t{i}', timeout=10)
                    if status == 200:
                        self.ok.append((time.monotonic(), url, body['run_id']))
                        self.urls.remove(url)
                        self.urls.insert(0, url)    # ask it first next time
                        break
                else:
                    time.sleep(0.01)
                    continue
                break


def measure(kills: int, rate: float) -> dict[str, float]:
    """The kills, in a folder of their own (removed after): their logs hold the failovers' warnings."""
    cluster = Cluster().start()
    tmp = tempfile.mkdtemp(prefix='jobz-failover-')
    fronts = TwoFronts(tmp, JOBS_YAML, cluster.new_database())
    client = None
    try:
        fronts.start(('w1', 'w2'), semaphore=False)
        client = Client([fronts.a.url, fronts.b.url], rate)
        client.start()
        times = []
        active, standby = fronts.a, fronts.b
        for _ in range(kills):
            wait_for(lambda: sum(1 for _, u, _ in client.ok if u == active.url) >= 20, 30, 'triggers on the active')
            killed = time.monotonic()
            active.stop('broker', signal.SIGKILL)
            active.stop('mongrel2', signal.SIGKILL)
            wait_for(lambda: any(u == standby.url and t > killed for t, u, _ in client.ok), 30, 'the standby taking over')
            last_old = max(t for t, u, _ in client.ok if u == active.url and t <= killed)
            first_new = min(t for t, u, _ in client.ok if u == standby.url and t > killed)
            times.append(first_new - last_old)
            TwoFronts.start_front(active, standby)    # the dead one comes back and stands by
            active, standby = standby, active
        client.stop.set()
        client.join(30)
        run_ids = [r for _, _, r in client.ok]
        stacks.wait_final(fronts.a.journal, run_ids, [], 120.0, per_run=2)
    except BaseException:
        print(f'failover: kept {tmp} (the front ends\' logs) to see why', file=sys.stderr)
        tmp = None
        raise
    finally:
        if client:
            client.stop.set()
        fronts.stop()
        cluster.remove()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {'failover: last 200 from the old → first 200 from the new, median (s)': statistics.median(times),
            'failover, slowest (s)': max(times), 'failover, fastest (s)': min(times),
            'kills': len(times), 'triggers accepted, each run once per worker': len(run_ids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--kills', type=int, default=5, help='front ends killed, one after the other (default: 5)')
    ap.add_argument('--rate', type=float, default=RATE, help=f'keyed triggers per second (default: {RATE:g})')
    args = ap.parse_args(argv)
    os.environ.setdefault('JOBZ_LOG_LEVEL', 'warning')
    out = measure(args.kills, args.rate)
    print('| measure | value |\n|---|---:|\n' + '\n'.join(f'| {k} | {common.fmt(v)} |' for k, v in out.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
