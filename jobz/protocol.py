"""Words and framing of the broker <-> worker protocol (all in one place).

Broker PUB -> worker SUB:   [topic + b'\\0', call JSON]          live calls (fast path)
Worker DEALER -> ROUTER:    [verb, JSON]                         SYNC, STARTED, RESULT, BYE
Broker ROUTER -> DEALER:    [verb, JSON]                         CALLS, ACK, CALL

A call is {"run_id", "job", "topic", "seq", "params", "key", "created"}. Every call
carries its per-topic sequence number; SYNC sends the worker's cursors and CALLS
answers with the calls it missed, so PUB may drop messages without losing jobs.
"""
import json

SYNC = b'SYNC'        # {"topics": [...], "cursors": {topic: seq}, "running": n}
STARTED = b'STARTED'  # {"run_id", "started"}
RESULT = b'RESULT'    # {"run_id", "state", "rc", "signal", "reason", "started", "finished", "output_tail"}
BYE = b'BYE'          # {} the worker is leaving; stop expecting it for new runs
CALLS = b'CALLS'      # {"calls": [call...], "cursors": {topic: seq}}
ACK = b'ACK'          # {"run_id"} the result is journaled; drop it from the outbox
CALL = b'CALL'        # call JSON: a live call sent directly, to a worker kept off PUB (topic limits)

DELIMITER = b'\0'     # SUB matches by prefix: without it 'build' would also get 'builder'
FINAL_STATES = ('succeeded', 'failed', 'interrupted', 'expired')


def topic_frame(topic: str) -> bytes:
    return topic.encode() + DELIMITER


def pack(obj) -> bytes:
    return json.dumps(obj, separators=(',', ':')).encode()


def unpack(data: bytes) -> dict:
    """Decode a JSON object; raise ValueError for anything else."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError('payload is not a JSON object')
    return obj
