"""Crash-test client for snapblk (python3-libnbd).

  crash.py write URI LOG SEED FIRST CLI DIR VOLUME
      Writes 4 KiB blocks at pseudo-random offsets until the server goes away, logging to LOG:
        B           at the start of a session (a flush covers only its own session's writes)
        W i block   before write i is sent (so writes in flight at a crash are known)
        F i         after a FLUSH that followed writes 0..=i returned (they are durable)
        S name n    after `snapblk snapshot create` returned: writes 0..n-1 are in it
  crash.py verify URI LOG VOLUME [SNAPSHOT...]
      Reads the volume (and the named snapshots) and checks them against LOG:
        - a block whose last write covered by a flush (of the same session) is j holds write j
          or a later write;
          never-flushed blocks hold zeros or one of their writes;
        - a snapshot holds exactly, for every block, the last write before it in its session,
          or else what the block held when the session started (recorded by the previous
          verify in LOG.state.N: unflushed writes of a crashed session may be lost).
      Exits 1 with a message naming the first bad block.
Every block written is self-describing: magic, write index, block number, then bytes derived
from them, so a torn or misplaced block is detected.
"""
import functools
import json
import os
import random
import subprocess
import sys

import nbd

BLOCK = 4096
MAGIC = b"SNAPBLKT"


@functools.lru_cache(maxsize=None)
def content(i, block):
    head = MAGIC + i.to_bytes(8, "little") + block.to_bytes(8, "little")
    return head + random.Random(i * 1_000_003 + block).randbytes(BLOCK - len(head))


def write(uri, log_path, seed, first, cli, dirname, volume):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // BLOCK
    i = first
    snap = 0
    with open(log_path, "a") as log:
        log.write("B\n")
        log.flush()
        try:
            while True:
                b = rng.randrange(blocks)
                log.write(f"W {i} {b}\n")
                log.flush()
                h.pwrite(content(i, b), b * BLOCK)
                i += 1
                if rng.random() < 0.2:
                    h.flush()
                    log.write(f"F {i - 1}\n")
                    log.flush()
                if snap < 4 and rng.random() < 0.004:  # a few per session keeps verify fast
                    snap += 1
                    name = f"c{seed}x{snap}"
                    r = subprocess.run([cli, "--dir", dirname, "snapshot", "create", volume, "--name", name],
                                       capture_output=True)
                    if r.returncode != 0:
                        return  # the daemon is gone
                    log.write(f"S {name} {i}\n")
                    log.flush()
        except nbd.Error:
            return  # killed mid-stream: expected


def parse(log_path):
    """Returns {block: [write indexes]}, the set of durable write indexes, and snapshots."""
    writes = {}  # block -> list of write indexes, ascending
    sessions = []  # [(write indexes, highest flushed index)]
    snaps = {}
    for line in open(log_path):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "B":
            sessions.append(([], -1))
        elif parts[0] == "W" and len(parts) == 3:
            writes.setdefault(int(parts[2]), []).append(int(parts[1]))
            sessions[-1][0].append(int(parts[1]))
        elif parts[0] == "F":
            sessions[-1] = (sessions[-1][0], max(sessions[-1][1], int(parts[1])))
        elif parts[0] == "S":
            snaps[parts[1]] = (int(parts[2]), len(sessions) - 1)
    durable = {i for ws, flushed in sessions for i in ws if i <= flushed}
    return writes, durable, snaps


def writes_by_session(log_path):
    sessions = []
    for line in open(log_path):
        if line.startswith("B"):
            sessions.append([])
        elif line.startswith("W "):
            sessions[-1].append(int(line.split()[1]))
    return sessions


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    data = bytearray()
    for off in range(0, size, 1 << 20):
        data += h.pread(min(1 << 20, size - off), off)
    h.shutdown()
    return bytes(data)


def decode(data, b):
    blk = data[b * BLOCK:(b + 1) * BLOCK]
    if blk == bytes(BLOCK):
        return None
    if blk[:8] != MAGIC or int.from_bytes(blk[16:24], "little") != b:
        raise ValueError(f"block {b} holds foreign or torn data")
    i = int.from_bytes(blk[8:16], "little")
    if blk != content(i, b):
        raise ValueError(f"block {b} (write {i}) is torn")
    return i


def verify(uri_base, log_path, volume, snapshots):
    writes, durable_writes, snaps = parse(log_path)
    data = read_all(uri_base.replace("VOLUME", volume))
    for b in range(len(data) // BLOCK):
        ws = writes.get(b, [])
        got = decode(data, b)
        durable = [i for i in ws if i in durable_writes]
        if got is None:
            if durable:
                sys.exit(f"block {b}: lost flushed write {durable[-1]} (reads zeros)")
        elif got not in ws:
            sys.exit(f"block {b}: holds write {got}, never written there")
        elif durable and got < durable[-1]:
            sys.exit(f"block {b}: holds write {got}, older than flushed write {durable[-1]}")
    # What every block holds now is what the next session starts from.
    state = {b: decode(data, b) for b in range(len(data) // BLOCK)}
    with open(f"{log_path}.state.{len(writes_by_session(log_path))}", "w") as f:
        json.dump({str(b): i for b, i in state.items() if i is not None}, f)
    for name in snapshots:
        if name not in snaps:
            continue
        n, session = snaps[name]
        start_path = f"{log_path}.state.{session}"
        start = {int(k): v for k, v in json.load(open(start_path)).items()} if os.path.exists(start_path) else {}
        in_session = set(writes_by_session(log_path)[session])
        sdata = read_all(uri_base.replace("VOLUME", f"{volume}@{name}"))
        for b in range(len(sdata) // BLOCK):
            before = [i for i in writes.get(b, []) if i < n and i in in_session]
            want = before[-1] if before else start.get(b)
            got = decode(sdata, b)
            if got != want:
                sys.exit(f"snapshot {name} block {b}: holds {got}, expected {want}")
    print(f"ok: {len(writes)} blocks written, {len(durable_writes)} writes flushed, {len(snapshots)} snapshots checked")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "write":
        uri, log, seed, first, cli, dirname, volume = sys.argv[2:9]
        write(uri, log, int(seed), int(first), cli, dirname, volume)
    elif cmd == "verify":
        verify(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        sys.exit(f"unknown command {cmd}")
