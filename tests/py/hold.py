"""Connects to an NBD export and stays connected until the server closes the connection.

  hold.py URI [SECONDS]

Prints "connected" once attached; exits 0 when the server disconnects it, 1 if the connection
is still usable after SECONDS (default 30).
"""
import sys
import time

import nbd

uri = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
h = nbd.NBD()
h.connect_uri(uri)
print("connected", flush=True)
sys.stdout.close()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        h.pread(512, 0)
    except nbd.Error:
        sys.exit(0)
    time.sleep(0.05)
print(f"hold.py: still connected to {uri} after {seconds} s", file=sys.stderr)
sys.exit(1)
