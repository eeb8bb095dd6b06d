"""Default addresses, shared by the scripts, the stack runner and the docs."""
import socket

PORT = 6769                                  # HTTP front end (Mongrel2)
PUB = 'tcp://127.0.0.1:6770'                 # broker PUB: live calls to workers
ROUTER = 'tcp://127.0.0.1:6771'              # broker ROUTER: sync, results, heartbeats
M2_RECV = 'tcp://127.0.0.1:6772'             # Mongrel2 handler send_spec: requests to the broker
M2_SEND = 'tcp://127.0.0.1:6773'             # Mongrel2 handler recv_spec: replies from the broker
M2_IDENT = 'jobz'                            # handler send_ident = recv_ident
TLS_PORT = 6443                              # HTTPS front end (a second Mongrel2 server), when used
M2_TLS_RECV = 'tcp://127.0.0.1:6774'         # its handler send_spec
M2_TLS_SEND = 'tcp://127.0.0.1:6775'         # its handler recv_spec (ident tls-jobz: no prefix of 'jobz')
URL = f'http://127.0.0.1:{PORT}'
JOBS = 'jobs/'
HOME = 'var/'
HOSTNAME = socket.gethostname().split('.')[0] or 'worker'
