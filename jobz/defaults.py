"""Default addresses, shared by the scripts, the stack runner and the docs."""
import socket

PORT = 6769                                  # HTTP front end (Mongrel2)
PUB = 'tcp://127.0.0.1:6770'                 # broker PUB: live calls to workers
ROUTER = 'tcp://127.0.0.1:6771'              # broker ROUTER: sync, results, heartbeats
# Mongrel2's handler sockets: ipc:// files it binds in handlers/ of its chroot (var/mongrel2 for
# `make run`), a folder only Mongrel2 and the broker can reach. Relative to the working folder.
M2_RECV = 'ipc://var/mongrel2/handlers/jobz.req'     # handler send_spec: requests to the broker
M2_SEND = 'ipc://var/mongrel2/handlers/jobz.rep'     # handler recv_spec: replies from the broker
M2_IDENT = 'jobz'                            # handler send_ident = recv_ident
TLS_PORT = 6443                              # HTTPS front end (a second Mongrel2 server), when used
M2_TLS_RECV = 'ipc://var/mongrel2/handlers/tls.req'  # its handler send_spec
M2_TLS_SEND = 'ipc://var/mongrel2/handlers/tls.rep'  # its handler recv_spec (ident tls-jobz: no prefix of 'jobz')
URL = f'http://127.0.0.1:{PORT}'
JOBS = 'jobs/'
HOME = 'var/'
HOSTNAMES = 'localhost,127.0.0.1,::1'        # Host names the broker serves (others: DNS rebinding)
HOSTNAME = socket.gethostname().split('.')[0] or 'worker'
