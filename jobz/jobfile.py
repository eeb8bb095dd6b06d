"""Job files: load and validate the YAML catalog, sanitize values, fill in placeholders."""
import functools
import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import yaml

from .protocol import FINAL_STATES, SUCCEEDED

NAME_RE = re.compile(r'[A-Za-z0-9_.-]+\Z')
# A run id as the broker makes them (time, then 48 random bits; 32 in older journals): never '..'.
RUN_ID_RE = re.compile(r'\d{8}-\d{6}-[0-9a-f]{8,32}\Z')
# The idempotency key of a handler call: RUN.WORKER.STATE (worker names may hold dots themselves).
HANDLER_KEY_RE = re.compile(r'(\d{8}-\d{6}-[0-9a-f]{8,32})\.([A-Za-z0-9_.-]+)\.(%s)\Z' % '|'.join(FINAL_STATES))
RELEASE_KEY_PREFIX = 'semaphore.'
PARAM_NAME_RE = re.compile(r'[A-Za-z_][A-Za-z0-9_]*\Z')
# Everything outside this set is removed from undeclared values (DESIGN.md contract).
UNSAFE_RE = re.compile(r'[^A-Za-z0-9_.,:@+=/-]')
# Allowed printf forms: %(name)s and %%. Anything else with a percent sign is an error.
PERCENT_RE = re.compile(r'%(?:%|\(([A-Za-z_][A-Za-z0-9_]*)\)s)')
MAX_VALUE = 4096      # characters in one parameter value
BUILTINS = {'job_name', 'run_id'}
HANDLER_BUILTINS = BUILTINS | {'worker', 'rc', 'state'}
# Query names with a meaning of their own; never job parameters.
RESERVED = {'job_name', 'wait', 'key', 'parent'}
KEYS = {'command', 'topic', 'params', 'defaults', 'timeout', 'on_success', 'on_failure', 'semaphore',
        'retry', 'expires', 'run_on'}
RUN_ON = ('all', 'one')    # every subscribed worker runs each call (broadcast), or exactly one (a pool)


class JobFileError(Exception):
    """A job file that cannot be used; the message names file, job and key."""


class ParamError(ValueError):
    """Request values that cannot be used for a job (answered with 400)."""


@dataclass
class Job:
    name: str
    source: str
    command: str | None = None
    topic: str = ''
    params: dict = field(default_factory=dict)      # name -> compiled rule
    defaults: dict = field(default_factory=dict)
    timeout: float | None = None
    on_success: str | None = None
    on_failure: str | None = None
    semaphore: dict | None = None                   # {'count': int or 'all', 'key': str | None}
    retry: dict | None = None                       # {'count': int, 'backoff': seconds}
    expires: float | None = None                    # seconds after the trigger
    run_on: str = 'all'                             # 'one': each call goes to one worker of the topic

    @functools.cached_property
    def placeholders(self) -> frozenset:
        """Names a trigger must supply (built-ins excluded); worked out once per job."""
        names = set()
        for template in (self.command, self.on_success, self.on_failure):
            names |= placeholders(template or '')
        return frozenset(names - HANDLER_BUILTINS)

    def handler(self, state: str) -> str | None:
        """The handler URL template a run that ended in `state` calls."""
        return self.on_success if state == SUCCEEDED else self.on_failure

    def gate(self, params: dict, parent: str | None) -> str:
        """Which gate of this semaphore job a completion with these values counts towards."""
        key = self.semaphore['key']
        if key:
            return str(params.get(key, ''))    # one gate per value (a date, say)
        return str(parent or '') if self.semaphore['count'] == 'all' else ''    # per parent run, or one

    def describe(self) -> dict:
        return {'topic': self.topic, 'command': self.command,
                'params': {k: v.pattern for k, v in self.params.items()},
                'defaults': self.defaults, 'timeout': self.timeout,
                'on_success': self.on_success, 'on_failure': self.on_failure,
                'semaphore': self.semaphore, 'retry': self.retry, 'expires': self.expires, 'run_on': self.run_on,
                'file': self.source}


def placeholders(template: str) -> set:
    return {m.group(1) for m in PERCENT_RE.finditer(template) if m.group(1)}


def _check_template(where: str, template, allowed_extra=()) -> str:
    if not isinstance(template, str) or not template.strip():
        raise JobFileError(f'{where} must be a non-empty string')
    stripped = PERCENT_RE.sub('', template)
    if '%' in stripped:
        raise JobFileError(f"{where}: a percent sign must be written %% or start a "
                           f"placeholder %(name)s")
    return template


def _check_url(where: str, template) -> str:
    _check_template(where, template)
    parts = urlsplit(template)
    if parts.scheme not in ('', 'http', 'https') or (not parts.scheme and not template.startswith('/')):
        raise JobFileError(f'{where} must be a path starting with / or an http(s) URL')
    for name, _ in parse_qsl(parts.query) if parts.path.endswith('/job_start') else ():
        if name in HANDLER_BUILTINS - {'job_name'}:
            raise JobFileError(f"{where}: {name!r} is a built-in value and cannot be passed as a parameter; "
                               f"give it another name ({name}_of=%({name})s)")
        if name in ('key', 'parent'):
            raise JobFileError(f"{where}: {name!r} is set by the worker for every handler call (it links the runs "
                               f"and keeps a retried call from starting twice)")
    return template


def target_job(url: str | None) -> str | None:
    """The job a handler URL template triggers, if it is a job_start."""
    if not url or not urlsplit(url).path.endswith('/job_start'):
        return None
    return dict(parse_qsl(urlsplit(url).query)).get('job_name')


def parse_job(name, spec, source: str) -> Job:
    where = f'{source}: job {name!r}'
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise JobFileError(f'{source}: job name {name!r} may only hold letters, digits and _ . -')
    if not isinstance(spec, dict):
        raise JobFileError(f'{where}: must be a mapping of keys (command, topic, ...)')
    unknown = set(spec) - KEYS
    if unknown:
        raise JobFileError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                           f"(known: {', '.join(sorted(KEYS))})")
    job = Job(name=name, source=source)
    if 'command' in spec:
        job.command = _check_template(f"{where}: 'command'", spec['command'])
        handler_only = sorted(placeholders(job.command) & (HANDLER_BUILTINS - BUILTINS))
        if handler_only:
            raise JobFileError(f"{where}: 'command' uses %({handler_only[0]})s, which only a handler URL has "
                               f"(a command gets $JOBZ_WORKER in its environment)")
    if 'semaphore' in spec:
        job.semaphore = _parse_semaphore(f"{where}: 'semaphore'", spec['semaphore'])
    if job.command and job.semaphore:
        raise JobFileError(f"{where}: has both 'command' and 'semaphore'; a job is one or the other")
    if not job.command and not job.semaphore:
        raise JobFileError(f"{where}: needs a 'command' (or a 'semaphore')")
    topic = spec.get('topic', name)
    if not isinstance(topic, str) or not NAME_RE.match(topic):
        raise JobFileError(f"{where}: 'topic' may only hold letters, digits and _ . -")
    job.topic = topic
    params = spec.get('params') or {}
    if not isinstance(params, dict):
        raise JobFileError(f"{where}: 'params' must map parameter names to regular expressions")
    for pname, rule in params.items():
        if not isinstance(pname, str) or not PARAM_NAME_RE.match(pname) or pname in RESERVED | HANDLER_BUILTINS:
            raise JobFileError(f"{where}: 'params': {pname!r} is not a usable parameter name")
        try:
            job.params[pname] = re.compile(str(rule))
        except re.error as e:
            raise JobFileError(f"{where}: 'params': rule for {pname!r} is not a valid regex: {e}") from None
    defaults = spec.get('defaults') or {}
    if not isinstance(defaults, dict):
        raise JobFileError(f"{where}: 'defaults' must map parameter names to values")
    for pname, value in defaults.items():
        if not isinstance(pname, str) or not PARAM_NAME_RE.match(pname) or pname in RESERVED | HANDLER_BUILTINS:
            raise JobFileError(f"{where}: 'defaults': {pname!r} is not a usable parameter name")
        if not isinstance(value, (str, int, float)) or UNSAFE_RE.search(str(value)) or str(value) == '':
            raise JobFileError(f"{where}: 'defaults': value of {pname!r} must be non-empty and use "
                               f"only letters, digits and _ . , : @ + = / -")
        rule = job.params.get(pname)
        if rule is not None and not rule.fullmatch(str(value)):
            raise JobFileError(f"{where}: 'defaults': value of {pname!r} does not match its rule in 'params'")
        job.defaults[pname] = str(value)
    for key in ('timeout', 'expires'):
        if key in spec:
            setattr(job, key, _seconds(f"{where}: {key!r}", spec[key]))
    if 'run_on' in spec:
        if spec['run_on'] not in RUN_ON:
            raise JobFileError(f"{where}: 'run_on' must be 'all' (every worker of the topic runs each call) "
                               f"or 'one' (one worker of the topic does), not {spec['run_on']!r}")
        if job.semaphore and spec['run_on'] == 'one':
            raise JobFileError(f"{where}: 'run_on' is for jobs with a command, not for a semaphore")
        job.run_on = spec['run_on']
    if 'retry' in spec:
        job.retry = _parse_retry(f"{where}: 'retry'", spec['retry'])
    for key in ('on_success', 'on_failure'):
        if spec.get(key) is not None:
            setattr(job, key, _check_url(f"{where}: {key!r}", spec[key]))
    return job


def _seconds(where: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise JobFileError(f"{where} must be a positive number of seconds")
    return float(value)


def _parse_semaphore(where: str, spec) -> dict:
    if not isinstance(spec, dict) or set(spec) - {'count', 'key'}:
        raise JobFileError(f"{where} must be a mapping with 'count' and optional 'key'")
    count = spec.get('count')
    if count != 'all' and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise JobFileError(f"{where}: 'count' must be a whole number of at least 1, or 'all'")
    key = spec.get('key')
    if key is not None and (not isinstance(key, str) or not PARAM_NAME_RE.match(key)):
        raise JobFileError(f"{where}: 'key' must be a parameter name")
    return {'count': count, 'key': key}


def _parse_retry(where: str, spec) -> dict:
    """retry: {count: 2, backoff: 30} re-runs a call interrupted by a worker crash."""
    if not isinstance(spec, dict) or set(spec) - {'count', 'backoff'}:
        raise JobFileError(f"{where} must be a mapping with 'count' and optional 'backoff'")
    count = spec.get('count')
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise JobFileError(f"{where}: 'count' must be a whole number of at least 1")
    return {'count': count, 'backoff': _seconds(f"{where}: 'backoff'", spec.get('backoff', 10), allow_zero=True)}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error, not a silent overwrite."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f'duplicate key {key!r}', key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def job_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path)
                      if f.endswith(('.yaml', '.yml')) and not f.startswith('.'))
    return [path]


def load_jobs(paths) -> dict[str, Job]:
    """Load every job of the given files or folders; raise JobFileError on the first fault."""
    if isinstance(paths, str):
        paths = [paths]
    jobs: dict[str, Job] = {}
    for path in paths:
        if not os.path.exists(path):
            raise JobFileError(f'{path}: no such job file or folder')
        for source in job_files(path):
            try:
                with open(source, encoding='utf-8') as f:
                    data = yaml.load(f, Loader=_UniqueKeyLoader)
            except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
                raise JobFileError(f'{source}: cannot read YAML: {e}') from None
            if data is None:
                continue
            if not isinstance(data, dict):
                raise JobFileError(f'{source}: top level must map job names to job definitions')
            for name, spec in data.items():
                job = parse_job(name, spec, source)
                if name in jobs:
                    raise JobFileError(f'{source}: job {name!r} is already defined in {jobs[name].source}')
                jobs[name] = job
    return jobs


def sanitize(value: str) -> str:
    """Remove every character outside the safe set."""
    return UNSAFE_RE.sub('', value)


def prepare_params(job: Job, query: dict) -> tuple[dict, list]:
    """Check request values for a job: (params, names of sanitized values) or ParamError."""
    params = dict(job.defaults)
    changed = []
    for name, value in query.items():
        if name in RESERVED:
            continue
        if name in HANDLER_BUILTINS:
            raise ParamError(f"parameter {name!r} is a built-in value ({', '.join(sorted(HANDLER_BUILTINS))}) "
                             'and cannot be given')
        if not PARAM_NAME_RE.match(name) or len(name) > 100:
            raise ParamError(f'parameter name {name[:100]!r} may only hold letters, digits and _')
        if len(value) > MAX_VALUE:
            raise ParamError(f'parameter {name!r} is longer than {MAX_VALUE} characters')
        if name not in job.params:
            clean = sanitize(value)
            if clean != value:
                changed.append(name)
            value = clean
        params[name] = value
    check_params(job, params)
    return params, sorted(changed)


def check_params(job: Job, params) -> None:
    """The rules a call's values obey: checked by the broker, and again by the worker before it runs them.

    Names are parameter names (no built-ins); values stay in the safe set and match their rule;
    every placeholder has a value, and none is empty (it would remove a shell word)."""
    if not isinstance(params, dict):
        raise ParamError('the call has no parameters')
    for name, value in params.items():
        if not isinstance(name, str) or not PARAM_NAME_RE.match(name) or len(name) > 100 \
                or name in RESERVED | HANDLER_BUILTINS:
            raise ParamError(f'parameter name {str(name)[:100]!r} is not allowed')
        if not isinstance(value, str) or len(value) > MAX_VALUE:
            raise ParamError(f'parameter {name!r} has no usable value')
        rule = job.params.get(name)
        if rule is not None and (UNSAFE_RE.search(value) or not rule.fullmatch(value)):
            raise ParamError(f'parameter {name!r} does not match its rule: {rule.pattern}')
        if UNSAFE_RE.search(value):
            raise ParamError(f'parameter {name!r} holds characters outside the safe set')
    if len({n.upper() for n in params}) != len(params):
        # They would share one JOBZ_PARAM_<NAME> variable.
        raise ParamError('parameter names differ only in case: ' + ', '.join(sorted(params)))
    missing = sorted(n for n in job.placeholders if n not in params)
    if missing:
        raise ParamError(f"missing value for placeholder {', '.join(repr(n) for n in missing)}")
    empty = sorted(n for n in job.placeholders if params[n] == '')
    if empty:
        # An empty value would remove a shell word from the command.
        raise ParamError(f"parameter {', '.join(repr(n) for n in empty)} is empty "
                         f"(after removing unsafe characters)")


def check_call(call: dict, job: Job) -> None:
    """A call from the broker, checked against our own job before we act on it (ParamError says why).

    A broker, even a compromised one, can make us run only our own commands, with values our
    own rules allow, for the topic the job is on, under a run id that names no other file."""
    if not RUN_ID_RE.match(str(call.get('run_id'))):
        raise ParamError('the call has a malformed run id')
    if call.get('topic') != job.topic:
        raise ParamError(f"job {job.name!r} is on topic {job.topic!r}, but the call came for {call.get('topic')!r}")
    check_params(job, call.get('params'))


def render_command(template: str, values: dict) -> str:
    """Fill a command template; raise KeyError naming a missing placeholder."""
    return template % values


def render_url(template: str, values: dict, base: str) -> str:
    """Fill a handler URL with URL-quoted values; a relative URL is joined to the front end."""
    url = template % {k: quote(str(v), safe='') for k, v in values.items()}
    if url.startswith('/'):
        url = base.rstrip('/') + url
    return url


def release_key(job: str, gate: str) -> str:
    """The idempotency key of a semaphore's release: deterministic, so a gate never releases twice."""
    return f'{RELEASE_KEY_PREFIX}{job}.{gate}'


def handler_key(run_id: str, worker: str, state: str) -> str:
    """The idempotency key of a worker's handler call: a retried call never starts the next job twice."""
    return f'{run_id}.{worker}.{state}'


def handler_url(job: Job, state: str, run_id: str, params: dict, worker: str, rc: int | None, base: str,
                key: str) -> str | None:
    """The URL a run of `job` that ended in `state` calls: its handler filled in, linked to the run, keyed.

    None when the job has no handler for that state; KeyError names a placeholder with no value."""
    template = job.handler(state)
    if not template:
        return None
    values = dict(params, job_name=job.name, run_id=run_id, worker=worker, rc='none' if rc is None else str(rc),
                  state=state)
    return link_url(render_url(template, values, base), run_id, key)


def link_url(url: str, parent: str, key: str) -> str:
    """A handler URL that names the run it came from and carries an idempotency key.

    The key makes a retried handler call never trigger twice; the parent links runs into chains."""
    given = dict(parse_qsl(urlsplit(url).query))
    extra = {k: v for k, v in (('key', key), ('parent', parent)) if k not in given}
    return url + ('&' if '?' in url else '?') + urlencode(extra) if extra else url
