"""The status page at / in a real browser (Debian's chromium driven by Playwright) over a real stack."""
import os
import re

import pytest
from playwright import sync_api    # the test extra; a missing install fails here, it is never skipped

from conftest import ROOT, TestStack, started

expect = sync_api.expect

CHROMIUM = '/usr/bin/chromium'
SHOTS = os.path.join(os.environ.get('JOBZ_TEST_OUTPUT', os.path.join(ROOT, 'test-output')), 'page')
WAIT = 15000    # ms: the longest any condition below may take (the page polls every 1.5 s)

JOBS = r"""
step_a:
  command: "echo a %(tag)s"
  on_success: "/job_start?job_name=step_b&tag=%(tag)s"
step_b:
  command: "echo b %(tag)s"
  on_success: "/job_start?job_name=step_c&tag=%(tag)s"
step_c:
  # Waits for the test's go-file, so the page is seen following the chain live.
  command: "echo c is waiting; while [ ! -e {out}/go-%(tag)s ]; do sleep 0.05; done; echo c done %(tag)s"
part:
  # Part 3 blocks until the test creates its go-file: the gate stays stuck at 2/3 until then.
  command: "test %(n)s != 3 || while [ ! -e {out}/go-%(date)s ]; do sleep 0.05; done"
  params: {date: '\d{4}_\d{2}_\d{2}', n: '\d+'}
  on_success: "/job_start?job_name=gate3&date=%(date)s"
gate3:
  semaphore: {count: 3, key: date}
  on_success: "/job_start?job_name=report&date=%(date)s"
report:
  command: "echo report for %(date)s"
hop1:
  command: "true"
  on_success: "/job_start?job_name=hop2&tag=%(tag)s"
hop2:
  command: "true"
  on_success: "/job_start?job_name=hop3&tag=%(tag)s"
hop3:
  command: "true"
  on_success: "/job_start?job_name=hop4&tag=%(tag)s"
hop4:
  command: "true"
  on_success: "/job_start?job_name=hop5&tag=%(tag)s"
hop5:
  command: "true"
  on_success: "/job_start?job_name=hops_done&tag=%(tag)s"
hops_done:
  semaphore: {count: 1, key: tag}
  on_success: "/job_start?job_name=landed&tag=%(tag)s"
landed:
  command: "echo landed %(tag)s"
breaks:
  command: "seq 1 3000; echo PAGE-TEST-BOOM-42; exit 1"
greet:
  command: "echo hello %(who)s on %(date)s"
  params: {date: '\d{4}_\d{2}_\d{2}'}
  defaults: {who: world}
"""


@pytest.fixture(scope='module')
def stack(tmp_path_factory):
    with started(TestStack(str(tmp_path_factory.mktemp('page')), JOBS), [('w1', ['--concurrency', '4'])]) as s:
        yield s


class Browser:
    """One page in one browser for the module, recording every request and every console error."""

    def __init__(self, playwright, origin: str):
        self.origin = origin
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox'])
        self.page = self.browser.new_page(viewport={'width': 1280, 'height': 900})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on('request', lambda r: self.requests.append(r.url))
        self.failed: list[str] = []     # answers of 400 and up, to tell which request an error was
        self.page.on('response', lambda r: r.status >= 400 and self.failed.append(f'{r.status} {r.url}'))
        self.page.on('console', lambda m: m.type == 'error' and self.errors.append(m.text))
        self.page.on('pageerror', lambda e: self.errors.append(f'uncaught: {e}'))

    def open(self, hash_path: str):
        """Show a view by its hash, as a user following a link would."""
        if self.page.url.startswith(self.origin + '/'):
            self.page.evaluate('h => { location.hash = h; }', hash_path)
        else:
            resp = self.page.goto(self.origin + '/' + hash_path)
            assert resp.status == 200 and 'text/html' in resp.headers['content-type']
        return self.page

    def shot(self, name: str) -> None:
        os.makedirs(SHOTS, exist_ok=True)
        self.page.screenshot(path=os.path.join(SHOTS, name + '.png'), full_page=True)


@pytest.fixture(scope='module')
def web(stack):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f'{CHROMIUM} is missing: `make test` installs Debian\'s chromium (never a downloaded browser)')
    with sync_api.sync_playwright() as p:
        b = Browser(p, stack.url)
        try:
            yield b
        finally:
            b.browser.close()


def node(page, job=None, run_id=None):
    sel = 'svg.graph g.node' + (f'[data-job="{job}"]' if job else '') + (f'[data-run="{run_id}"]' if run_id else '')
    return page.locator(sel)


def test_page_is_served_with_csp(stack, web):
    resp = web.page.goto(stack.url + '/')
    assert resp.status == 200
    assert resp.headers['content-type'].startswith('text/html')
    csp = resp.headers['content-security-policy']
    assert "connect-src 'self'" in csp and "'sha256-" in csp and 'unsafe-inline' not in csp
    expect(web.page.locator('nav a')).to_have_count(4)
    # curl still gets JSON from /
    status, body = stack.get('/')
    assert status == 200 and body['service'] == 'jobz'


def test_chain_graph_follows_a_chain_live(stack, web):
    a = stack.start_job('job_name=step_a&tag=t1')['run_id']
    page = web.open(f'#/run/{a}')
    expect(page.locator('h1')).to_contain_text(a)
    # step_c waits for its go-file: the page must show it running, then (polling) succeeded.
    expect(node(page, 'step_c')).to_have_attribute('data-state', 'running', timeout=WAIT)
    expect(node(page, run_id=a)).to_have_class(re.compile(r'\bcurrent\b'))

    # A node links to its run; there the full output grows while the command runs.
    c = node(page, 'step_c').get_attribute('data-run')
    node(page, 'step_c').click()
    expect(page.locator('h1')).to_contain_text(c, timeout=WAIT)
    expect(node(page, run_id=c)).to_have_class(re.compile(r'\bcurrent\b'), timeout=WAIT)
    page.locator('button.show-output').click()
    full = page.locator('pre.full[data-worker="w1"]')
    expect(full).to_contain_text('c is waiting', timeout=WAIT)
    expect(page.locator('.outhead')).to_contain_text('still running')
    with open(os.path.join(stack.out, 'go-t1'), 'w'):
        pass
    expect(full).to_contain_text('c done t1', timeout=WAIT)
    expect(page.locator('.outhead')).to_contain_text('complete')
    assert full.text_content().count('c is waiting') == 1     # new output appended, nothing twice
    expect(page.locator('h1 .badge')).to_have_text('succeeded')

    # Back to a (the back button works): the whole chain has succeeded.
    page.go_back()
    expect(page.locator('h1')).to_contain_text(a, timeout=WAIT)
    for job in ('step_a', 'step_b', 'step_c'):
        expect(node(page, job)).to_have_attribute('data-state', 'succeeded', timeout=WAIT)
        expect(node(page, job)).to_contain_text('succeeded')
    expect(node(page)).to_have_count(3)
    expect(page.locator('svg.graph path.edge')).to_have_count(2)     # a -> b -> c
    expect(page.locator('h1 .badge')).to_have_text('succeeded')
    web.shot('chain')

    # A phone: the page itself must not scroll sideways (tables and the graph scroll in their boxes).
    page.set_viewport_size({'width': 390, 'height': 844})
    try:
        expect(node(page, 'step_a')).to_be_visible()
        assert page.evaluate('document.documentElement.scrollWidth') <= 390
        web.shot('chain-phone')
    finally:
        page.set_viewport_size({'width': 1280, 'height': 900})


def test_the_follow_up_of_a_gate_after_a_long_chain_is_in_view(stack, web):
    """Five steps, a gate and its follow-up: eight columns, wider than a 1300-pixel window. The graph
    is drawn to fit, so the follow-up is on screen and the page does not scroll sideways."""
    first = stack.start_job('job_name=hop1&tag=wide')['run_id']
    page = web.page
    page.set_viewport_size({'width': 1300, 'height': 900})
    try:
        web.open(f'#/run/{first}')
        landed = node(page, 'landed')
        expect(landed).to_have_attribute('data-state', 'succeeded', timeout=WAIT)
        expect(page.locator('svg.graph g.gate')).to_have_count(1)
        box = landed.bounding_box()
        assert 0 <= box['x'] and box['x'] + box['width'] <= 1300, box
        assert page.evaluate('document.documentElement.scrollWidth') <= 1300
        web.shot('long-chain')
    finally:
        page.set_viewport_size({'width': 1280, 'height': 900})


def test_fan_in_gate_stuck_then_released(stack, web):
    date = '2026_11_28'
    p1 = stack.start_job(f'job_name=part&date={date}&n=1')['run_id']
    p3 = stack.start_job(f'job_name=part&date={date}&n=3')['run_id']    # blocks on its go-file
    page = web.open(f'#/run/{p1}')
    gate = page.locator('svg.graph g.gate')
    # One arrived, part 3 running and drawn as the missing input, one part not even triggered yet.
    expect(gate).to_have_attribute('data-arrived', '1', timeout=WAIT)
    expect(gate).to_contain_text(f'date={date}')
    expect(gate).to_contain_text('1/3')
    expect(gate).to_contain_text('1 more not yet triggered')
    expect(node(page, run_id=p3)).to_have_attribute('data-state', 'running')
    expect(page.locator('svg.graph path.edge.waiting')).to_have_count(1)
    web.shot('fanin-untriggered')

    p2 = stack.start_job(f'job_name=part&date={date}&n=2')['run_id']
    expect(gate).to_have_attribute('data-arrived', '2', timeout=WAIT)
    expect(gate).to_contain_text('2/3')
    expect(gate).not_to_contain_text('not yet triggered')
    expect(node(page, run_id=p2)).to_have_attribute('data-state', 'succeeded')
    expect(node(page, run_id=p3)).to_have_attribute('data-state', 'running')
    missing = page.locator('table tr[data-gate]')
    expect(missing).to_contain_text(p3[-6:])
    web.shot('fanin-stuck')

    with open(os.path.join(stack.out, f'go-{date}'), 'w'):
        pass
    expect(gate).to_have_attribute('data-arrived', '3', timeout=WAIT)
    expect(gate).to_contain_text('3/3')
    expect(node(page, 'report')).to_have_attribute('data-state', 'succeeded', timeout=WAIT)
    expect(page.locator('svg.graph g.node[data-job="part"][data-state="succeeded"]')).to_have_count(3)
    expect(page.locator('svg.graph path.edge.waiting')).to_have_count(0)
    # parts -> gate (3) and gate -> report (1); the arrival runs are the gate, not nodes of their own
    expect(page.locator('svg.graph path.edge')).to_have_count(4)
    expect(node(page, 'gate3')).to_have_count(0)
    web.shot('fanin-released')

    # An arrival run (the semaphore's own run) is drawn as its gate, highlighted as the current node.
    arrival = stack.runs('gate3')[0]['run_id']
    page = web.open(f'#/run/{arrival}')
    expect(page.locator('svg.graph g.gate.current')).to_have_count(1, timeout=WAIT)

    # The workers view lists the gate as released, with a link to the release run.
    page = web.open('#/workers')
    expect(page.locator('tr[data-worker="w1"]')).to_contain_text('alive', timeout=WAIT)
    row = page.locator(f'tr[data-gate="gate3:{date}"]')
    expect(row).to_contain_text('3/3', timeout=WAIT)
    report = stack.runs('report')[0]['run_id']
    expect(row.locator(f'a[href="#/run/{report}"]')).to_have_count(1)
    web.shot('workers')


def test_failed_run_shows_exit_code_and_output(stack, web):
    run_id = stack.start_job('job_name=breaks')['run_id']
    stack.wait_run(run_id)
    page = web.open(f'#/run/{run_id}')
    expect(page.locator('h1 .badge')).to_have_text('failed', timeout=WAIT)
    row = page.locator('tr[data-worker="w1"]').first
    expect(row.locator('.badge')).to_have_text('failed')
    expect(row.locator('.exit')).to_have_text('exit 1')
    expect(page.locator('pre.tail')).to_contain_text('PAGE-TEST-BOOM-42')
    expect(node(page, run_id=run_id)).to_have_attribute('data-state', 'failed')
    # The tail holds the last 4 KiB; the full output starts at the beginning.
    page.locator('button.show-output').click()
    full = page.locator('pre.full[data-worker="w1"]')
    expect(full).to_contain_text('PAGE-TEST-BOOM-42', timeout=WAIT)
    assert full.text_content().startswith('1\n2\n3\n')
    web.shot('failed')


def test_trigger_form(stack, web):
    page = web.open('#/jobs')
    form = page.locator('form[data-job="greet"]')
    expect(form.locator('input[name="who"]')).to_have_attribute('placeholder', 'world', timeout=WAIT)
    # A value breaking the job's rule: the API's 400 message is shown next to the form.
    form.locator('input[name="date"]').fill('yesterday')
    form.locator('button[type="submit"]').click()
    expect(form.locator('.result')).to_contain_text("parameter 'date' does not match its rule", timeout=WAIT)
    assert page.url.endswith('#/jobs')
    web.shot('jobs-error')

    form.locator('input[name="date"]').fill('2026_11_29')
    form.locator('button[type="submit"]').click()
    expect(page).to_have_url(re.compile(r'#/run/[0-9a-f-]+$'), timeout=WAIT)
    run_id = page.url.rsplit('/', 1)[1]
    assert stack.status(run_id)['params']['date'] == '2026_11_29'
    expect(page.locator('h1 .badge')).to_have_text('succeeded', timeout=WAIT)
    expect(page.locator('pre.tail')).to_contain_text('hello world on 2026_11_29')


def test_runs_list(stack, web):
    page = web.open('#/?job=part')
    rows = page.locator('tbody tr[data-run]')
    expect(rows).to_have_count(3, timeout=WAIT)
    expect(rows.first.locator('.badge')).to_have_text('succeeded')
    expect(page.locator('select')).to_have_value('part')


def test_only_own_origin_and_no_console_errors(stack, web):
    """Runs last: everything the page did above went to the broker only, and broke no CSP rule."""
    assert web.requests, 'no requests recorded'
    # (the page's icon is a data: URL, inside the page: not a request to anyone)
    foreign = [u for u in web.requests if not u.startswith((stack.url + '/', 'data:'))]
    assert not foreign, foreign
    # The one error Chromium logs by itself: the 400 of the deliberately bad form value.
    errors = [e for e in web.errors if 'status of 400' not in e]
    assert not errors, (errors, web.failed)
