"""Job files (DESIGN.md "Job database" and "Parameters and sanitizing" contracts)."""
import shlex
import string
import textwrap
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jobz.jobfile import (MAX_VALUE, JobFileError, ParamError, load_jobs, parse_job, prepare_params,
                          render_command, render_url)

# The contract's safe set, written out here independently of jobz.jobfile.
SAFE = set(string.ascii_letters + string.digits + '_.,:@+=/-')


def write(folder, name: str, text: str):
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding='utf-8')
    return path


def load_error(tmp_path, text: str, name: str = 'jobs.yaml') -> tuple[str, str]:
    """Load a job file expected to be bad; return (its path, the error message)."""
    path = write(tmp_path, name, text)
    with pytest.raises(JobFileError) as info:
        load_jobs(str(path))
    return str(path), str(info.value)


def job(command: str, **spec):
    return parse_job('j', dict(spec, command=command), 'test.yaml')


# -- loading valid files ------------------------------------------------------

def test_several_jobs_in_one_file(tmp_path):
    path = write(tmp_path, 'jobs.yaml', """\
        import_dump:
          command: "import-dump --date %(date)s --out /data/%(date)s"
          topic: import
          params:
            date: '\\d{4}_\\d{2}_\\d{2}'
          defaults: {region: eu, shards: 4}
          timeout: 3600
          on_success: "/job_start?job_name=build_index&date=%(date)s"
          on_failure: "http://alerts.example/fail?job=%(job_name)s&rc=%(rc)s"
        build_index:
          command: "date +%%Y; build-index %(date)s"
        """)
    jobs = load_jobs(str(path))
    assert sorted(jobs) == ['build_index', 'import_dump']
    imp = jobs['import_dump']
    assert imp.source == str(path)
    assert imp.topic == 'import'
    assert imp.command == 'import-dump --date %(date)s --out /data/%(date)s'
    assert imp.params['date'].fullmatch('2026_11_28')
    assert not imp.params['date'].fullmatch('2026-11-28')
    assert imp.defaults == {'region': 'eu', 'shards': '4'}
    assert imp.timeout == 3600
    assert imp.on_success == '/job_start?job_name=build_index&date=%(date)s'
    assert imp.on_failure.startswith('http://alerts.example/')
    assert imp.semaphore is None
    # Built-ins (job_name, rc, ...) are not values a trigger must supply.
    assert imp.placeholders == {'date'}
    assert jobs['build_index'].timeout is None
    assert jobs['build_index'].placeholders == {'date'}


def test_topic_defaults_to_job_name(tmp_path):
    path = write(tmp_path, 'jobs.yaml', 'hello.world-1:\n  command: echo hi\n')
    assert load_jobs(str(path))['hello.world-1'].topic == 'hello.world-1'


def test_semaphore_job(tmp_path):
    path = write(tmp_path, 'gates.yaml', """\
        reports_ready:
          semaphore: {count: 10, key: date}
          on_success: "/job_start?job_name=build_report&date=%(date)s"
        any_three:
          semaphore: {count: 3}
        """)
    jobs = load_jobs(str(path))
    gate = jobs['reports_ready']
    assert gate.command is None
    assert gate.semaphore == {'count': 10, 'key': 'date'}
    assert gate.topic == 'reports_ready'
    assert jobs['any_three'].semaphore == {'count': 3, 'key': None}


def test_folder_of_files(tmp_path):
    write(tmp_path, 'a.yaml', 'one:\n  command: echo 1\n')
    write(tmp_path, 'b.yml', 'two:\n  command: echo 2\nthree:\n  command: echo 3\n')
    write(tmp_path, 'empty.yaml', '# nothing here yet\n')
    write(tmp_path, 'notes.txt', 'this: is [not a job file\n')
    write(tmp_path, '.hidden.yaml', 'hidden:\n  command: echo hidden\n')
    jobs = load_jobs(str(tmp_path))
    assert sorted(jobs) == ['one', 'three', 'two']
    assert jobs['two'].source == str(tmp_path / 'b.yml')


def test_several_paths(tmp_path):
    a = write(tmp_path, 'a.yaml', 'one:\n  command: echo 1\n')
    sub = tmp_path / 'more'
    sub.mkdir()
    write(sub, 'b.yaml', 'two:\n  command: echo 2\n')
    assert sorted(load_jobs([str(a), str(sub)])) == ['one', 'two']


# -- bad job files: the message names the file, the job and the key ------------

def test_missing_path(tmp_path):
    missing = str(tmp_path / 'nope.yaml')
    with pytest.raises(JobFileError, match='nope.yaml'):
        load_jobs(missing)


def test_unknown_key(tmp_path):
    path, msg = load_error(tmp_path, 'backup:\n  command: echo hi\n  comand: echo typo\n')
    assert path in msg and "'backup'" in msg and "'comand'" in msg


def test_bad_job_name(tmp_path):
    path, msg = load_error(tmp_path, '"back up!":\n  command: echo hi\n')
    assert path in msg and 'back up!' in msg


@pytest.mark.parametrize('timeout', ['soon', '"60"', '-5', '0', 'true', '[60]'])
def test_bad_timeout(tmp_path, timeout):
    path, msg = load_error(tmp_path, f'backup:\n  command: echo hi\n  timeout: {timeout}\n')
    assert path in msg and "'backup'" in msg and 'timeout' in msg


def test_bad_regex_in_params(tmp_path):
    path, msg = load_error(tmp_path, "backup:\n  command: echo %(day)s\n  params:\n    day: '[0-9'\n")
    assert path in msg and "'backup'" in msg and 'params' in msg and "'day'" in msg


@pytest.mark.parametrize('command', ['echo %(x)d', 'echo 100%', 'date +%Y', 'echo %(x)', 'echo %s',
                                     'echo %(bad-name)s', 'echo %(x)s %'])
def test_bad_placeholder(tmp_path, command):
    path, msg = load_error(tmp_path, f'backup:\n  command: "{command}"\n')
    assert path in msg and "'backup'" in msg and 'command' in msg


def test_bad_placeholder_in_handler_url(tmp_path):
    path, msg = load_error(tmp_path, 'backup:\n  command: echo hi\n  on_failure: "/alert?pct=100%"\n')
    assert path in msg and "'backup'" in msg and 'on_failure' in msg


def test_percent_escape_is_accepted(tmp_path):
    path = write(tmp_path, 'jobs.yaml', 'stamp:\n  command: "date +%%H:%%M; echo %%(not_a_placeholder)s"\n')
    stamp = load_jobs(str(path))['stamp']
    assert stamp.placeholders == set()
    assert render_command(stamp.command, {}) == 'date +%H:%M; echo %(not_a_placeholder)s'


def test_both_command_and_semaphore(tmp_path):
    path, msg = load_error(tmp_path, 'gate:\n  command: echo hi\n  semaphore: {count: 2}\n')
    assert path in msg and "'gate'" in msg and 'command' in msg and 'semaphore' in msg


def test_neither_command_nor_semaphore(tmp_path):
    path, msg = load_error(tmp_path, 'gate:\n  topic: gates\n')
    assert path in msg and "'gate'" in msg and 'command' in msg


@pytest.mark.parametrize('semaphore', ['{count: 0}', '{count: -1}', '{count: many}', '{count: 2.5}',
                                       '{count: true}', '{key: date}'])
def test_bad_semaphore_count(tmp_path, semaphore):
    path, msg = load_error(tmp_path, f'gate:\n  semaphore: {semaphore}\n')
    assert path in msg and "'gate'" in msg and 'semaphore' in msg and 'count' in msg


def test_bad_semaphore_key(tmp_path):
    path, msg = load_error(tmp_path, "gate:\n  semaphore: {count: 2, key: 'a b'}\n")
    assert path in msg and "'gate'" in msg and 'semaphore' in msg and 'key' in msg


@pytest.mark.parametrize('url', ['job_start?job_name=next', 'ftp://files.example/x',
                                 'javascript:alert(1)', 'www.example.com/job_start'])
def test_on_success_must_be_path_or_http(tmp_path, url):
    path, msg = load_error(tmp_path, f'backup:\n  command: echo hi\n  on_success: "{url}"\n')
    assert path in msg and "'backup'" in msg and 'on_success' in msg


def test_bad_topic(tmp_path):
    path, msg = load_error(tmp_path, 'backup:\n  command: echo hi\n  topic: "two words"\n')
    assert path in msg and "'backup'" in msg and 'topic' in msg


@pytest.mark.parametrize('defaults', ['{region: "e u"}', '{region: "$(id)"}', '{region: ""}',
                                      '{"bad name": eu}', '[eu]'])
def test_bad_defaults(tmp_path, defaults):
    path, msg = load_error(tmp_path, f'backup:\n  command: echo %(region)s\n  defaults: {defaults}\n')
    assert path in msg and "'backup'" in msg and 'defaults' in msg


@pytest.mark.parametrize('pname', ['job_name', 'wait', 'key', '"1st"', '"a-b"'])
def test_unusable_param_name(tmp_path, pname):
    path, msg = load_error(tmp_path, f"backup:\n  command: echo hi\n  params:\n    {pname}: '.*'\n")
    assert path in msg and "'backup'" in msg and 'params' in msg


def test_duplicate_job_across_files(tmp_path):
    first = write(tmp_path, 'a.yaml', 'backup:\n  command: echo one\n')
    second = write(tmp_path, 'b.yaml', 'backup:\n  command: echo two\n')
    with pytest.raises(JobFileError) as info:
        load_jobs(str(tmp_path))
    msg = str(info.value)
    assert str(first) in msg and str(second) in msg and "'backup'" in msg


def test_duplicate_job_in_one_file(tmp_path):
    # YAML itself would silently keep only the last definition: the first job
    # would vanish without a word, so this must be refused like a duplicate across files.
    path, msg = load_error(tmp_path, 'backup:\n  command: echo one\nbackup:\n  command: echo two\n')
    assert path in msg and "'backup'" in msg


def test_yaml_syntax_error(tmp_path):
    path, msg = load_error(tmp_path, 'backup:\n  command: "echo unterminated\n  timeout: [1,\n')
    assert path in msg


@pytest.mark.parametrize('text', ['- backup\n- restore\n', 'just a string\n', '42\n'])
def test_top_level_not_a_mapping(tmp_path, text):
    path, msg = load_error(tmp_path, text)
    assert path in msg


def test_job_not_a_mapping(tmp_path):
    path, msg = load_error(tmp_path, 'backup: echo hi\n')
    assert path in msg and "'backup'" in msg


def test_bad_file_never_half_loads(tmp_path):
    write(tmp_path, 'a.yaml', 'good:\n  command: echo fine\n')
    write(tmp_path, 'b.yaml', 'bad:\n  command: echo %(x)d\n')
    with pytest.raises(JobFileError, match='b.yaml'):
        load_jobs(str(tmp_path))


# -- prepare_params -------------------------------------------------------------

DATED = job('import --date %(date)s --region %(region)s',
            params={'date': r'\d{4}_\d{2}_\d{2}'}, defaults={'region': 'eu'})


def test_declared_param_matching_its_rule():
    params, changed = prepare_params(DATED, {'job_name': 'j', 'date': '2026_11_28'})
    assert params == {'date': '2026_11_28', 'region': 'eu'}
    assert changed == []


@pytest.mark.parametrize('value', ['2026-11-28', '2026_11_28x', '', '2026_11_28\n', ' 2026_11_28'])
def test_declared_param_failing_its_rule_is_refused(value):
    with pytest.raises(ParamError, match="'date'"):
        prepare_params(DATED, {'date': value})


@pytest.mark.parametrize('value', ['$(id)', 'a b', 'x;rm -rf /', '`id`', 'a\nb', "it's", 'é', '%41'])
def test_declared_param_with_unsafe_chars_refused_even_if_rule_matches(value):
    anything = job('echo %(v)s', params={'v': '(?s).*'})
    assert anything.params['v'].fullmatch(value)    # the rule alone would let it through
    with pytest.raises(ParamError, match="'v'"):
        prepare_params(anything, {'v': value})


def test_undeclared_values_sanitized_and_listed():
    params, changed = prepare_params(DATED, {'date': '2026_11_28', 'region': 'us; rm -rf /',
                                             'note': 'hello world', 'ok': 'a.b,c:d@e+f=g/h-i_j'})
    assert params['region'] == 'usrm-rf/'
    assert params['note'] == 'helloworld'
    assert params['ok'] == 'a.b,c:d@e+f=g/h-i_j'
    assert changed == ['note', 'region']


def test_missing_placeholder_is_named():
    with pytest.raises(ParamError, match="'date'"):
        prepare_params(DATED, {'region': 'us'})


def test_missing_placeholder_of_handler_url_is_named():
    chained = job('echo hi', on_success='/job_start?job_name=next&day=%(day)s&code=%(rc)s')
    with pytest.raises(ParamError, match="'day'") as info:
        prepare_params(chained, {})
    assert 'rc' not in str(info.value)    # a built-in, filled in by the worker


@pytest.mark.parametrize('value', ['', '$()', ' ; ', 'ééé', '\n'])
def test_empty_after_sanitizing_is_refused(value):
    with pytest.raises(ParamError, match="'region'"):
        prepare_params(DATED, {'date': '2026_11_28', 'region': value})


def test_reserved_names_are_ignored():
    params, changed = prepare_params(DATED, {'date': '2026_11_28', 'job_name': 'other job!',
                                             'wait': '10 s', 'key': 'k;k'})
    assert params == {'date': '2026_11_28', 'region': 'eu'}
    assert changed == []


def test_unknown_extra_parameters_are_accepted():
    params, _ = prepare_params(DATED, {'date': '2026_11_28', 'extra': 'x'})
    assert params['extra'] == 'x'


def test_defaults_used_and_overridable():
    assert prepare_params(DATED, {'date': '2026_11_28'})[0]['region'] == 'eu'
    assert prepare_params(DATED, {'date': '2026_11_28', 'region': 'us'})[0]['region'] == 'us'


@pytest.mark.parametrize('name', ['a b', '1x', 'x-y', '$(id)', '', 'é', 'x\n'])
def test_bad_parameter_names_refused(name):
    with pytest.raises(ParamError):
        prepare_params(DATED, {'date': '2026_11_28', name: 'v'})


# -- render_url -----------------------------------------------------------------

def test_render_url_quotes_values_and_joins_relative():
    values = {'date': '2026_11_28', 'note': 'a b&c=d/é', 'job_name': 'x'}
    url = render_url('/job_start?job_name=next&date=%(date)s&note=%(note)s', values,
                     'http://front:6769/')
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ('http', 'front:6769', '/job_start')
    assert parse_qs(parts.query) == {'job_name': ['next'], 'date': ['2026_11_28'],
                                     'note': ['a b&c=d/é']}


def test_render_url_keeps_absolute_urls():
    url = render_url('https://alerts.example/hook?job=%(job_name)s', {'job_name': 'a/b'},
                     'http://front:6769')
    assert url == 'https://alerts.example/hook?job=a%2Fb'


def test_render_url_base_without_trailing_slash():
    assert render_url('/health', {}, 'http://front:6769') == 'http://front:6769/health'


# -- the property: no input changes the shell words of a command -----------------

TEMPLATES = [
    'echo %(v)s',
    'cp /in/%(v)s /out/x-%(v)s.txt',
    'grep -c "%(v)s" file',
    'f() { echo %(v)s; }; f',
    'x=%(v)s; echo "$x"',
    "echo '%(v)s' done",
    'test -n %(v)s && echo ok || echo no',
]
BENIGN = 'benign'

DANGEROUS = [
    '$(id)', '`id`', '; rm -rf /', '| cat /etc/passwd', '&& reboot', '|| true', '\nid', '\r\n',
    "'", '"', "a'b\"c", '\\', '\\\n', '$HOME', '${IFS}', '$IFS', '*', '?', '[a-z]', '{a,b}',
    '~root', '!!', '#', ' # comment', '> /tmp/x', '< /etc/passwd', '2>&1', '&', '\x00', '\t',
    ' ', 'a b', '%(v)s', '%s', '%%', '%', '%24%28id%29', '-rf', '--', '..', '=', 'é',
    '日本語', '\u200b', '\uff04(id)', '\u00a0', '\u2028', '\U0001f600', '\x7f', '\x1b[31m',
]


def percent_decoded(data: bytes) -> str:
    """What a query value becomes after URL-decoding arbitrary %-escaped bytes."""
    return unquote(''.join(f'%{b:02X}' for b in data))


values = st.one_of(
    st.text(max_size=200),
    st.sampled_from(DANGEROUS),
    st.lists(st.one_of(st.sampled_from(DANGEROUS), st.text(alphabet=sorted(SAFE), max_size=6)),
             max_size=20).map(''.join),
    st.binary(max_size=100).map(percent_decoded),
    st.text(alphabet='%+0123456789abcdefABCDEF$();`', max_size=60).map(unquote_plus),
    st.tuples(st.text(min_size=1, max_size=30), st.integers(100, 5000))
      .map(lambda t: (t[0] * t[1])[:5000]),
)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_no_value_changes_the_shell_words(value):
    expected = ''.join(c for c in value if c in SAFE)    # the contract: unsafe chars are removed
    for template in TEMPLATES:
        try:
            params, changed = prepare_params(job(template), {'v': value})
        except ParamError as e:
            # Refusing is fine, but only when nothing usable is left, or the value is too long.
            assert expected == '' or len(value) > MAX_VALUE, f'{value!r} refused although {expected!r} is safe: {e}'
            assert "'v'" in str(e)
            continue
        clean = params['v']
        assert clean == expected
        assert set(clean) <= SAFE
        assert changed == ([] if clean == value else ['v'])

        benign_words = shlex.split(render_command(template, {'v': BENIGN}))
        words = shlex.split(render_command(template, params))
        assert len(words) == len(benign_words), (template, value, words)
        for got, want in zip(words, benign_words):
            if BENIGN in want:
                assert got == want.replace(BENIGN, clean)
            else:
                assert got == want


@settings(max_examples=150, deadline=None, database=None)
@given(values)
def test_declared_param_with_permissive_rule_is_unchanged_or_refused(value):
    anything = job('echo %(v)s', params={'v': '(?s).*'})
    try:
        params, changed = prepare_params(anything, {'v': value})
    except ParamError:
        assert value == '' or not set(value) <= SAFE or len(value) > MAX_VALUE
        return
    assert params['v'] == value and set(value) <= SAFE and changed == []


@pytest.mark.parametrize('value', ['two', 'ONE', 1, True, None])
def test_run_on_other_than_one_or_all_is_refused_naming_file_job_and_key(tmp_path, value):
    path, message = load_error(tmp_path, f'crunch:\n  command: "true"\n  run_on: {value!r}\n'.replace("'", ''))
    assert path in message and "job 'crunch'" in message and "'run_on'" in message, message


def test_run_on_one_is_for_command_jobs(tmp_path):
    _, message = load_error(tmp_path, 'gate:\n  semaphore: {count: 2}\n  run_on: one\n')
    assert "'run_on' is for jobs with a command" in message
