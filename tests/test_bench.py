"""The jobz benchmark still runs against the real stack (no speeds asserted: those are for bench/)."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_dispatch_benchmark_runs_and_reports_every_measure():
    got = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'dispatch.py'), '--n', '60',
                          '--latency-n', '10', '--rate', '100', '--repeat', '1', '--fan-ins', '1'],
                         capture_output=True, text=True, timeout=110)
    assert got.returncode == 0, got.stderr[-3000:]
    rows = dict(re.findall(r'^\| (.+?) \| ([\d,.]+) \|', got.stdout, re.M))
    for measure in ('throughput `true` (jobs/s)', 'throughput no-op (jobs/s)', 'trigger → command start p50 (ms)',
                    'fan-in of 100: submit → follow-up done (ms)', 'broadcast to 20: trigger → all started (ms)',
                    'CPU per job, `true` (ms)', 'CPU per fan-in part, job + arrival (ms)'):
        assert float(rows[measure].replace(',', '')) > 0, got.stdout
    assert 'warning/error line' not in got.stdout, got.stdout


def test_scale_benchmark_runs_and_reports_every_table():
    got = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'scale.py'), '--no-celery', '--pool-sizes', '1,2',
                          '--sizes', '3', '--n', '100'], capture_output=True, text=True, timeout=170)
    assert got.returncode == 0, got.stderr[-3000:]
    rows = {r[0]: r[1:] for r in re.findall(r'^\| ([^|]+?) \| ([\d,.]+)(?: %)? \| ([\d,.]+)(?: %| ms)? \|', got.stdout, re.M)}
    for row in ('1 × 4', '2 × 4', '2 × 4 (Celery -c 8)', '2 × 16 (Celery -c 32)', '3'):
        assert float(rows[row][0].replace(',', '')) > 0 and float(rows[row][1].replace(',', '')) > 0, got.stdout
    assert 'pool efficiency ≥ 90 % up to 2 workers' in got.stdout and '3 workers: idle broker' in got.stdout
    assert 'warning/error line' not in got.stdout, got.stdout


def test_failover_benchmark_kills_a_front_end_and_reports_the_time():
    got = subprocess.run([sys.executable, os.path.join(ROOT, 'bench', 'failover.py'), '--kills', '2'],
                         capture_output=True, text=True, timeout=110)
    assert got.returncode == 0, got.stderr[-3000:]
    rows = dict(re.findall(r'^\| (.+?) \| ([\d,.]+) \|', got.stdout, re.M))
    assert 0 < float(rows['failover: last 200 from the old → first 200 from the new, median (s)']) < 30, got.stdout
    assert rows['kills'] == '2.00' and float(rows['triggers accepted, each run once per worker']) > 0, got.stdout
