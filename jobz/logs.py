"""Log records: one logfmt line each, with the run and job they are about."""
import json
import logging
import sys
import time


class LogfmtFormatter(logging.Formatter):
    """One line per record as key=value pairs (logfmt): readable, and parsed by journald's and Loki's tools.

    `who` names the process (worker:w1); a record about a run carries run= and job= (see about())."""

    converter = time.gmtime    # timestamps in UTC, marked Z

    def __init__(self, who: str):
        super().__init__()
        self.who = who

    def format(self, record: logging.LogRecord) -> str:
        pairs = [('ts', self.formatTime(record, '%Y-%m-%dT%H:%M:%S') + f'.{int(record.msecs):03d}Z'),
                 ('level', record.levelname.lower()), ('who', self.who), ('logger', record.name)]
        pairs += [(k, getattr(record, k)) for k in ('run', 'job') if getattr(record, k, None)]
        message = record.getMessage()
        if record.exc_info:
            message += '\n' + self.formatException(record.exc_info)
        pairs.append(('msg', message))
        return ' '.join(f'{k}={_logfmt_value(str(v))}' for k, v in pairs)


def _logfmt_value(v: str) -> str:
    # Quoted (JSON escapes) when it has spaces, quotes, = or control characters: one record, one line.
    return v if v and all(c.isprintable() and c not in ' "=\\' for c in v) else json.dumps(v, ensure_ascii=False)


def about(run_id, job=None) -> dict:
    """`extra=` for a log record about a run: its run= and job= fields."""
    return {'run': str(run_id), 'job': job}


def configure_logging(level: str, who: str) -> None:
    """Log to stderr, one logfmt line per record, from `level` on (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(who))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
