"""Words and framing of the broker <-> worker protocol (all in one place).

Broker PUB -> worker SUB:   [topic + b'\\0', call JSON]          live calls (fast path)
Worker DEALER -> ROUTER:    [verb, JSON]                         SYNC, STARTED, OUTPUT, RESULT, BYE, TAKE
Broker ROUTER -> DEALER:    [verb, JSON]                         CALLS, ACK, CALL, ASSIGN, GO, REFUSE

A call is {"run_id", "job", "topic", "seq", "params", "key", "created"}. Every call
carries its per-topic sequence number; SYNC sends the worker's cursors and CALLS
answers with the calls it missed, so PUB may drop messages without losing jobs.

A call of a `run_on: one` job (a pool call, "pool": true, seq < 0: outside its topic's sequence)
is never published: the broker gives it to one worker (ASSIGN), the worker records it and asks
for it (TAKE), the broker records that that worker has it and only then lets it start (GO); a
TAKE for a call given to someone else meanwhile is refused (REFUSE). See pool.py.
"""
import json

SYNC = b'SYNC'        # {"topics": [...], "cursors": {topic: seq}, "running": n, "slots": n, "busy": n}
                      # slots: commands it runs at once (0: takes no pool calls); busy: other calls it holds
STARTED = b'STARTED'  # {"run_id", "started"} sent only for a job still running a moment after its start
RESULT = b'RESULT'    # {"run_id", "state", "rc", "signal", "reason", "started", "finished", "output_tail"}
OUTPUT = b'OUTPUT'    # {"run_id", "offset", "text"} output of a running command since `offset` (not acked:
                      # RESULT carries the whole output, bounded, as "output" and "output_dropped")
BYE = b'BYE'          # {} the worker is leaving; stop expecting it for new runs
CALLS = b'CALLS'      # {"calls": [call...], "cursors": {topic: seq}}
ACK = b'ACK'          # {"run_ids": [...]} those results are journaled; drop them from the outbox
CALL = b'CALL'        # call JSON: a live call sent directly, to a worker kept off PUB (topic limits)
ASSIGN = b'ASSIGN'    # call JSON: a pool call given to this worker; it may not start it before GO
TAKE = b'TAKE'        # {"run_id"} the worker has recorded the pool call and asks to start it
GO = b'GO'            # {"run_id"} the broker has recorded that this worker has it: start it
REFUSE = b'REFUSE'    # {"run_id"} that pool call is not (or no longer) this worker's: drop it

DELIMITER = b'\0'     # SUB matches by prefix: without it 'build' would also get 'builder'

# A worker's state for a run: open until its result comes, then final.
PENDING, RUNNING = 'pending', 'running'
SUCCEEDED, FAILED, INTERRUPTED, EXPIRED = 'succeeded', 'failed', 'interrupted', 'expired'
OPEN_STATES = (PENDING, RUNNING)
FINAL_STATES = (SUCCEEDED, FAILED, INTERRUPTED, EXPIRED)
OPEN_SET = frozenset(OPEN_STATES)
RUN_ENDED = (SUCCEEDED, FAILED)    # a run's own final states: any worker's failure is the run's


def run_state(worker_states) -> str:
    """A run's state from its workers' states: the one rule, used everywhere."""
    states = set(worker_states)
    if states <= {PENDING}:    # none at all, or nobody took it yet
        return PENDING
    if states & OPEN_SET:
        return RUNNING
    return SUCCEEDED if states == {SUCCEEDED} else FAILED


def topic_frame(topic: str) -> bytes:
    return topic.encode() + DELIMITER


def pack(obj) -> bytes:
    return json.dumps(obj, separators=(',', ':')).encode()


def _no_constant(name):
    raise ValueError(f'{name} is not JSON')


_decoder = json.JSONDecoder(parse_constant=_no_constant)    # made once: json.loads builds one per call


def unpack(data: bytes) -> dict:
    """Decode a JSON object; raise ValueError for anything else (NaN, Infinity, bad UTF-8, too deep)."""
    try:
        obj = _decoder.decode(data.decode())
    except RecursionError:
        raise ValueError('payload nested too deeply') from None
    if not isinstance(obj, dict):
        raise ValueError('payload is not a JSON object')
    return obj


def is_call(call, topics=None) -> bool:
    """A well-formed call (on one of `topics`, if given): anything else is dropped unseen."""
    return (isinstance(call, dict)
            and all(isinstance(call.get(k), str) and 0 < len(call[k]) <= 200 for k in ('run_id', 'job', 'topic'))
            and is_int(call.get('seq')) and call['seq'] != 0    # < 0: a pool call, outside the sequence
            and isinstance(call.get('params'), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in call['params'].items())
            and (topics is None or call['topic'] in topics))


def is_int(value) -> bool:
    """A whole number SQLite can store (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**62 < value < 2**62


def number(value) -> float | None:
    """A finite number from the wire, or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e15:
        return float(value)
    return None


def text(value, limit: int = 1000) -> str | None:
    """A string from the wire, cut to `limit`, or None."""
    return value[:limit] if isinstance(value, str) else None
