"""Default addresses, shared by the scripts, the stack runner and the docs."""
import socket

PORT = 6769                                  # HTTP front end (Mongrel2)
PUB = 'tcp://127.0.0.1:6770'                 # broker PUB: live calls to workers
ROUTER = 'tcp://127.0.0.1:6771'              # broker ROUTER: sync, results, heartbeats
M2_RECV = 'tcp://127.0.0.1:6772'             # Mongrel2 handler send_spec: requests to the broker
M2_SEND = 'tcp://127.0.0.1:6773'             # Mongrel2 handler recv_spec: replies from the broker
M2_IDENT = 'jobz'                            # handler send_ident = recv_ident
URL = f'http://127.0.0.1:{PORT}'
JOBS = 'jobs/'
HOME = 'var/'
HOSTNAME = socket.gethostname().split('.')[0] or 'worker'
