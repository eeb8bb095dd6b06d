"""A broker that lies (a fake one, or a compromised one) can make a worker run only what the
worker's own job files allow: its rules, its topics, run ids that name no other file."""
import os
import subprocess
import sys
import time

import zmq

from conftest import ROOT, wait_for
from jobz import protocol as p

JOBS = r"""
files:
  command: "echo files %(path)s >> {out}/ran.txt"
  params: {path: '[a-z]+'}
dated:
  command: "echo dated %(date)s >> {out}/ran.txt"
  params: {date: '\d{4}_\d{2}_\d{2}'}
echoing:
  command: "echo echoing %(word)s >> {out}/ran.txt"
  topic: t
"""
GOOD = '20261201-000000-0000000000aa'
# (run id, job, topic, params, what it tries)
LIES = [
    ('20261201-000000-000000000001', 'files', 'files', {'path': '/data/../../etc/shadow'}, 'a value its rule forbids'),
    ('20261201-000000-000000000002', 'dated', 'dated', {'date': '--help'}, 'an option for a date'),
    ('20261201-000000-000000000003', 'echoing', 't', {'word': ''}, 'an empty value (a shell word less)'),
    ('20261201-000000-000000000004', 'files', 'dated', {'path': 'abc'}, 'a job sent on another topic'),
    ('..', 'echoing', 't', {'word': 'dots'}, 'a run id that names a folder'),
    ('20261201-000000-000000000006', 'echoing', 't', {'word': 'x', 'a=b': 'c'}, 'a name with ='),
    ('20261201-000000-000000000007', 'echoing', 't', {'word': 'x', 'run_id': 'r'}, 'a built-in as a parameter'),
]


def test_a_lying_broker_gets_nothing_the_workers_rules_forbid(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    jobs = tmp_path / 'jobs.yaml'
    jobs.write_text(JOBS.replace('{out}', str(out)))
    ctx = zmq.Context()
    pub, router = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    for sock in (pub, router):
        sock.linger = 0
        sock.bind('tcp://127.0.0.1:0')
    worker = subprocess.Popen([sys.executable, os.path.join(ROOT, 'worker.py'), '--name', 'w1',
                               '--jobs', str(jobs), '--home', str(tmp_path / 'home'),
                               '--pub', pub.last_endpoint.decode(), '--router', router.last_endpoint.decode()],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert router.poll(15000), 'no SYNC from the worker'
        ident, verb, _ = router.recv_multipart()
        assert verb == p.SYNC
        calls = [{'run_id': run_id, 'job': job, 'topic': topic, 'seq': seq, 'params': params, 'key': None,
                  'created': time.time()}
                 for seq, (run_id, job, topic, params, _) in enumerate(LIES, 1)]
        calls.append({'run_id': GOOD, 'job': 'echoing', 'topic': 't', 'seq': len(calls) + 1,
                      'params': {'word': 'fine'}, 'key': None, 'created': time.time()})
        router.send_multipart([ident, p.CALLS, p.pack({'calls': calls, 'cursors': {}, 'more': False})])
        results = {}

        def all_reported():
            while router.poll(100):
                frames = router.recv_multipart()
                if frames[1] == p.RESULT:
                    msg = p.unpack(frames[2])
                    results[msg['run_id']] = msg
            return len(results) == len(calls)
        wait_for(all_reported, timeout=20, what='a result for every call')
        assert worker.poll() is None, 'the worker died on a call'
        assert results[GOOD]['state'] == 'succeeded'
        for run_id, _, _, _, what in LIES:
            assert results[run_id]['state'] == 'failed', what
            assert results[run_id]['reason'].startswith('refused'), (what, results[run_id]['reason'])
        assert (out / 'ran.txt').read_text().splitlines() == ['echoing fine']
    finally:
        worker.terminate()
        worker.wait(15)
        pub.close()
        router.close()
        ctx.term()
