#!/usr/bin/env python3
"""A/B: two checkouts of jobz on the same measures, rounds interleaved, in one sitting.

For one change at a time: make a checkout without it (`git worktree add /tmp/before HEAD~1`)
and compare it with this one. Each round starts a stack of bench/dispatch.py's jobs from one
checkout (its own code and its own bench/dispatch.py), measures throughput of `true` and the CPU
it took, then fan-ins of 100 (whole, last hop, CPU per part); the order alternates (A B, B A,
…) so that the machine's drift hits both alike. Prints each round and a table of medians with
the ratio B ÷ A.

Usage: .venv/bin/python bench/ab.py BEFORE AFTER [--pairs 4] [--fan-ins 7]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import common

# Runs inside the checkout under test: its own jobz and its own bench/dispatch.py.
ROUND = """
import json, os, shutil, statistics, sys, tempfile
sys.path[:0] = [{tree!r}, os.path.join({tree!r}, 'bench')]
import dispatch, stacks
tmp = tempfile.mkdtemp(prefix='jobz-ab-')
stack = stacks.make_stack(tempfile.mkdtemp(dir=tmp), dispatch.JOBS_YAML, 4)
out = {{}}
try:
    stacks.start(stack, dispatch.WORKERS, dispatch.SEMAPHORES)
    dispatch.throughput(stack, ('bench_a', 'bench_b'), 100)    # warm-up
    out['throughput `true` (jobs/s)'], out['CPU per job, `true` (ms)'] = dispatch.cpu_ms(
        stack, {n}, lambda: dispatch.throughput(stack, ('bench_a', 'bench_b'), {n}))
    dispatch.fan_in(stack, 'warm')
    fans, out['CPU per fan-in part (ms)'] = dispatch.cpu_ms(
        stack, {fans} * dispatch.FAN_IN, lambda: [dispatch.fan_in(stack, f'ab{{k}}') for k in range({fans})])
    out['fan-in of 100 (ms)'] = statistics.median(f[0] for f in fans)
    out['fan-in: last job done → follow-up start (ms)'] = statistics.median(f[1] for f in fans)
finally:
    stack.stop_all()
    shutil.rmtree(tmp, ignore_errors=True)
print(json.dumps(out))
"""


def one_round(tree: str, args) -> dict:
    code = ROUND.format(tree=os.path.abspath(tree), n=args.n, fans=args.fan_ins)
    got = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, JOBZ_LOG_LEVEL='warning'))
    if got.returncode:
        sys.exit(f'error: a round in {tree} failed:\n{got.stderr[-3000:]}')
    return json.loads(got.stdout.splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('before', help='checkout A (without the change)')
    ap.add_argument('after', help='checkout B (with it)')
    ap.add_argument('--pairs', type=int, default=4, help='rounds of each (default: 4)')
    ap.add_argument('--n', type=int, default=2000, help='jobs for throughput (default: 2000)')
    ap.add_argument('--fan-ins', type=int, default=7, help='fan-ins per round (default: 7)')
    args = ap.parse_args(argv)
    for tree in (args.before, args.after):
        if not os.path.exists(os.path.join(tree, 'bench', 'dispatch.py')):
            sys.exit(f'error: {tree} is not a jobz checkout (no bench/dispatch.py)')
    rounds = {'A': [], 'B': []}
    for k in range(args.pairs):
        for name in ('AB' if k % 2 == 0 else 'BA'):
            got = one_round(args.before if name == 'A' else args.after, args)
            rounds[name].append(got)
            print(f'round {k + 1} {name}: ' + ', '.join(f'{m} {common.fmt(v)}' for m, v in got.items()),
                  file=sys.stderr, flush=True)
    print(f'A: {args.before}\nB: {args.after}\n{args.pairs} rounds each, interleaved; medians\n')
    print('| measure | A | B | B ÷ A |\n|---|---:|---:|---:|')
    for metric in rounds['A'][0]:
        a, b = (statistics.median(r[metric] for r in rounds[x]) for x in 'AB')
        print(f'| {metric} | {common.fmt(a)} | {common.fmt(b)} | {b / a:.2f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
