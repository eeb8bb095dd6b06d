"""make bench's targets (the issues' speed goals), judged on one run's results: bench/run.py's report.

Apart from run.py so that they can be checked without the peers (Celery, RQ) installed."""
import growth

# The peers' measures, as bench/peers.py names them.
CELERY, RQ_FORK, RQ_SIMPLE = 'Celery+Redis prefork', 'RQ Worker (fork per job)', 'RQ SimpleWorker'
RAW = 'raw subprocess `true`, 2 procs (jobs/s)'


def targets(jobz: dict, peer: dict, fronts: dict, grown: dict, floors: dict, rounds: dict, args) -> list[str]:
    """The issue's targets, judged on the medians of this run (and on each round where they say so).

    `rounds`: the per-round results, 'jobz', 'peers' and 'front end' (round k of each ran together)."""
    def med(summary, metric):
        return summary[metric][0]
    thr = med(jobz, 'throughput `true` (jobs/s)')
    p50, p99 = med(jobz, 'trigger → command start p50 (ms)'), med(jobz, 'trigger → command start p99 (ms)')
    spawn = 2000 / med(peer, 'raw subprocess `/bin/sh -c true`, 2 procs (jobs/s)')    # CPU ms per spawn
    each_round = [j['throughput `true` (jobs/s)'] / c[f'{CELERY} throughput (jobs/s)']
                  for j, c in zip(rounds['jobz'], rounds['peers'])]
    # (target, value in this run, unit, met?)
    checks = [
        ('fan-in: last job done → follow-up start ≤ Celery\'s', med(jobz, 'fan-in: last job done → follow-up start (ms)')
         / med(peer, 'Celery chord: last task done → callback start (ms)'), '×', lambda v: v <= 1.0),
        ('fan-in of 100 ≤ ½ of the Celery chord',
         med(jobz, 'fan-in of 100: submit → follow-up done (ms)')
         / med(peer, 'Celery chord of 100: submit → callback done (ms)'), '×', lambda v: v <= 0.5),
        ("jobz's own CPU per job ≤ 0.45 ms (CPU per `true` job − the spawn's)",
         med(jobz, 'CPU per job, `true` (ms)') - spawn, 'ms', lambda v: v <= 0.45),
        ('throughput ≥ 2 × Celery in every round (the lowest round)', min(each_round), '×', lambda v: v >= 2.0),
        ('throughput ≥ 60 % of the raw spawn limit', thr / med(peer, RAW), '×', lambda v: v >= 0.6),
        ('trigger → start p50 within 10 % of the floor (bench/floor.py)',
         p50 / floors['floor: trigger → command start p50 (ms)'], '×', lambda v: v <= 1.1),
        ('trigger → start p99 ≤ 2 × p50 at 50/s', p99 / p50, '×', lambda v: v <= 2.0),
        ('`/job_start` under wrk: p99 ≤ 10 ms in every round (the highest round)',
         max(r['jobz /job_start via Mongrel2 p99 (ms)'] for r in rounds['front end']), 'ms', lambda v: v <= 10),
        ('HTTP triggers accepted ≥ 25 % of the bare handler', med(fronts, 'ratio jobz /job_start / bare'), '×',
         lambda v: v >= 0.25),
    ]
    lo, hi = growth.short(args.base), growth.short(args.runs)
    for name in ('broker', 'w1', 'w2'):
        checks.append((f'{name} memory flat within 10 % from {lo} to {hi} runs',
                       grown[f'{name} RSS growth {lo} → {hi} (%)'], '%', lambda v: abs(v) <= 10))
    checks.append((f'catch-up of {args.catchup:,} calls < 3 s', grown[f'catch-up of {args.catchup:,} calls (s)'],
                   's', lambda v: v < 3))
    return ['| target | this run | |', '|---|---:|---|'] + [
        f'| {what} | {value:.2f} {unit} | {"met" if met(value) else "**missed**"} |'
        for what, value, unit, met in checks]
