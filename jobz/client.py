"""The `jobz` command line: start runs and wait for them, read their status and output, list the rest."""
import argparse
import http.client
import json
import os
import re
import secrets
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from . import defaults, protocol as p
from .tls import client_context

RESERVED = {'job_name': 'the job is the first argument', 'wait': 'use --wait', 'key': 'use --key'}
POLL = 0.3          # seconds between status requests while waiting or following
EXIT_TIMEOUT = 3


class Failure(Exception):
    """Printed as `jobz: error: MESSAGE`; exit status 1."""


class Api:
    """GET requests to the front end, answered with JSON. With several front ends (one active, the
    others standing by), a request that finds one down or standing by (503) goes to the next."""

    def __init__(self, urls: list[str], context: ssl.SSLContext | None, hint: str = '', timeout: float = 30.0):
        self.urls, self.context, self.hint, self.timeout = list(urls), context, hint, timeout

    @property
    def url(self) -> str:
        return self.urls[0]    # the one that answered last

    def get(self, path: str, **query) -> dict:
        query = {k: v for k, v in query.items() if v is not None}
        tail = f'{path}?{urllib.parse.urlencode(query)}' if query else path
        for i, base in enumerate(self.urls):
            last = i == len(self.urls) - 1
            try:
                with urllib.request.urlopen(base + tail, timeout=self.timeout, context=self.context) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                if e.code == 503 and not last:
                    continue    # standing by (or its journal away): the next front end
                raise Failure(error_message(e.code, e.read())) from None
            except (OSError, http.client.HTTPException) as e:    # refused, reset, timeout, TLS handshake
                if not last:
                    continue
                reason = getattr(e, 'reason', None) or e
                tried = f' (and {", ".join(self.urls[:-1])})' if len(self.urls) > 1 else ''
                raise Failure(f'cannot reach {base}{tried}: {reason}{self.hint}') from None
            self.urls = [base] + [u for u in self.urls if u != base]    # ask this one first next time
            try:
                return json.loads(body)
            except ValueError:
                raise Failure(f'{base + tail}: the answer is not JSON: {body[:200]!r}') from None


def error_message(status: int, body: bytes) -> str:
    """The broker's `error`, or (Mongrel2 answers some errors itself, in plain text) the text."""
    try:
        return str(json.loads(body)['error'])
    except (ValueError, KeyError, TypeError):
        return f'HTTP {status}: {body.decode("utf-8", "replace").strip()[:200] or "no message"}'


# -- formatting ------------------------------------------------------------
def when(t: float | None) -> str:
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t)) if t else '-'


def seconds(s: float | None) -> str:
    if s is None:
        return '-'
    if s < 10:
        return f'{s:.2f}s'
    if s < 60:
        return f'{s:.1f}s'
    if s < 3600:
        return f'{int(s // 60)}m{int(s % 60):02d}s'
    return f'{int(s // 3600)}h{int(s % 3600 // 60):02d}m'


def table(header: list[str], rows: list[list]) -> str:
    rows = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def params_text(params: dict) -> str:
    return ' '.join(f'{k}={v}' for k, v in params.items()) or '-'


def done_count(workers: dict) -> str:
    """`1/2` from {worker: state} or {worker: {"state": ...}}."""
    states = [w['state'] if isinstance(w, dict) else w for w in workers.values()]
    return f'{sum(s in p.FINAL_STATES for s in states)}/{len(states)}'


def worker_line(name: str, w: dict) -> str:
    exit_ = w['signal'] or (f"rc {w['rc']}" if w['rc'] is not None else '')
    reason = w['reason'] if w['reason'] and w['reason'] != f"exit code {w['rc']}" else ''
    parts = [name, w['state'], exit_, seconds(w['duration']) if w['duration'] is not None else '', reason]
    return '  ' + '  '.join(part for part in parts if part)


def show(answer) -> None:
    print(json.dumps(answer, indent=2))


# -- commands ----------------------------------------------------------------
def cmd_start(api: Api, args) -> int:
    key = args.idempotency_key
    if key is None and len(api.urls) > 1:
        # It may be tried on another front end after the first one took it and died before
        # answering: a key of its own makes that start it at most once.
        key = f'jobz-start-{secrets.token_hex(8)}'
    run = api.get('/job_start', job_name=args.job, **args.params, key=key)
    run_id = run['run_id']
    if run['sanitized']:
        print(f"jobz: warning: characters removed from {', '.join(run['sanitized'])}", file=sys.stderr)
    if run.get('queued'):    # a pool job (run_on: one) with no worker of its topic free right now
        where = f"queued for a free worker of topic {run['topic']!r}"
    else:
        where = f"on {', '.join(run['workers']) or 'no worker yet'}"
        if not run['workers'] and not run['existing']:
            print(f"jobz: warning: no live worker takes topic {run['topic']!r}; the run waits for one",
                  file=sys.stderr)
    if not args.wait:
        if args.json:
            show(run)
        else:
            again = ' (already started with this key)' if run['existing'] else ''
            print(f"run {run_id}: job {run['job']} {where}{again}")
        return 0
    status = wait(api, run_id, args.timeout)
    if args.json:
        show(status)
    if status['state'] not in p.RUN_ENDED:
        print(f"jobz: run {run_id} still {status['state']} after {args.timeout:g}s "
              f"({done_count(status['workers'])} workers done); see: jobz status {run_id}", file=sys.stderr)
        return EXIT_TIMEOUT
    if status['state'] == p.SUCCEEDED:
        if not args.json:
            print(f"run {run_id} succeeded on {', '.join(status['workers'])}")
        return 0
    print(f'run {run_id} failed', file=sys.stderr)
    for name, w in status['workers'].items():
        if w['state'] != p.SUCCEEDED:
            print(worker_line(name, w), file=sys.stderr)
            for line in (w['output_tail'] or '').splitlines()[-10:]:
                print(f'    | {line}', file=sys.stderr)
    return 1


def wait(api: Api, run_id: str, timeout: float | None) -> dict:
    """Poll the run until it ends or `timeout` runs out; progress on one line when stderr is a terminal."""
    start = time.monotonic()
    tty = sys.stderr.isatty()
    shown = 0
    try:
        while True:
            status = api.get('/job_status', run_id=run_id)
            elapsed = time.monotonic() - start
            if status['state'] in p.RUN_ENDED or (timeout is not None and elapsed >= timeout):
                return status
            if tty:
                running = sum(w['state'] == p.RUNNING for w in status['workers'].values())
                line = (f"run {run_id}: {done_count(status['workers'])} workers done, "
                        f"{running} running ({elapsed:.1f}s)")
                sys.stderr.write('\r' + line.ljust(shown))
                sys.stderr.flush()
                shown = len(line)
            time.sleep(POLL if timeout is None else max(0.0, min(POLL, timeout - elapsed)))
    finally:
        if shown:
            sys.stderr.write('\r' + ' ' * shown + '\r')
            sys.stderr.flush()


def cmd_status(api: Api, args) -> int:
    s = api.get('/job_status', run_id=args.run)
    if args.json:
        show(s)
        return 0
    print(f"run {s['run_id']}: {s['state']}")
    fields = [('job', f"{s['job']} (topic {s['topic']})"), ('params', params_text(s['params'])),
              ('sanitized', ', '.join(s['sanitized'])), ('key', s['key']), ('created', when(s['created'])),
              ('triggered by', s['triggered_by']), ('parent', s['parent']),
              ('children', ', '.join(s['children']))]
    for label, value in fields:
        if value:
            print(f'{label + ":":14}{value}')
    print('workers:' if s['workers'] else 'workers:     none yet (no live worker took the topic)')
    for name, w in s['workers'].items():
        print(worker_line(name, w))
    if s['notes']:
        print('notes:')
    for n in s['notes']:
        print(f"  {when(n['at'])}  {n['worker'] or '-'}: {n['note']}")
    return 0


def cmd_runs(api: Api, args) -> int:
    runs = api.get('/runs', job=args.job, limit=args.limit)
    if args.json:
        show(runs)
        return 0
    print(table(['RUN', 'JOB', 'STATE', 'CREATED', 'DURATION', 'DONE', 'TRIGGERED BY'],
                [[r['run_id'], r['job'], r['state'], when(r['created']), seconds(r.get('duration')),
                  done_count(r['workers']), r.get('triggered_by') or '-'] for r in runs['runs']]))
    return 0


class Output:
    """Writes workers' output to stdout as it is, each worker headed `==> W <==` (like tail) if several."""

    def __init__(self, several: bool):
        self.several, self.last, self.at_line_start = several, None, True

    def write(self, name: str, text: str) -> None:
        if not text:
            return
        if self.several and name != self.last:
            gap = '' if self.last is None else '\n' if self.at_line_start else '\n\n'
            sys.stdout.write(f'{gap}==> {name} <==\n')
        sys.stdout.write(text)
        sys.stdout.flush()
        self.last, self.at_line_start = name, text.endswith('\n')


def cmd_logs(api: Api, args) -> int:
    offsets: dict[str, int] = {}    # worker -> where its new output starts
    out = None
    while True:
        asks = offsets.items() if offsets else [(args.worker, None)]
        answers = [api.get('/job_output', run_id=args.run, worker=w, offset=n) for w, n in asks]
        workers = {name: w for a in answers for name, w in a['workers'].items()}
        if args.worker and not workers:
            raise Failure(f'run {args.run} has no worker {args.worker!r}')
        if args.json:
            for a in answers:
                print(json.dumps(a) if args.follow else json.dumps(a, indent=2), flush=True)
        if out is None and workers:     # a run's workers are known from its first answer on
            out = Output(several=len(workers) > 1)
        for name, w in workers.items():
            skipped = w['offset'] - offsets.get(name, 0)    # the answer starts later when the start was dropped
            if skipped > 0:
                print(f"jobz: {name}: {skipped} characters of output were not kept (the worker's --output-max)",
                      file=sys.stderr)
            offsets[name] = w['next']
            if not args.json:
                out.write(name, w['output'])
        if not args.follow:
            return 0
        if workers and all(w['complete'] for w in workers.values()):
            status = api.get('/job_status', run_id=args.run)
            return 0 if all(status['workers'][name]['state'] == p.SUCCEEDED for name in workers) else 1
        time.sleep(POLL)


def cmd_workers(api: Api, args) -> int:
    workers = api.get('/workers')
    if args.json:
        show(workers)
        return 0
    rows = []
    for name, w in workers.items():
        lag = sum(w['lag'].values())
        if lag and len(w['lag']) > 1:
            lag = f"{lag} ({' '.join(f'{t}={n}' for t, n in w['lag'].items() if n)})"
        rows.append([name, 'yes' if w['alive'] else 'NO', ','.join(w['topics']),
                     seconds(w['seconds_ago']) + ' ago', lag, w['running']])
    print(table(['NAME', 'ALIVE', 'TOPICS', 'HEARTBEAT', 'LAG', 'RUNNING'], rows))
    return 0


def cmd_jobs(api: Api, args) -> int:
    jobs = api.get('/jobs')
    if args.json:
        show(jobs)
        return 0
    for name, j in jobs.items():
        used = set(re.findall(r'%\((\w+)\)s', j['command'] or '')) - {'job_name', 'run_id'}
        params = []
        for param in sorted(used | set(j['params']) | set(j['defaults'] or {})):
            rule = f" ~ '{j['params'][param]}'" if param in j['params'] else ''
            default = f" (default {j['defaults'][param]})" if param in (j['defaults'] or {}) else ''
            params.append(param + rule + default)
        print(f"{name}  (topic {j['topic']})")
        sem = j['semaphore']
        fields = [('params', ', '.join(params)), ('on_success', j['on_success']), ('on_failure', j['on_failure']),
                  ('semaphore', sem and f"count {sem['count']}" + (f" per {sem['key']}" if sem.get('key') else ''))]
        for label, value in fields:
            if value:
                print(f'  {label + ":":12}{value}')
    return 0


# -- arguments ----------------------------------------------------------------
def key_value(text: str) -> tuple[str, str]:
    name, eq, value = text.partition('=')
    if not eq or not name:
        raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE')
    if name in RESERVED:
        raise argparse.ArgumentTypeError(f'{name!r} is reserved: {RESERVED[name]}')
    return name, value


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'{text} is not a positive number of seconds')
    return value


def global_options(parser, after: bool) -> None:
    """The options of every command. After the command their defaults are SUPPRESSed, so a value
    given before the command is kept; the TLS key is then spelled --tls-key (`start --key` is the
    idempotency key)."""
    group = parser.add_argument_group('global options (before or after the command)')

    def option(*flags, env=None, default=None, help='', **kw):
        value = argparse.SUPPRESS if after else None if kw.get('action') == 'append' else os.environ.get(env, default)
        group.add_argument(*flags, default=value, help=f"{help} (default: {default or 'none'}; env {env})", **kw)
    option('--url', env='JOBZ_URL', default=defaults.URL, action='append',
           help='the front end; several (repeated, or comma-separated) are tried in turn')
    option('--cert', '--tls-cert', dest='cert', env='JOBZ_TLS_CERT', metavar='FILE',
           help='client certificate for an https:// front end (from jobz-ca client NAME)')
    option(*(['--tls-key'] if after else ['--key', '--tls-key']), dest='tls_key', env='JOBZ_TLS_KEY',
           metavar='FILE', help='its private key' + (' (--key before the command)' if after else ''))
    option('--ca', '--tls-ca', dest='ca', env='JOBZ_TLS_CA', metavar='FILE',
           help="CA certificate that signed the front end's")
    group.add_argument('--json', action='store_true', default=argparse.SUPPRESS if after else False,
                       help='print the JSON the API answered instead')


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog='jobz', description=__doc__, formatter_class=formatter,
                                     allow_abbrev=False)
    global_options(parser, after=False)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    global_options(common, after=True)
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name, func, help):
        sub = commands.add_parser(name, parents=[common], help=help, description=help, allow_abbrev=False)
        sub.set_defaults(func=func)
        return sub
    start = command('start', cmd_start, 'start a run of JOB (GET /job_start)')
    start.add_argument('job', metavar='JOB')
    start.add_argument('params', nargs='*', type=key_value, metavar='KEY=VALUE', help='parameters of the run')
    start.add_argument('--wait', action='store_true',
                       help='wait for the run: exit 0 if it succeeded, 1 if it failed, 3 on --timeout')
    start.add_argument('--timeout', type=positive, metavar='S', help='with --wait: give up after S seconds '
                       '(default: wait as long as it takes)')
    start.add_argument('--key', dest='idempotency_key', metavar='K',
                       help='idempotency key: a key seen before returns that run, starting nothing (default: none)')
    status = command('status', cmd_status, "a run's state, workers and notes (GET /job_status)")
    status.add_argument('run', metavar='RUN')
    runs = command('runs', cmd_runs, 'recent runs, newest first (GET /runs)')
    runs.add_argument('--job', metavar='J', help='only runs of this job (default: all jobs)')
    runs.add_argument('--limit', type=int, default=20, metavar='N', help='at most N runs (default: 20)')
    logs = command('logs', cmd_logs, "a run's output, per worker (GET /job_output)")
    logs.add_argument('run', metavar='RUN')
    logs.add_argument('--worker', metavar='W', help="only this worker's output (default: every worker)")
    logs.add_argument('--follow', '-f', action='store_true',
                      help='print new output as it comes until every worker is done; exit 1 if the run failed')
    command('workers', cmd_workers, 'workers and semaphores: liveness, lag, running jobs (GET /workers)')
    command('jobs', cmd_jobs, 'the job catalog: topics, parameters, handlers, semaphores (GET /jobs)')
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.params = dict(getattr(args, 'params', []))
    given = args.url or [os.environ.get('JOBZ_URL', defaults.URL)]    # (--url appends: its default is set here)
    urls = [u.strip().rstrip('/') for arg in given for u in arg.split(',') if u.strip()]
    for url in urls:
        if urllib.parse.urlsplit(url).scheme not in ('http', 'https') or not urllib.parse.urlsplit(url).netloc:
            parser.error(f'--url {url!r}: give http://HOST:PORT or https://HOST:PORT')
    if not urls:
        parser.error('--url: give http://HOST:PORT or https://HOST:PORT')
    if bool(args.cert) != bool(args.tls_key):
        parser.error('--cert and --key go together')
    context, hint = None, ''
    if any(url.startswith('https:') for url in urls):
        for flag, path in (('--cert', args.cert), ('--key', args.tls_key), ('--ca', args.ca)):
            if path and not os.path.isfile(path):
                parser.error(f'{flag} {path}: no such file')
        try:
            context = client_context(args.cert, args.tls_key, args.ca)
        except (OSError, ssl.SSLError) as e:
            print(f'jobz: error: cannot load the client certificate {args.cert}: {e}', file=sys.stderr)
            return 1
        missing = [flag for flag, given in (('--ca', args.ca), ('--cert/--key', args.cert)) if not given]
        if missing:
            hint = f" (the https:// front end may want {' and '.join(missing)})"
    try:
        return args.func(Api(urls, context, hint), args)
    except Failure as e:
        print(f'jobz: error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:     # `jobz logs RUN | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == '__main__':
    sys.exit(main())
