"""TLS helpers: the broker's folder of enrolled client certificates, and the agents' HTTPS client."""
import logging
import ssl

from .ca import CAError, allowed_jobs, pem_fingerprint, read_cert
from .files import WatchedFolder

log = logging.getLogger('jobz.tls')


class ClientCerts:
    """A folder of client certificates (NAME.crt) whose holders may call the TLS front end.

    A file that starts with `# jobs: deploy_*,report` (jobz-ca client --jobs) lets its holder start
    only those jobs. Mongrel2 has no revocation list: removing a file here revokes that client
    within seconds."""

    def __init__(self, folder: str):
        self.watch = WatchedFolder(folder, '.crt')
        self.names: dict[str, str] = {}     # 40 upper-case hex digits of the SHA1 -> name
        self.jobs: dict[str, tuple[str, ...] | None] = {}    # name -> job patterns it may start (None: any)
        self.refresh()

    def refresh(self) -> None:
        files = self.watch.changed()
        if files is None:
            return
        names, jobs = {}, {}
        for name, path in files:
            try:
                text = read_cert(path)
                names[pem_fingerprint(text, path)[:40]] = name
            except CAError as e:
                if not isinstance(e.__cause__, FileNotFoundError):    # removed while we looked: revoked
                    log.error('%s; ignored', e)
                continue
            jobs[name] = allowed_jobs(text)
        self.names, self.jobs = names, jobs
        log.info('enrolled clients: %s', ', '.join(sorted(names.values())) or 'none')

    def name_of(self, fp: str) -> str | None:
        return self.names.get(fp)


def client_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """The SSL context for calling the TLS front end with our own client certificate (or None)."""
    if not (cert or ca):
        return None
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
