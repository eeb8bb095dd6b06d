#!/usr/bin/env python3
"""What security costs: the same triggers over plain HTTP, and over HTTPS with CURVE.

Each round starts two fresh stacks one after the other on free loopback ports: plain (HTTP
front end, no CURVE) and secure (Mongrel2's HTTPS server with a client certificate from our
own CA for every trigger, CURVE between the broker and workers w1 and w2). Both are driven by
the same client (--connections keep-alive connections in threads, http.client), so only the
security differs:

- throughput: --n triggers alternating bench_a (w1) and bench_b (w2), each running `true`;
  jobs/s = n / (last command finished - first trigger sent), and triggers answered per second;
- latency: --latency-n triggers paced at --rate/s: trigger -> command start, and HTTP answer.

Usage: .venv/bin/python bench/secure.py [--n 2000] [--rate 50] [--latency-n 300] [--repeat 3]
"""
import argparse
import contextlib
import http.client
import io
import shutil
import ssl
import sys
import tempfile
import time

import common
import stacks
from jobz import ca, keys

JOBS_YAML = 'bench_a: {command: "true", topic: a}\nbench_b: {command: "true", topic: b}\n'
WORKERS = {'w1': 'a', 'w2': 'b'}


def make_secrets(folder: str) -> dict:
    """A CA with a server and a client certificate, and CURVE keys for the broker, w1 and w2."""
    secrets = {'ca': f'{folder}/ca', 'keys': f'{folder}/keys', 'enrolled': f'{folder}/enrolled'}
    with contextlib.redirect_stdout(io.StringIO()):
        ca.main(['--dir', secrets['ca'], 'init'])
        ca.main(['--dir', secrets['ca'], 'server', 'jobz-tls', '--host', '127.0.0.1'])
        ca.main(['--dir', secrets['ca'], 'client', 'bench'])
        for name in ('broker', *WORKERS):
            keys.main(['new', name, '--dir', secrets['keys']])
        for name in WORKERS:
            keys.main(['enroll', f"{secrets['keys']}/{name}.key", '--enrolled', secrets['enrolled']])
    secrets['context'] = ssl.create_default_context(cafile=f"{secrets['ca']}/ca.crt")
    secrets['context'].load_cert_chain(f"{secrets['ca']}/clients/bench.crt", f"{secrets['ca']}/clients/bench.key")
    return secrets


def start(folder: str, secrets: dict | None):
    """A stack with w1 and w2; with secrets, HTTPS in front and CURVE behind. Returns (stack, connect)."""
    stack = stacks.make_stack(folder, JOBS_YAML)
    if secrets:
        stack.tls = secrets['ca']
        stack.broker_args = ['--curve-secret', f"{secrets['keys']}/broker.key_secret",
                             '--enrolled', secrets['enrolled']]
    stack.start_broker()
    for name, topic in WORKERS.items():
        curve = ['--curve-secret', f"{secrets['keys']}/{name}.key_secret",
                 '--broker-key', f"{secrets['keys']}/broker.key"] if secrets else []
        stack.start_worker(name, '--topics', topic, *curve)
    stack.start_mongrel2()
    stack.wait_healthy(30.0, workers=len(WORKERS))
    if not secrets:
        return stack, stacks.plain(stack)
    return stack, lambda: http.client.HTTPSConnection('127.0.0.1', stack.tls_port, timeout=60,
                                                      context=secrets['context'])


def measure(folder: str, args, secrets: dict | None) -> dict[str, float]:
    label = 'secure' if secrets else 'plain'
    stack, connect = start(folder, secrets)
    try:
        queries = [f'job_name=bench_{"ab"[i % 2]}' for i in range(args.n)]
        began = time.time()
        sent = stacks.send_many(stack, queries, args.connections, connect)
        answered = args.n / (time.time() - began)
        results = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), max(60.0, args.n / 10))
        throughput = args.n / (max(r[0][2] for r in results.values()) - began)
        sent, answer_ms = stacks.send_paced(stack, queries[:args.latency_n], args.rate, connect)
        results = stacks.wait_final(stacks.journal(stack), sent, stack.procs.values(), 60.0)
        start_ms = [(results[run_id][0][1] - t) * 1000 for run_id, t in sent.items()]
    finally:
        stack.stop_all()
    return {f'{label}: throughput (jobs/s)': throughput,
            f'{label}: triggers answered (req/s)': answered,
            f'{label}: trigger → command start p50 (ms)': common.percentile(start_ms, 50),
            f'{label}: trigger → command start p99 (ms)': common.percentile(start_ms, 99),
            f'{label}: HTTP answer p50 (ms)': common.percentile(answer_ms, 50),
            f'{label}: HTTP answer p99 (ms)': common.percentile(answer_ms, 99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=2000, help='triggers for throughput (default: 2000)')
    ap.add_argument('--rate', type=float, default=50.0, help='paced triggers per second (default: 50)')
    ap.add_argument('--latency-n', type=int, default=300, help='paced triggers (default: 300)')
    ap.add_argument('--connections', type=int, default=4, help='client connections (default: 4)')
    ap.add_argument('--repeat', type=int, default=3, help='rounds (default: 3)')
    args = ap.parse_args(argv)
    if shutil.which('mongrel2') is None:
        sys.exit('error: mongrel2 is not installed (apt-get install mongrel2-core)')

    def one_round(tmp: str, k: int) -> dict[str, float]:
        secrets = make_secrets(tempfile.mkdtemp(dir=tmp))
        return (measure(tempfile.mkdtemp(dir=tmp), args, None)
                | measure(tempfile.mkdtemp(dir=tmp), args, secrets))
    rounds, problems = common.run_rounds('jobz-secure-', args.repeat, one_round, stacks.M2_NOISE)
    common.print_report(f'{args.n} triggers over {args.connections} connections, {args.latency_n} paced at '
                        f'{args.rate:g}/s, {args.repeat} round(s), plain vs HTTPS + client certificate + CURVE',
                        rounds, problems)
    return 0


if __name__ == '__main__':
    sys.exit(main())
