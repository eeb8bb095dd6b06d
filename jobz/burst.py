"""What one burst of the broker's loop did, held until its commit.

Nothing in it happens before the journal commit: calls are published, answers and ACKs sent,
waits held, counters moved and lines logged only after it. A commit that fails throws the whole
burst away (its HTTP requests then get 500), so nothing outside the journal ever says a run
exists that the journal does not hold.
"""
from dataclasses import dataclass, field


@dataclass
class Burst:
    calls: list = field(default_factory=list)       # calls of new runs, to publish
    answers: list = field(default_factory=list)     # (request, status, body) to send
    waits: list = field(default_factory=list)       # (run_id, request, caller, deadline): wait= to hold
    replies: list = field(default_factory=list)     # frames for the ROUTER: CALLS answers to SYNC
    sends: list = field(default_factory=list)       # frames for the ROUTER that must wait for the commit (pool)
    acks: dict = field(default_factory=dict)        # a worker's routing id -> run ids of its journaled results
    touched: set = field(default_factory=set)       # runs whose results changed
    started: list = field(default_factory=list)     # job of each run journaled (for /metrics)
    ended: list = field(default_factory=list)       # (job, state, seconds) of each run that ended
    logs: list = field(default_factory=list)        # (level, extra, message, *args), logged last

    def mark(self) -> tuple:
        """Where the lists a request adds to stand now (see rewind)."""
        return len(self.calls), len(self.waits), len(self.started), len(self.logs)

    def rewind(self, mark: tuple) -> None:
        """Forget what a request added since `mark`: its journal writes were undone too."""
        calls, waits, started, logs = mark
        del self.calls[calls:], self.waits[waits:], self.started[started:], self.logs[logs:]

    def idle(self) -> bool:
        """Nothing in it that a client waits for: worker reports alone may wait for company."""
        return not (self.answers or self.calls or self.waits or self.sends)
