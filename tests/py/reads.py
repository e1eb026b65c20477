"""Timed and concurrent reads of an NBD export (python3-libnbd).

  reads.py latency URI OFFSET...
      Reads 4 KiB at each offset in turn on one connection; prints a JSON list of the
      latencies in milliseconds.
  reads.py same URI OFFSET N
      Opens N connections and has each read 4 KiB at OFFSET at the same time; prints the
      number of reads that returned identical data.
"""
import json
import sys
import time

import nbd


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def latency(uri, offsets):
    h = connect(uri)
    out = []
    for off in offsets:
        t = time.perf_counter()
        h.pread(4096, off)
        out.append((time.perf_counter() - t) * 1000.0)
    h.shutdown()
    print(json.dumps(out))


def same(uri, offset, n):
    handles = [connect(uri) for _ in range(n)]
    bufs = [nbd.Buffer(4096) for _ in range(n)]
    cookies = [h.aio_pread(b, offset) for h, b in zip(handles, bufs)]
    for h, c in zip(handles, cookies):
        while not h.aio_command_completed(c):
            h.poll(-1)
    data = [b.to_bytearray() for b in bufs]
    print(sum(1 for d in data if d == data[0]))
    for h in handles:
        h.shutdown()


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "latency" and len(sys.argv) >= 4:
        latency(sys.argv[2], [int(x) for x in sys.argv[3:]])
    elif cmd == "same" and len(sys.argv) == 5:
        same(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(__doc__)
