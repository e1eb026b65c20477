"""Writes reproducible pseudo-random data to an NBD export (python3-libnbd).

  data.py fill URI OFFSET LENGTH SEED
      Writes LENGTH random bytes at OFFSET (in 1 MiB requests), then flushes.
  data.py scatter URI CLUSTER N SEED
      Writes N random clusters of CLUSTER bytes at distinct pseudo-random cluster-aligned
      offsets, then flushes. Prints the chosen cluster indexes, one per line.
"""
import random
import sys

import nbd


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def fill(uri, offset, length, seed):
    rng = random.Random(seed)
    h = connect(uri)
    pos = offset
    while pos < offset + length:
        n = min(1 << 20, offset + length - pos)
        h.pwrite(rng.randbytes(n), pos)
        pos += n
    h.flush()
    h.shutdown()


def scatter(uri, cluster, n, seed):
    rng = random.Random(seed)
    h = connect(uri)
    clusters = h.get_size() // cluster
    chosen = rng.sample(range(clusters), n)
    for c in chosen:
        h.pwrite(rng.randbytes(cluster), c * cluster)
    h.flush()
    h.shutdown()
    for c in sorted(chosen):
        print(c)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "fill" and len(sys.argv) == 6:
        fill(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "scatter" and len(sys.argv) == 6:
        scatter(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)
