"""Connects to an NBD export and stays connected until the server closes the connection.

Prints "connected" once attached; exits 0 when the server disconnects it (the expected end),
1 if the connection is still usable after 30 s.
"""
import sys
import time

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("connected", flush=True)
deadline = time.time() + 30
while time.time() < deadline:
    try:
        h.pread(512, 0)
    except nbd.Error:
        sys.exit(0)
    time.sleep(0.05)
print("still connected after 30 s", file=sys.stderr)
sys.exit(1)
