"""Command-line plumbing shared by the scripts: flags with JOBZ_* fallbacks, logging."""
import argparse
import logging
import os
import sys

from .jobfile import JobFileError, load_jobs


class Parser(argparse.ArgumentParser):
    def option(self, *flags, env: str, default=None, help: str = '', shown=None, **kw):
        """A flag whose default comes from the environment variable `env`, then `default`."""
        value = os.environ.get(env, default)
        shown = shown or ('none' if default is None else default)
        self.add_argument(*flags, default=value, help=f'{help} (default: {shown}; env {env})', **kw)

    def jobs_option(self):
        default = os.environ.get('JOBZ_JOBS', 'jobs/')
        self.add_argument('--jobs', nargs='+', default=default.split(':'), metavar='PATH',
                          help='job files or folders of *.yaml (default: jobs/; env JOBZ_JOBS, '
                               'several separated by colons)')


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format='%(asctime)s %(name)s %(levelname)s %(message)s')


def load_or_exit(paths, log: logging.Logger) -> dict:
    """Load job files or stop the program with a message naming file, job and key."""
    try:
        return load_jobs(paths)
    except JobFileError as e:
        log.error('%s', e)
        sys.exit(f'error: {e}')
