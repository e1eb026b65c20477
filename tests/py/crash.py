"""Crash-test client for snapblk (python3-libnbd).

  crash.py write URI LOG SEED FIRST CLI DIR VOLUME
      Opens two connections to URI (multi-conn: a flush on either covers writes completed on
      both), prints "connected", then writes self-describing 4 KiB blocks at pseudo-random
      offsets until the server goes away, appending to LOG:
        B              a session starts (one per daemon run)
        W i block      before write i is sent (so a write in flight at the crash is known)
        U i            write i, sent with FUA, was acknowledged (it is durable)
        F i            a FLUSH sent after writes ..=i were acknowledged completed
        S name n       `snapblk snapshot create` returned: writes < n of this session are in it
      Exits 0 when the server goes away (the test kills it); 1 on anything unexpected.

  crash.py verify URI_TEMPLATE LOG VOLUME [SNAPSHOT...]
      URI_TEMPLATE contains EXPORT, replaced by the export name. Checks the volume after the
      last session in LOG, and the named snapshots, against this model:
        - state[k] is what every block held when session k started: what the verify after the
          previous crash read (saved as LOG.state.k); all zeros for session 0;
        - a write is durable when a later FLUSH or its FUA completed, or a snapshot completed
          after it (a snapshot that survived holds it, and the volume may not go back behind
          its last snapshot: the dirty bitmap would then be wrong);
        - after session k, a block with a durable write in session k holds its last durable
          write or any later write of the session; a block without one holds state[k] or
          any write of the session to it; nothing else (no torn, misplaced or foreign data);
        - snapshot (name, n) of session k holds, for every block, exactly the last write < n
          of session k to it, or else state[k].
      Saves the volume's state as LOG.state.(k+1). Exits 1 naming the first bad block.
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


@functools.lru_cache(maxsize=65536)
def content(i, block):
    head = MAGIC + i.to_bytes(8, "little") + block.to_bytes(8, "little")
    return head + random.Random(i * 1_000_003 + block).randbytes(BLOCK - len(head))


def write(uri, log_path, seed, first, cli, dirname, volume):
    rng = random.Random(seed)
    handles = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    if not handles[0].can_multi_conn():
        sys.exit("the export does not advertise multi-conn")
    blocks = handles[0].get_size() // BLOCK
    i = first
    snaps = 0
    with open(log_path, "a") as log:

        def note(line):
            log.write(line + "\n")
            log.flush()

        note("B")
        print("connected", flush=True)  # the test may kill the daemon from now on
        try:
            while True:
                b = rng.randrange(blocks)
                h = rng.choice(handles)
                fua = rng.random() < 0.05
                note(f"W {i} {b}")
                h.pwrite(content(i, b), b * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
                if fua:
                    note(f"U {i}")
                i += 1
                if rng.random() < 0.15:
                    rng.choice(handles).flush()
                    note(f"F {i - 1}")
                if snaps < 4 and rng.random() < 0.004:  # a few per session keeps verify fast
                    snaps += 1
                    name = f"c{seed}x{snaps}"
                    r = subprocess.run(
                        [cli, "--dir", dirname, "snapshot", "create", volume, "--name", name],
                        capture_output=True,
                        timeout=60,
                    )
                    if r.returncode != 0:
                        return  # the daemon is gone (or going): the snapshot may or may not exist
                    note(f"S {name} {i}")
        except nbd.Error:
            return  # the server was killed mid-stream: expected


class Session:
    def __init__(self, index):
        self.index = index
        self.writes = []  # (i, block) in order
        self.durable = set()
        self.flushed = -1  # writes <= this are durable
        self.snaps = []  # (name, n)


def parse(log_path):
    sessions = []
    for line in open(log_path):
        p = line.split()
        if not p:
            continue
        if p[0] == "B":
            sessions.append(Session(len(sessions)))
            continue
        s = sessions[-1]
        if p[0] == "W" and len(p) == 3:
            s.writes.append((int(p[1]), int(p[2])))
        elif p[0] == "U" and len(p) == 2:
            s.durable.add(int(p[1]))
        elif p[0] == "F" and len(p) == 2:
            s.flushed = max(s.flushed, int(p[1]))
        elif p[0] == "S" and len(p) == 3:
            s.snaps.append((p[1], int(p[2])))
            # A completed snapshot makes everything before it durable.
            s.flushed = max(s.flushed, int(p[2]) - 1)
        # anything else: a line cut short when the writer stopped; W/U/F/S are written whole
    return sessions


def load_state(log_path, k):
    path = f"{log_path}.state.{k}"
    if k == 0:
        return {}
    if not os.path.exists(path):
        sys.exit(f"missing {path}: every session must be followed by a verify")
    return {int(b): i for b, i in json.load(open(path)).items()}


def read_all(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    data = bytearray()
    for off in range(0, size, 4 << 20):
        data += h.pread(min(4 << 20, size - off), off)
    h.shutdown()
    return bytes(data)


ZERO = bytes(BLOCK)


def decode(data, b, what):
    blk = data[b * BLOCK:(b + 1) * BLOCK]
    if blk == ZERO:
        return None
    if blk[:8] != MAGIC:
        sys.exit(f"{what} block {b}: holds data no write produced: {blk[:32].hex()}...")
    i = int.from_bytes(blk[8:16], "little")
    home = int.from_bytes(blk[16:24], "little")
    if home != b:
        sys.exit(f"{what} block {b}: holds write {i} of block {home} (misplaced)")
    if blk != content(i, b):
        sys.exit(f"{what} block {b}: write {i} is torn")
    return i


def verify(template, log_path, volume, snapshots):
    sessions = parse(log_path)
    if not sessions:
        sys.exit("empty log")
    k = len(sessions) - 1
    s = sessions[k]
    start = load_state(log_path, k)
    per_block = {}
    for i, b in s.writes:
        per_block.setdefault(b, []).append(i)
    data = read_all(template.replace("EXPORT", volume))
    nblocks = len(data) // BLOCK
    state = {}
    for b in range(nblocks):
        got = decode(data, b, volume)
        ws = per_block.get(b, [])
        durable = [i for i in ws if i <= s.flushed or i in s.durable]
        if durable:
            ok = got is not None and got in ws and got >= durable[-1]
            want = f"write {durable[-1]} (durable) or a later one of {ws}"
        else:
            ok = got == start.get(b) or got in ws
            want = f"{start.get(b)} (before this session) or one of {ws}"
        if not ok:
            sys.exit(f"{volume} block {b} after session {k}: holds {got}, expected {want}")
        if got is not None:
            state[b] = got
    with open(f"{log_path}.state.{k + 1}", "w") as f:
        json.dump({str(b): i for b, i in state.items()}, f)

    snap_session = {name: (sess, n) for sess in sessions for name, n in sess.snaps}
    for name in snapshots:
        if name not in snap_session:
            sys.exit(f"snapshot {name} is not in the log")
        sess, n = snap_session[name]
        want = dict(load_state(log_path, sess.index))
        for i, b in sess.writes:
            if i < n:
                want[b] = i
        sdata = read_all(template.replace("EXPORT", f"{volume}@{name}"))
        if len(sdata) != len(data):
            sys.exit(f"snapshot {name}: size {len(sdata)}, expected {len(data)}")
        for b in range(nblocks):
            got = decode(sdata, b, f"{volume}@{name}")
            if got != want.get(b):
                sys.exit(f"snapshot {name} (session {sess.index}, before write {n}) block {b}: "
                         f"holds {got}, expected {want.get(b)}")
    print(f"session {k}: {len(s.writes)} writes, {len(per_block)} blocks, "
          f"{sum(1 for i, _ in s.writes if i <= s.flushed or i in s.durable)} durable, "
          f"{len(s.snaps)} snapshots taken; {len(snapshots)} snapshots verified")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "write" and len(sys.argv) == 9:
        uri, log, seed, first, cli, dirname, volume = sys.argv[2:9]
        write(uri, log, int(seed), int(first), cli, dirname, volume)
    elif cmd == "verify" and len(sys.argv) >= 5:
        verify(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        sys.exit(__doc__)
