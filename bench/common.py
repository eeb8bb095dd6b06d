"""What every benchmark script shares: processes, percentiles, the machine, the table.

Free ports, stacks and waiting with a deadline come from jobz.harness, as for the tests."""
import contextlib
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def percentile(values, q: float) -> float:
    """Nearest-rank percentile, q in 0..100."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@contextlib.contextmanager
def started(cmd: list[str], log: str, **kw):
    """Run cmd in a new session (so Ctrl-C reaches only us) and always stop it afterwards."""
    with open(log, 'ab') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kw)
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the process (warm shutdown), then SIGKILL to whatever is left in its group.

    We wait for the leader without reaping it, so its pid (which is also the group id) cannot be
    reused before the final killpg. A Ctrl-C while waiting skips to the SIGKILL. A process that
    was already reaped (say by a poll() that saw it die) is left alone: its ids may be reused."""
    if proc.returncode is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)    # not send_signal(): it reaps a dead process first
        end = time.monotonic() + grace
        while (os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
               and time.monotonic() < end):
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (VmRSS)."""
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and the children it has waited for (commands) have used so far."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf('SC_CLK_TCK')


def machine() -> str:
    model = 'unknown CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    mem = '?'
    with contextlib.suppress(OSError), open('/proc/meminfo') as f:
        mem = f'{int(f.readline().split()[1]) / 2**20:.1f} GiB RAM'
    return (f'{os.cpu_count()} CPUs (nproc), {model}, {mem}, {platform.platform(terse=True)}, '
            f'Python {platform.python_version()}')


def summarize(rounds: list[dict]) -> dict[str, tuple[float, float, float]]:
    """metric -> (median, min, max) over the rounds that measured it."""
    metrics = list(dict.fromkeys(m for r in rounds for m in r))
    out = {}
    for metric in metrics:
        values = [r[metric] for r in rounds if metric in r]
        out[metric] = (statistics.median(values), min(values), max(values))
    return out


def fmt(value: float) -> str:
    return f'{value:,.0f}' if abs(value) >= 100 else f'{value:.2f}'


def table(rounds: list[dict]) -> str:
    """A markdown table: metric, median, min – max."""
    lines = ['| metric | median | min – max |', '|---|---:|---:|']
    for metric, (med, low, high) in summarize(rounds).items():
        lines.append(f'| {metric} | {fmt(med)} | {fmt(low)} – {fmt(high)} |')
    return '\n'.join(lines)


def log_problems(folder: str, words=('level=warning', 'level=error', 'WARNING', 'ERROR', 'Traceback'),
                 noise=()) -> list[str]:
    """Warning/error lines in the *.log and *.out files under folder, minus known noise."""
    found = []
    for path, _, files in os.walk(folder):
        for name in sorted(f for f in files if f.endswith(('.log', '.out'))):
            with open(os.path.join(path, name), errors='replace') as f:
                found += [f'{name}: {line.rstrip()}' for line in f
                          if any(w in line for w in words) and not any(n in line for n in noise)]
    return found


def run_rounds(prefix: str, repeat: int, measure, noise=()) -> tuple[list[dict], list[str]]:
    """measure(tmp, k) for k in range(repeat), in a temp folder removed afterwards.

    Returns (the rounds' metrics, warning/error lines of the logs left in the folder)."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        rounds = []
        for k in range(repeat):
            rounds.append(measure(tmp, k))
            print(f'round {k + 1}/{repeat}: ' + ', '.join(f'{v:.1f}' for v in rounds[-1].values()),
                  file=sys.stderr, flush=True)
        return rounds, log_problems(tmp, noise=noise)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_report(header: str, rounds: list[dict], problems=(), footer=()) -> None:
    """The header line, the table, the machine, footer lines, then any problems from the logs."""
    print(header + '\n\n' + table(rounds) + '\n\n' + machine())
    for line in footer:
        print(line)
    if problems:
        print(f'\n{len(problems)} warning/error line(s) in the logs, first ones:\n' + '\n'.join(problems[:10]))
