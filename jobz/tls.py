"""TLS helpers: the broker's folder of enrolled client certificates, and the agents' HTTPS client."""
import logging
import os
import ssl

from .ca import CAError, fingerprint

log = logging.getLogger('jobz.tls')


class ClientCerts:
    """A folder of client certificates (NAME.crt) whose holders may call the TLS front end.

    Mongrel2 has no revocation list: removing a file here revokes that client within seconds."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{folder}: no such folder of client certificates')
        self.folder = folder
        self.names: dict[str, str] = {}     # 40 upper-case hex digits of the SHA1 -> name
        self.signature = None
        self.refresh()

    def refresh(self) -> None:
        files = sorted(f for f in os.listdir(self.folder) if f.endswith('.crt'))
        signature = [(f, os.stat(os.path.join(self.folder, f)).st_mtime_ns) for f in files]
        if signature == self.signature:
            return
        names = {}
        for f in files:
            try:
                names[fingerprint(os.path.join(self.folder, f))[:40]] = f[:-len('.crt')]
            except CAError as e:
                log.error('%s; ignored', e)
        self.names, self.signature = names, signature
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
