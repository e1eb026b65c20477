"""Randomized kill -9 soak of the real snapblk daemon (issue 18 §2). Run it via scripts/soak.

  soak.py --bin SNAPBLK --kill N [--seed S] [--dir D] [--keep]

One process drives everything: it starts `snapblk serve --dir D/daemon`, runs a random
workload on a few small volumes (libnbd, one or two connections per volume, for I/O; the CLI
with --json for control), kills the daemon with SIGKILL (by its pid) at a random moment,
restarts it on the same directory and checks every invariant against a model. N times; then
a clean stop (SIGTERM) and a last restart, after which every acknowledged write must be there.

Every random choice comes from the seed (kill times too), so `--seed S` replays the same
choices; timing can differ, and with it which operation the kill interrupts.

The model (see docs/SOAK.md):
  - every 4 KiB block a write puts down describes itself (write id and block index, and a fill
    derived from both), so a read tells which write it holds, or that it is torn, misplaced
    or data no write produced; trims and write-zeroes put down zeros;
  - a volume's *base* is what the check after the last restart read (or the snapshot's
    content after a rollback, clone or restore in this session);
  - an operation (write, trim, zero) is durable once a FLUSH on the same volume was
    acknowledged after the operation's own acknowledgement, or when it had FUA, or when a
    `snapshot create` of the volume answered after it;
  - after the kill, a block with a durable operation holds the value of its last durable one
    or of any later one of the session; a block without one holds its base value or the value
    of any operation of the session on it;
  - a snapshot that `snapshot create` answered holds exactly the volume as of the create, for
    ever (also once released: then read from the store); rollback, clone and restore give
    that content; objects whose create/delete answered exist/are gone; the one operation the
    kill interrupted may have happened or not (the listing decides for creates and deletes;
    a rollback may have happened or not, as a whole).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import nbd

BLOCK = 4096
MAGIC = b"SNAPSOAK"
ZERO = bytes(BLOCK)
CHUNK = 1 << 20
ZERO_CHUNK = bytes(CHUNK)
MIB = 1 << 20

MAX_VOLUMES = 5
MIN_VOLUMES = 2
MAX_SNAPS_PER_VOLUME = 3
HOT_BLOCKS = 256  # most I/O lands in the first 1 MiB of a volume: overwrites, shared clusters

# Errors the daemon may answer with for a valid request (then nothing changed).
SNAP_DELETE_REFUSALS = ("still load data from snapshot", "while their volume was still loading")
CLIENTS_CONNECTED = ("writable client(s) connected", "client(s) connected; disconnect", "while it was being rolled back")


def content(i, b):
    head = MAGIC + i.to_bytes(8, "little") + b.to_bytes(8, "little")
    fill = hashlib.blake2b(head, digest_size=64).digest() * (BLOCK // 64)
    return head + fill[: BLOCK - len(head)]


def decode(blk, b):
    """(value, problem): value 0 for zeros, the write id otherwise; problem a sentence or None."""
    if blk == ZERO:
        return 0, None
    if blk[:8] != MAGIC:
        return None, f"holds data no write produced: {bytes(blk[:32]).hex()}..."
    i = int.from_bytes(blk[8:16], "little")
    home = int.from_bytes(blk[16:24], "little")
    if home != b:
        return i, f"holds write {i} of block {home} (misplaced)"
    if blk != content(i, b):
        return i, f"holds write {i}, torn (not all of its 4 KiB are that write's)"
    return i, None


class Failure(Exception):
    def __init__(self, message, details=(), volume=None):
        super().__init__(message)
        self.message = message
        self.details = list(details)
        self.volume = volume


class Killed(Exception):
    """The daemon is gone because the soak killed it: the operation in flight may or may not
    have happened."""


class Daemon:
    def __init__(self, binary, dirname, log_path):
        self.bin = binary
        self.dir = dirname
        self.log_path = log_path
        self.proc = None
        self.log_pos = 0
        self.env = dict(os.environ, RUST_LOG="info")
        self.env.pop("SNAPBLK_DIR", None)

    @property
    def pid(self):
        return self.proc.pid

    def socket(self):
        return os.path.join(self.dir, "nbd.sock")

    def uri(self, export):
        return f"nbd+unix:///{export}?socket={self.socket()}"

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        self.log_pos = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        for name in ("control.sock", "nbd.sock"):
            p = os.path.join(self.dir, name)
            if os.path.exists(p):
                os.unlink(p)  # stale sockets of the killed daemon: ready = they exist again
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.bin, "serve", "--dir", self.dir, "--nbd-listen", "none"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=self.env,
            )
        deadline = time.monotonic() + 20
        while True:
            new = self.log_since_start()
            if (
                "snapblk: serving" in new
                and os.path.exists(os.path.join(self.dir, "control.sock"))
                and os.path.exists(self.socket())
            ):
                return
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise Failure(f"snapblk serve exited ({rc}) before it was ready", tail(new, 40))
            if time.monotonic() > deadline:
                self.kill()
                self.proc.wait()
                self.proc = None
                raise Failure("snapblk serve was not ready within 20 s", tail(new, 40))
            time.sleep(0.005)

    def log_since_start(self):
        with open(self.log_path, "rb") as f:
            f.seek(self.log_pos)
            return f.read().decode("utf-8", "replace")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def reap(self, timeout=30):
        """Waits for the process to end (after kill()); returns its status."""
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        return rc

    def terminate(self, timeout=30):
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            self.proc = None
            raise Failure(f"snapblk did not stop within {timeout} s of SIGTERM", tail(self.log_since_start(), 40))
        self.proc = None
        return rc

    def cli(self, args, timeout=120):
        r = subprocess.run(
            [self.bin, "--dir", self.dir, "--json", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=self.env,
        )
        return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def tail(text, n):
    return text.rstrip("\n").split("\n")[-n:]


def last_json(text):
    """The last JSON value in `text` (`--wait` prints progress lines before the result)."""
    dec = json.JSONDecoder()
    pos, last = 0, None
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return last
        last, pos = dec.raw_decode(text, pos)


class Vol:
    """What the model knows of one volume in the current session."""

    def __init__(self, name, vid, size, cluster, base, origin=None, hydrating=False):
        self.name = name
        self.id = vid
        self.size = size
        self.cluster = cluster
        self.nblocks = size // BLOCK
        self.base = dict(base)  # block -> write id (zeros left out)
        self.origin = origin  # how the base came to be, for reports
        self.hydrating = hydrating
        self.reset_session(self.base)
        self.conns = []  # open nbd handles
        self.pending = []  # (handle, cookie, op id, fua) of aio writes not yet collected

    def reset_session(self, base):
        self.base = dict(base)
        self.events = {}  # block -> [(op id, value)] in issue order (value 0 = zeros)
        self.acked = set()
        self.durable = set()
        self.alt = None  # exact content a rollback the kill interrupted would have set

    def exact(self):
        """Content now, when every operation was acknowledged."""
        out = dict(self.base)
        for b, evs in self.events.items():
            v = evs[-1][1]
            if v:
                out[b] = v
            else:
                out.pop(b, None)
        return out

    def allowed(self, b):
        evs = self.events.get(b, [])
        for j in range(len(evs) - 1, -1, -1):
            if evs[j][0] in self.durable:
                return {v for _, v in evs[j:]}, True
        return {self.base.get(b, 0)} | {v for _, v in evs}, False

    def touched(self):
        return set(self.base) | set(self.events)


class Snap:
    def __init__(self, vol, name, sid, data, created_in):
        self.vol = vol
        self.name = name
        self.id = sid
        self.content = dict(data)  # block -> write id
        self.created_in = created_in  # "iteration.op"

    @property
    def ref(self):
        return f"{self.vol}@{self.name}"


class Soak:
    def __init__(self, args, workdir):
        self.args = args
        self.seed = args.seed
        self.work = workdir
        self.ops_path = os.path.join(workdir, "ops.log")
        self.ops_log = open(self.ops_path, "a", buffering=1)
        self.daemon = Daemon(args.bin, os.path.join(workdir, "daemon"), os.path.join(workdir, "daemon.log"))
        self.vols = {}  # name -> Vol
        self.snaps = {}  # (vol, name) -> Snap
        self.next_id = 1  # write / zero operation ids, unique over the run
        self.next_name = 1
        self.origin = {}  # op id -> "iteration.op kind vol blocks" for reports
        self.it = 0
        self.opno = 0
        self.inflight = None  # the operation talking to the daemon now
        self.killed = False
        self.kill_lock = threading.Lock()
        self.timer = None
        self.plan = None
        self.armed = False
        self.stats = dict(ops=0, writes=0, zeroes=0, flushes=0, snapshots_created=0, snapshots_checked=0,
                          snapshots_from_store=0, verifies=0, restores=0, rollbacks=0, refused=0, gc=0,
                          volumes_checked=0, hydrations=0)
        self.meta_kinds = {}
        self.in_workload = False
        self.kill_info = None
        self.resolution = None
        self.t_session = time.monotonic()
        self.t_op = time.monotonic()
        self.prof = {}

    # ---- logging ----------------------------------------------------------------------------

    def log(self, line):
        self.ops_log.write(f"{self.it}.{self.opno} {line}\n")

    def note(self, line):
        self.ops_log.write(f"{self.it}.- {line}\n")

    def stamp(self):
        return f"[{(time.monotonic() - self.t_session) * 1000:.1f} ms]"

    # ---- the kill ---------------------------------------------------------------------------

    def fire(self):
        with self.kill_lock:
            if self.killed:
                return
            self.killed = True
            self.kill_info = f"at {self.stamp()[1:-1]}, op {self.opno} was running: {self.inflight_desc()}"
            self.daemon.kill()

    def inflight_desc(self):
        return self.inflight["desc"] if self.inflight else "none"

    def arm(self, why):
        if self.armed:
            return
        self.armed = True
        delay = self.plan["delay"]
        self.note(f"kill armed at op {self.opno} ({why}), fires in {delay * 1000:.1f} ms")
        if delay <= 0:
            self.fire()
        else:
            self.timer = threading.Timer(delay, self.fire)
            self.timer.daemon = True
            self.timer.start()

    def begin(self, kind, desc, meta=False, **extra):
        """Starts a primitive operation (one request to the daemon)."""
        if self.killed:
            raise Killed()
        self.opno += 1
        if self.in_workload:
            self.stats["ops"] += 1
        self.inflight = dict(kind=kind, desc=desc, **extra)
        p = self.plan
        if p and not self.armed and self.opno >= p["at"]:
            if p["mode"] == "time" or (p["mode"] == "meta" and meta) or self.opno >= p["at"] + 300:
                self.arm(f"before {desc}")
        self.log(desc)
        self.t_op = time.monotonic()

    def end(self, result="ok", meta=False):
        dt = (time.monotonic() - self.t_op) * 1000
        self.prof[self.inflight["kind"]] = self.prof.get(self.inflight["kind"], 0) + dt
        self.log(f"  -> {result} ({dt:.1f} ms, ended at {self.stamp()[1:-1]})")
        self.inflight = None
        p = self.plan
        if p and not self.armed and p["mode"] == "after-meta" and meta and self.opno >= p["at"]:
            self.arm("after a control operation")

    def nbd_failed(self, e):
        if self.killed:
            raise Killed()
        raise Failure(f"NBD error while the daemon should be running: {e} (op {self.inflight_desc()})",
                      self.daemon_state())

    def daemon_state(self):
        rc = self.daemon.proc.poll() if self.daemon.proc else None
        head = [f"the daemon (pid {self.daemon.pid if self.daemon.proc else '-'}) "
                + ("is still running" if rc is None else f"exited by itself with status {rc}")]
        return head + ["daemon log (last lines):"] + ["  " + l for l in tail(self.daemon.log_since_start(), 20)]

    def cli(self, args, refusals=()):
        rc, out, err = self.daemon.cli(args)
        if rc == 0:
            return last_json(out) if out.strip() else None
        if self.killed:
            raise Killed()
        for pattern in refusals:
            if pattern in err:
                return Refused(err.strip())
        raise Failure(f"`snapblk {' '.join(args)}` failed (exit {rc}) while the daemon should be running: "
                      f"{err.strip()}", (["its output:"] + ["  " + l for l in tail(out, 20)] if out.strip() else [])
                      + self.daemon_state())

    # ---- connections ------------------------------------------------------------------------

    def conn(self, v, rng):
        if not v.conns or (len(v.conns) < 2 and rng.random() < 0.3):
            self.begin("connect", f"connect {v.name} (connection {len(v.conns)})")
            h = nbd.NBD()
            try:
                h.connect_uri(self.daemon.uri(v.name))
            except nbd.Error as e:
                self.nbd_failed(e)
            if not h.can_multi_conn():
                raise Failure(f"export {v.name} does not advertise multi-conn")
            if h.get_size() != v.size:
                raise Failure(f"export {v.name} has size {h.get_size()}, expected {v.size}")
            v.conns.append(h)
            self.end()
        i = rng.randrange(len(v.conns))
        return i, v.conns[i]

    def close_conns(self, v):
        self.drain(v)
        if v.conns:
            self.note(f"close {len(v.conns)} connection(s) of {v.name}")
        for h in v.conns:
            try:
                h.shutdown()
            except nbd.Error:
                pass
        v.conns = []

    def drop_all_conns(self):
        for v in self.vols.values():
            v.conns = []
            v.pending = []

    def drain(self, v):
        """Collects the acknowledgements of v's aio writes."""
        if not v.pending:
            return
        self.begin("drain", f"collect {len(v.pending)} aio write(s) of {v.name}")
        try:
            for h in {id(h): h for h, _, _, _ in v.pending}.values():
                while h.aio_in_flight() > 0:
                    h.poll(-1)
            for h, cookie, op, fua in v.pending:
                if not h.aio_command_completed(cookie):
                    raise Failure(f"aio write {op} of {v.name} not completed with nothing in flight")
                v.acked.add(op)
                if fua:
                    v.durable.add(op)
        except nbd.Error as e:
            self.nbd_failed(e)
        v.pending = []
        self.end()

    # ---- data operations --------------------------------------------------------------------

    def pick_blocks(self, v, rng, max_n):
        n = rng.randint(1, max_n)
        if rng.random() < 0.7:
            start = rng.randrange(min(HOT_BLOCKS, v.nblocks))
        else:
            start = rng.randrange(v.nblocks)
        return start, max(1, min(n, v.nblocks - start))

    def new_op(self, v, kind, start, n):
        op = self.next_id
        self.next_id += 1
        self.origin[op] = f"{self.it}.{self.opno + 1} {kind} {v.name} blocks {start}..{start + n - 1}"
        return op

    def record(self, v, op, start, n, value_of):
        for b in range(start, start + n):
            v.events.setdefault(b, []).append((op, value_of(b)))

    def write(self, v, rng, start=None, n=None, fua=None, aio=False):
        i, h = self.conn(v, rng)
        if start is None:
            start, n = self.pick_blocks(v, rng, 8)
        if fua is None:
            fua = rng.random() < 0.1
        op = self.new_op(v, "write", start, n)
        data = b"".join(content(op, b) for b in range(start, start + n))
        self.record(v, op, start, n, lambda b: op)
        flags = nbd.CMD_FLAG_FUA if fua else 0
        desc = f"{'aio ' if aio else ''}write {op} {v.name} conn {i} blocks {start}..{start + n - 1}{' FUA' if fua else ''}"
        self.begin("write", desc, vol=v.name, op=op)
        self.stats["writes"] += 1
        try:
            if aio:
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                cookie = h.aio_pwrite(buf, start * BLOCK, flags=flags)
                v.pending.append((h, cookie, op, fua))
                self._keep = getattr(self, "_keep", [])[-64:] + [buf]  # the buffer must outlive the request
                self.end("sent")
                return
            h.pwrite(data, start * BLOCK, flags)
        except nbd.Error as e:
            self.nbd_failed(e)
        v.acked.add(op)
        if fua:
            v.durable.add(op)
        self.end()

    def zero(self, v, rng):
        self.drain(v)
        i, h = self.conn(v, rng)
        kind = rng.choice(["trim", "zero", "zero-nohole"])
        if rng.random() < 0.05:
            start, n = 0, v.nblocks  # the whole volume
        else:
            start, n = self.pick_blocks(v, rng, 64)
        fua = rng.random() < 0.15
        op = self.new_op(v, kind, start, n)
        self.record(v, op, start, n, lambda b: 0)
        self.begin("zero", f"{kind} {op} {v.name} conn {i} blocks {start}..{start + n - 1}{' FUA' if fua else ''}",
                   vol=v.name, op=op)
        self.stats["zeroes"] += 1
        flags = nbd.CMD_FLAG_FUA if fua else 0
        try:
            if kind == "trim":
                h.trim(n * BLOCK, start * BLOCK, flags)
            else:
                h.zero(n * BLOCK, start * BLOCK, flags | (nbd.CMD_FLAG_NO_HOLE if kind == "zero-nohole" else 0))
        except nbd.Error as e:
            self.nbd_failed(e)
        v.acked.add(op)
        if fua:
            v.durable.add(op)
        self.end()

    def flush(self, v, rng):
        i, h = self.conn(v, rng)
        covered = set(v.acked)  # acknowledged before the FLUSH is sent
        self.begin("flush", f"flush {v.name} conn {i} (covers {len(covered - v.durable)} new)", vol=v.name)
        self.stats["flushes"] += 1
        try:
            h.flush()
        except nbd.Error as e:
            self.nbd_failed(e)
        v.durable |= covered
        self.end()

    # ---- control operations -----------------------------------------------------------------

    def fresh_name(self, prefix):
        n = self.next_name
        self.next_name += 1
        return f"{prefix}{n}"

    def snapshots_of(self, vname):
        return [s for s in self.snaps.values() if s.vol == vname]

    def vol_create(self, rng):
        name = self.fresh_name("v")
        size = rng.choice([16, 16, 32, 64]) * MIB
        cluster = rng.choice(["4K", "16K", "16K", "64K", "64K"])
        self.begin("vol_create", f"volume create {name} --size {size // MIB}M --cluster-size {cluster}", meta=True,
                   name=name, base={}, size=size)
        out = self.cli(["volume", "create", name, "--size", f"{size // MIB}M", "--cluster-size", cluster])
        self.vols[name] = Vol(name, out["id"], size, out["cluster_size"], {}, origin="created empty")
        self.end(out["id"], meta=True)
        self.count("volume create")

    def snap_create(self, v, rng, durable=None, wait=None):
        self.drain(v)
        if durable is None:
            durable = rng.random() < 0.15
        if wait is None:
            wait = rng.random() < 0.1
        name = self.fresh_name("s")
        data = v.exact()
        covered = set(v.acked)
        args = ["snapshot", "create", v.name, "--name", name] + (["--durable"] if durable else []) + (
            ["--wait"] if wait else [])
        self.begin("snap_create", "snapshot " + " ".join(args[1:]), meta=True, vol=v.name, name=name, data=data,
                   covered=covered)
        out = self.cli(args)
        if not isinstance(out, dict) or out.get("name") != name:
            raise Failure(f"snapshot create {v.name}@{name} answered {out!r}")
        if durable and not out.get("durable"):
            raise Failure(f"snapshot create --durable {v.name}@{name} answered durable: {out.get('durable')}")
        if wait and (out.get("upload") or {}).get("state") != "available":
            raise Failure(f"snapshot create --wait {v.name}@{name} returned with upload {out.get('upload')}")
        self.snaps[(v.name, name)] = Snap(v.name, name, out["id"], data, f"{self.it}.{self.opno}")
        v.durable |= covered
        self.stats["snapshots_created"] += 1
        self.end(f"{out['id']} ({len(data)} data blocks)", meta=True)
        self.count("snapshot create")

    def snap_delete(self, s):
        self.begin("snap_delete", f"snapshot delete {s.ref}", meta=True, vol=s.vol, name=s.name)
        out = self.cli(["snapshot", "delete", s.ref], refusals=SNAP_DELETE_REFUSALS)
        if isinstance(out, Refused):
            self.stats["refused"] += 1
            self.end(f"refused: {out.message}", meta=True)
            return False
        del self.snaps[(s.vol, s.name)]
        self.end(meta=True)
        self.count("snapshot delete")
        return True

    def retrying(self, args, what):
        """Runs a CLI command refused while clients linger after we closed them."""
        deadline = time.monotonic() + 5
        while True:
            out = self.cli(args, refusals=CLIENTS_CONNECTED)
            if not isinstance(out, Refused):
                return out
            if time.monotonic() > deadline:
                raise Failure(f"{what} still refused 5 s after every client disconnected: {out.message}")
            self.log(f"  (retry: {out.message})")
            time.sleep(0.02)

    def rollback(self, v, s, rng):
        force = rng.random() < 0.5
        if force:
            self.drain(v)  # connections stay open: --force disconnects them
        else:
            self.close_conns(v)
        self.begin("rollback", f"snapshot rollback {s.ref}{' --force' if force else ''} "
                               f"({len(v.conns)} connection(s) open)", meta=True, vol=v.name, data=s.content)
        args = ["snapshot", "rollback", s.ref] + (["--force"] if force else [])
        out = self.retrying(args, f"rollback of {v.name}")
        v.conns = []  # revoked by --force (or closed)
        v.reset_session(s.content)
        v.origin = f"rolled back to {s.ref} in {self.it}.{self.opno}"
        v.hydrating = bool(out and out.get("hydration"))
        self.stats["rollbacks"] += 1
        self.end("hydrating from the store" if v.hydrating else "ok", meta=True)
        self.count("snapshot rollback")

    def vol_clone(self, s, rng):
        name = self.fresh_name("v")
        src = self.vols[s.vol]
        mode = rng.choice(["clone", "from-snapshot", "from-snapshot-id"])
        if mode == "clone":
            args = ["volume", "clone", s.ref, name]
        else:
            args = ["volume", "create", name, "--from-snapshot", s.ref if mode == "from-snapshot" else s.id]
        self.begin("vol_create", " ".join(args), meta=True, name=name, base=s.content, size=src.size)
        out = self.cli(args)
        hydrating = bool(out.get("hydration"))
        self.vols[name] = Vol(name, out["id"], src.size, out["cluster_size"], s.content,
                              origin=f"{mode} of {s.ref} in {self.it}.{self.opno}", hydrating=hydrating)
        if hydrating:
            self.stats["restores"] += 1
        self.end(f"{out['id']}{' (restoring from the store)' if hydrating else ''}", meta=True)
        self.count("volume clone/restore")

    def vol_delete(self, v):
        for s in self.snapshots_of(v.name):
            if not self.snap_delete(s):
                return
        self.close_conns(v)
        self.begin("vol_delete", f"volume delete {v.name}", meta=True, vol=v.name)
        self.retrying(["volume", "delete", v.name], f"delete of {v.name}")
        del self.vols[v.name]
        self.end(meta=True)
        self.count("volume delete")

    def gc(self, rng):
        args = ["gc", "--region", "local"] + (["--grace", "0s"] if rng.random() < 0.5 else [])
        self.begin("gc", " ".join(args), meta=True)
        out = self.cli(args)
        self.stats["gc"] += 1
        r = out[0] if isinstance(out, list) and out else {}
        self.end(f"manifests {r.get('manifests')} packs {r.get('packs')} deleted {r.get('packs_deleted')} "
                 f"repacked {r.get('packs_repacked')}", meta=True)
        self.count("gc")

    def verify(self, s, when, state=None):
        """`snapshot verify` when its upload is complete; returns whether it ran."""
        if state is None:
            self.begin("show", f"snapshot show {s.ref}")
            info = self.cli(["snapshot", "show", s.ref])
            state = (info.get("upload") or {}).get("state")
            self.end(f"upload {state}, local {info.get('local')}")
            if state == "failed":
                raise Failure(f"upload of {s.ref} failed: {info['upload'].get('reason')}")
        if state != "available":
            return False
        self.begin("verify", f"snapshot verify {s.ref}", meta=True)
        out = self.cli(["snapshot", "verify", s.ref])
        if out.get("problems"):
            raise Failure(f"snapshot verify {s.ref} ({when}) found problems: {out['problems']}")
        self.stats["verifies"] += 1
        self.end(f"{out.get('blobs')} blobs, {out.get('bytes')} bytes", meta=True)
        return True

    def hydrate(self, v):
        self.begin("hydrate", f"volume hydrate {v.name} --wait", meta=True, vol=v.name)
        out = self.cli(["volume", "hydrate", v.name, "--wait"], )
        if out and out.get("hydration"):
            raise Failure(f"volume hydrate {v.name} --wait returned while still loading: {out['hydration']}")
        v.hydrating = False
        self.stats["hydrations"] += 1
        self.end(meta=True)

    def count(self, kind):
        self.meta_kinds[kind] = self.meta_kinds.get(kind, 0) + 1

    # ---- reading ----------------------------------------------------------------------------

    def read_export(self, export, size):
        """{block: value} of the non-zero blocks, and [(block, problem)]."""
        h = nbd.NBD()
        h.connect_uri(self.daemon.uri(export))
        if h.get_size() != size:
            raise Failure(f"export {export} has size {h.get_size()}, expected {size}")
        got, bad = {}, []
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            data = h.pread(n, off)
            if n == CHUNK and data == ZERO_CHUNK:
                continue
            mv = memoryview(data)
            for k in range(0, n, BLOCK):
                blk = mv[k:k + BLOCK]
                if blk == ZERO:
                    continue
                b = (off + k) // BLOCK
                val, problem = decode(blk, b)
                if problem:
                    bad.append((b, problem))
                elif val:
                    got[b] = val
        try:
            h.shutdown()
        except nbd.Error:
            pass
        return got, bad

    def read_checked(self, export, size):
        try:
            return self.read_export(export, size)
        except nbd.Error as e:
            if self.killed:
                raise Killed()
            raise Failure(f"reading {export} failed: {e}", self.daemon_state())

    def describe(self, val):
        if val == 0:
            return "zeros"
        if val is None:
            return "garbage"
        return f"write {val} ({self.origin.get(val, 'unknown origin')})"

    def history(self, v, b):
        lines = [f"    base (session start / rollback / clone): {self.describe(v.base.get(b, 0))}"]
        for op, val in v.events.get(b, []):
            flags = ("acked" if op in v.acked else "not acked") + (", durable" if op in v.durable else "")
            lines.append(f"    op {op}: {self.describe(val)} [{flags}]")
        return lines

    def compare_exact(self, what, got, bad, want, v=None):
        problems = [f"block {b}: {p}" for b, p in bad]
        for b in sorted(set(got) | set(want)):
            if got.get(b, 0) != want.get(b, 0):
                problems.append(f"block {b}: holds {self.describe(got.get(b, 0))}, "
                                f"expected {self.describe(want.get(b, 0))}")
        if problems:
            details = problems[:12] + ([f"... {len(problems) - 12} more"] if len(problems) > 12 else [])
            if v is not None:
                bad_blocks = [b for b in sorted(set(got) | set(want)) if got.get(b, 0) != want.get(b, 0)]
                for b in bad_blocks[:3]:
                    details.append(f"history of block {b} in this session:")
                    details += self.history(v, b)
            raise Failure(f"{what}: {len(problems)} block(s) differ from the model", details,
                          volume=v.name if v else None)

    def read_live(self, v):
        """Reads a volume while nothing is in flight: it must hold exactly the model."""
        self.drain(v)
        self.begin("read", f"read {v.name} (exact check)", vol=v.name)
        got, bad = self.read_checked(v.name, v.size)
        self.compare_exact(f"live read of volume {v.name}", got, bad, v.exact(), v)
        self.end(f"{len(got)} data blocks")

    def read_snap(self, s, when):
        self.begin("read", f"read {s.ref} ({when})", vol=s.vol)
        got, bad = self.read_checked(s.ref, self.vols[s.vol].size)
        self.compare_exact(f"snapshot {s.ref} (created in {s.created_in}) read {when}", got, bad, s.content)
        self.stats["snapshots_checked"] += 1
        self.end(f"{len(got)} data blocks")

    # ---- the workload -----------------------------------------------------------------------

    def pick_vol(self, rng, exclude=(), want_snaps=False):
        names = sorted(n for n in self.vols if n not in exclude)
        if want_snaps:
            with_snaps = [n for n in names if self.snapshots_of(n)]
            if with_snaps and rng.random() < 0.8:
                names = with_snaps
        return self.vols[rng.choice(names)] if names else None

    def pick_snap(self, rng, vol=None, exclude_vols=()):
        cands = [s for k, s in sorted(self.snaps.items()) if (vol is None or s.vol == vol) and s.vol not in exclude_vols]
        return rng.choice(cands) if cands else None

    def meta_op(self, rng, exclude=()):
        """One control operation, on volumes not in `exclude` (their unflushed writes stay held)."""
        kinds = ["snap_create", "snap_create_wait", "snap_delete", "rollback", "vol_create", "clone", "vol_delete",
                 "gc", "verify", "hydrate"]
        weights = [6, 1, 5, 3, 2, 3, 2, 1, 1, 1]
        kind = rng.choices(kinds, weights)[0]
        total_snaps = len(self.snaps)
        if kind in ("snap_create", "snap_create_wait"):
            v = self.pick_vol(rng, exclude)
            if v and len(self.snapshots_of(v.name)) < MAX_SNAPS_PER_VOLUME:
                return self.snap_create(v, rng, wait=True if kind == "snap_create_wait" else None)
            kind = "snap_delete"
        if kind == "snap_delete" or (kind == "rollback" and total_snaps >= 8):
            s = self.pick_snap(rng, exclude_vols=exclude)
            if s:
                return self.snap_delete(s)
            return self.fallback(rng, exclude)
        if kind == "rollback":
            s = self.pick_snap(rng, exclude_vols=exclude)
            if s:
                return self.rollback(self.vols[s.vol], s, rng)
            return self.fallback(rng, exclude)
        if kind in ("vol_create", "clone"):
            if len(self.vols) >= MAX_VOLUMES:
                kind = "vol_delete"
            elif kind == "clone" and self.snaps:
                return self.vol_clone(self.pick_snap(rng), rng)
            else:
                return self.vol_create(rng)
        if kind == "vol_delete":
            v = self.pick_vol(rng, exclude)
            if v and len(self.vols) > MIN_VOLUMES:
                return self.vol_delete(v)
            return self.fallback(rng, exclude)
        if kind == "verify":
            s = self.pick_snap(rng)
            if s:
                return self.verify(s, "during the workload")
        if kind == "hydrate":
            hs = sorted(n for n, v in self.vols.items() if v.hydrating and n not in exclude)
            if hs:
                return self.hydrate(self.vols[rng.choice(hs)])
        if kind == "gc":
            return self.gc(rng)
        return self.fallback(rng, exclude)

    def fallback(self, rng, exclude):
        """A control operation when the one drawn has nothing to act on."""
        v = self.pick_vol(rng, exclude)
        if v and len(self.snapshots_of(v.name)) < MAX_SNAPS_PER_VOLUME:
            return self.snap_create(v, rng)
        if len(self.vols) < MAX_VOLUMES:
            return self.vol_create(rng)
        return self.gc(rng)

    def hold(self, rng):
        """Unflushed writes held open across control operations on other volumes: overwrite
        clusters a snapshot shares (so they are redirected), then run 1..3 control operations
        elsewhere, then go on (sometimes flushing)."""
        v = self.pick_vol(rng, want_snaps=True)
        self.note(f"hold: unflushed writes on {v.name} across control operations elsewhere")
        shared = sorted({b for s in self.snapshots_of(v.name) for b in s.content})
        for _ in range(rng.randint(2, 8)):
            if shared and rng.random() < 0.7:
                b = rng.choice(shared)
                self.write(v, rng, b, min(rng.randint(1, 4), v.nblocks - b), fua=False)
            else:
                self.write(v, rng, fua=False)
        own = self.snapshots_of(v.name)
        if own and rng.random() < 0.4:
            # The volume's own snapshot: the clusters it shared with the head, just redirected
            # by the writes above, are freed by this delete while their redirects are pending.
            self.snap_delete(rng.choice(own))
        others = [v.name]
        if rng.random() < 0.4:
            w = self.pick_vol(rng, exclude=others)
            if w:
                others.append(w.name)
                for _ in range(rng.randint(1, 4)):
                    self.write(w, rng, fua=False)
        for _ in range(rng.randint(1, 3)):
            self.meta_op(rng, exclude=others)
        for name in others:
            if name in self.vols and rng.random() < 0.3:
                self.flush(self.vols[name], rng)

    def aio_burst(self, rng):
        v = self.pick_vol(rng)
        used = set()
        for _ in range(rng.randint(2, 8)):
            start, n = self.pick_blocks(v, rng, 4)
            if any(b in used for b in range(start, start + n)):
                continue
            used.update(range(start, start + n))
            self.write(v, rng, start, n, aio=True)
        for _ in range(rng.randint(0, 2)):
            self.meta_op(rng, exclude=[v.name])
        if v.name in self.vols:
            self.drain(v)

    def step(self, rng):
        while len(self.vols) < MIN_VOLUMES:
            self.vol_create(rng)
        kinds = ["write", "zero", "flush", "meta", "hold", "aio", "read_vol", "read_snap", "idle"]
        weights = [45, 8, 8, 16, 6, 4, 2, 2, 2]
        kind = rng.choices(kinds, weights)[0]
        if kind == "write":
            v = self.pick_vol(rng)
            self.write(v, rng)
            if rng.random() < 0.12:
                self.flush(v, rng)
        elif kind == "zero":
            self.zero(self.pick_vol(rng), rng)
        elif kind == "flush":
            self.flush(self.pick_vol(rng), rng)
        elif kind == "meta":
            self.meta_op(rng)
        elif kind == "hold":
            self.hold(rng)
        elif kind == "aio":
            self.aio_burst(rng)
        elif kind == "read_vol":
            self.read_live(self.pick_vol(rng))
        elif kind == "read_snap":
            s = self.pick_snap(rng)
            if s:
                self.read_snap(s, "during the workload")
        else:
            ms = rng.choice([5, 20, 50, 100, 200])
            self.begin("idle", f"idle {ms} ms (background uploads, releases, hydration, GC run)")
            time.sleep(ms / 1000)
            self.end()

    # ---- after a restart ----------------------------------------------------------------------

    def resolve(self, listed_vols, listed_snaps):
        """Applies the operation the kill interrupted, if the listing says it happened."""
        op = self.inflight
        if not op:
            return "nothing in flight"
        kind = op["kind"]
        if kind == "snap_create":
            if (op["vol"], op["name"]) in listed_snaps:
                sid = listed_snaps[(op["vol"], op["name"])]["id"]
                self.snaps[(op["vol"], op["name"])] = Snap(op["vol"], op["name"], sid, op["data"],
                                                           f"{self.it}.{self.opno} (interrupted)")
                self.vols[op["vol"]].durable |= op["covered"]
                return f"{op['desc']}: happened"
            return f"{op['desc']}: did not happen"
        if kind == "snap_delete":
            key = (op["vol"], op["name"])
            if key not in listed_snaps:
                del self.snaps[key]
                return f"{op['desc']}: happened"
            return f"{op['desc']}: did not happen"
        if kind == "vol_create":
            if op["name"] in listed_vols:
                info = listed_vols[op["name"]]
                self.vols[op["name"]] = Vol(op["name"], info["id"], op["size"], info["cluster_size"], op["base"],
                                            origin=f"{op['desc']} (interrupted)",
                                            hydrating=bool(info.get("hydration")))
                return f"{op['desc']}: happened"
            return f"{op['desc']}: did not happen"
        if kind == "vol_delete":
            if op["vol"] not in listed_vols:
                del self.vols[op["vol"]]
                return f"{op['desc']}: happened"
            return f"{op['desc']}: did not happen"
        if kind == "rollback":
            self.vols[op["vol"]].alt = op["data"]
            return f"{op['desc']}: either (checked against both)"
        return f"{op['desc']}: no effect on the model"

    def check_volume(self, v, got, bad, where):
        problems = [(b, p) for b, p in bad]
        if not problems:
            for b in sorted(v.touched() | set(got)):
                allowed, _ = v.allowed(b)
                val = got.get(b, 0)
                if val not in allowed:
                    problems.append((b, f"holds {self.describe(val)}; allowed: "
                                        + ", ".join(self.describe(a) for a in sorted(allowed))))
        if not problems:
            return
        if v.alt is not None and not bad and got == v.alt:
            self.note(f"{v.name}: the interrupted rollback happened")
            return
        details = []
        if v.alt is not None:
            details.append("(an interrupted rollback did not explain it either: the volume is not exactly the snapshot)")
        details.append(f"volume {v.name} ({v.id}, {v.size // MIB} MiB, cluster {v.cluster}, base: {v.origin})")
        for b, p in problems[:6]:
            details.append(f"  block {b}: {p}")
            details += self.history(v, b)
        if len(problems) > 6:
            details.append(f"  ... {len(problems) - 6} more block(s)")
        raise Failure(f"volume {v.name} {where}: {len(problems)} block(s) break the model", details, volume=v.name)

    def check(self, where):
        self.inflight_saved = self.inflight
        vlist = self.cli(["volume", "list"])
        slist = self.cli(["snapshot", "list"])
        listed_vols = {x["name"]: x for x in vlist}
        listed_snaps = {(x["volume"], x["name"]): x for x in slist}
        resolution = self.resolve(listed_vols, listed_snaps)
        self.resolution = f"{where}: {resolution}"
        self.inflight = None
        self.note(f"check {where}: in flight at the kill: {resolution}")
        if set(listed_vols) != set(self.vols):
            raise Failure(f"volume list {where} differs from the model",
                          [f"listed only: {sorted(set(listed_vols) - set(self.vols))}",
                           f"missing: {sorted(set(self.vols) - set(listed_vols))}", f"in flight: {resolution}"])
        if set(listed_snaps) != set(self.snaps):
            fmt = lambda ks: sorted(f"{a}@{b}" for a, b in ks)  # noqa: E731
            raise Failure(f"snapshot list {where} differs from the model",
                          [f"listed only: {fmt(set(listed_snaps) - set(self.snaps))}",
                           f"missing: {fmt(set(self.snaps) - set(listed_snaps))}", f"in flight: {resolution}"])
        for name in sorted(self.vols):
            v = self.vols[name]
            info = listed_vols[name]
            if info["id"] != v.id:
                raise Failure(f"volume {name} {where} has id {info['id']}, expected {v.id}")
            hyd = info.get("hydration")
            if hyd and hyd.get("state") == "failed":
                raise Failure(f"hydration of {name} failed {where}: {hyd}")
            self.begin("read", f"read {name} ({where}{', still loading from the store' if hyd else ''})")
            got, bad = self.read_checked(name, v.size)
            self.end(f"{len(got)} data blocks")
            self.check_volume(v, got, bad, where)
            self.stats["volumes_checked"] += 1
            if hyd:
                self.hydrate(v)
                self.begin("read", f"read {name} again after hydrate --wait")
                got2, bad2 = self.read_checked(name, v.size)
                self.end(f"{len(got2)} data blocks")
                self.compare_exact(f"volume {name} after `volume hydrate --wait` {where} (vs. the read before)",
                                   got2, bad2, got, v)
            v.hydrating = False
            v.reset_session(got)
            v.origin = f"read in the check {where}"
        for key in sorted(self.snaps):
            s = self.snaps[key]
            info = listed_snaps[key]
            if info["id"] != s.id:
                raise Failure(f"snapshot {s.ref} {where} has id {info['id']}, expected {s.id}")
            state = (info.get("upload") or {}).get("state")
            if state == "failed":
                raise Failure(f"upload of {s.ref} failed ({where}): {info['upload'].get('reason')}")
            from_store = not info.get("local", True)
            self.read_snap(s, f"{where}{', from the store' if from_store else ''}")
            if from_store:
                self.stats["snapshots_from_store"] += 1
            if state == "available":
                self.verify(s, where, state)
        log = self.daemon.log_since_start()
        if "panicked" in log:
            raise Failure(f"the daemon panicked ({where})", [l for l in log.split("\n") if "panicked" in l][:5])
        self.save_state()

    def check_region(self):
        """Once every upload has ended, the region holds exactly the model's snapshots: none
        lost, and none of the deleted ones left behind (deletes interrupted by a kill included)."""
        want = {s.id: s.ref for s in self.snaps.values()}
        deadline = time.monotonic() + 20
        while True:
            local = self.cli(["snapshot", "list"])
            states = {x["id"]: (x.get("upload") or {}).get("state") for x in local}
            stored = {x["id"]: f"{x.get('volume')}@{x.get('name')}" for x in self.cli(["snapshot", "list", "--region", "local"])}
            if set(stored) == set(want) and all(st == "available" for st in states.values()):
                self.note(f"region local holds exactly the {len(want)} snapshots of the model")
                return
            if time.monotonic() > deadline:
                raise Failure("20 s after the last restart, region local does not hold exactly the model's snapshots",
                              [f"in the region only (deleted, or never created): "
                               f"{sorted(f'{r} {i}' for i, r in stored.items() if i not in want)}",
                               f"missing from the region: {sorted(f'{r} {i}' for i, r in want.items() if i not in stored)}",
                               f"upload states: {states}"])
            time.sleep(0.2)

    def save_state(self):
        state = dict(
            seed=self.seed, iteration=self.it, next_id=self.next_id, next_name=self.next_name,
            volumes={n: dict(id=v.id, size=v.size, cluster=v.cluster, base={str(b): x for b, x in v.base.items()})
                     for n, v in self.vols.items()},
            snapshots={s.ref: dict(id=s.id, created_in=s.created_in, content={str(b): x for b, x in s.content.items()})
                       for s in self.snaps.values()},
        )
        path = os.path.join(self.work, "state.json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)

    # ---- the run ----------------------------------------------------------------------------

    def config(self, rng):
        interval = rng.choice(["0s", "1s", "3s"])
        grace = rng.choice(["0s", "1h"])
        text = (
            "# written by tests/py/soak.py\n"
            "[upload]\n"
            'instant_access_retention = "0s"\n'
            "\n[gc]\n"
            f'interval = "{interval}"\n'
            f'grace = "{grace}"\n'
        )
        os.makedirs(self.daemon.dir, exist_ok=True)
        with open(os.path.join(self.daemon.dir, "snapblk.toml"), "w") as f:
            f.write(text)
        return f"retention 0s, gc interval {interval}, grace {grace}"

    def session(self, rng, kill):
        self.opno = 0
        self.resolution = None
        self.killed = False
        self.armed = False
        self.inflight = None
        if kill:
            mode = rng.choice(["time", "time", "meta", "after-meta"])
            at = rng.randint(3, 200)
            if mode == "time":
                delay = rng.choice([0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.05), rng.uniform(0, 0.3)])
            else:
                delay = rng.choice([0.0, rng.uniform(0, 0.003), rng.uniform(0.001, 0.01), rng.uniform(0.003, 0.02)])
            self.plan = dict(mode=mode, at=at, delay=delay)
            self.note(f"session {self.it}: kill plan {mode} at op {at}, delay {delay * 1000:.1f} ms")
        else:
            self.plan = None
            budget = rng.randint(20, 150)
        started = time.monotonic()
        self.t_session = started
        self.prof = {}
        self.in_workload = True
        self.kill_info = None
        try:
            while True:
                if kill and time.monotonic() - started > 60:
                    raise Failure("the kill did not happen within 60 s of the session's start")
                if not kill and self.opno >= budget:
                    break
                self.step(rng)
        except Killed:
            pass
        self.in_workload = False
        top = sorted(self.prof.items(), key=lambda kv: -kv[1])
        self.note("time per kind of operation: " + ", ".join(f"{k} {ms:.0f} ms" for k, ms in top))
        if not kill:
            for v in self.vols.values():
                self.drain(v)
                self.close_conns(v)
            return
        if self.timer:
            self.timer.join()
            self.timer = None
        self.note(f"KILL -9 pid {self.daemon.pid} fired ({self.kill_info}); "
                  f"in flight when the session stopped: {self.inflight_desc()}")
        try:
            rc = self.daemon.reap()
        except subprocess.TimeoutExpired:
            raise Failure("the daemon did not die within 30 s of SIGKILL")
        if rc != -signal.SIGKILL:
            raise Failure(f"the daemon ended with status {rc}, not by our SIGKILL",
                          tail(self.daemon.log_since_start(), 30))
        log = self.daemon.log_since_start()
        if "panicked" in log:
            raise Failure("the daemon panicked before the kill", [l for l in log.split("\n") if "panicked" in l][:5])
        self.drop_all_conns()

    def run(self):
        t0 = time.monotonic()
        rng0 = random.Random(self.seed)
        cfg = self.config(rng0)
        print(f"soak: seed {self.seed}, {self.args.kill} kills, work dir {self.work} ({cfg})", flush=True)
        self.note(f"seed {self.seed}, config: {cfg}")
        self.daemon.start()
        self.note(f"daemon started, pid {self.daemon.pid}")
        for _ in range(rng0.randint(2, 4)):
            self.vol_create(rng0)
        for it in range(self.args.kill):
            self.it = it
            rng = random.Random(self.seed * 1_000_003 + it)
            t = time.monotonic()
            ops0 = self.stats["ops"]
            self.session(rng, kill=True)
            killed_at = f"{self.plan['mode']} kill in op {self.opno}: {self.inflight_desc()}"
            t_kill = time.monotonic()
            self.daemon.start()
            self.note(f"restarted, pid {self.daemon.pid}")
            self.opno = 0
            self.killed = False
            self.armed = False
            self.plan = None
            checked0 = self.stats["snapshots_checked"]
            self.check(f"after kill {it}")
            print(f"iteration {it}: {self.stats['ops'] - ops0} ops, {killed_at[:90]}; "
                  f"{len(self.vols)} volumes, {self.stats['snapshots_checked'] - checked0} snapshots checked; "
                  f"{t_kill - t:.1f}+{time.monotonic() - t_kill:.1f} s", flush=True)
        # A clean stop loses nothing: every acknowledged write is there after the restart.
        self.it = self.args.kill
        rng = random.Random(self.seed * 1_000_003 + self.it)
        self.session(rng, kill=False)
        for v in self.vols.values():
            v.durable |= v.acked
        self.note("SIGTERM")
        rc = self.daemon.terminate()
        if rc != 0:
            raise Failure(f"SIGTERM: the daemon exited with {rc}", tail(self.daemon.log_since_start(), 30))
        self.daemon.start()
        self.check("after a clean stop (every acknowledged write must be there)")
        self.check_region()
        rc = self.daemon.terminate()
        if rc != 0:
            raise Failure(f"final SIGTERM: the daemon exited with {rc}", tail(self.daemon.log_since_start(), 30))
        st = self.stats
        print(f"soak passed: seed {self.seed}, {self.args.kill} iterations, {st['ops']} ops "
              f"({st['writes']} writes, {st['zeroes']} trims/zeroes, {st['flushes']} flushes, "
              f"{st['snapshots_created']} snapshots created, {st['rollbacks']} rollbacks, {st['restores']} restores, "
              f"{st['gc']} gc, {st['refused']} refused), {st['snapshots_checked']} snapshots checked "
              f"({st['snapshots_from_store']} from the store, {st['verifies']} verified), "
              f"{st['volumes_checked']} volume checks, {time.monotonic() - t0:.0f} s", flush=True)


class Refused:
    def __init__(self, message):
        self.message = message


def excerpt(ops_path, iteration, volume, limit=120):
    """The ops of the failing iteration: everything but data operations on other volumes."""
    lines = []
    prefix = f"{iteration}."
    keep = True
    with open(ops_path) as f:
        for line in f:
            if not line.startswith(prefix):
                continue
            body = line.split(" ", 1)[1] if " " in line else ""
            if body.startswith("  "):  # the result of the op above
                if keep:
                    lines.append(line.rstrip("\n"))
                continue
            words = body.split()
            data_op = bool(words) and words[0] in ("write", "aio", "trim", "zero", "zero-nohole", "flush", "connect", "collect")
            keep = not (volume and data_op and volume not in words)
            if keep:
                lines.append(line.rstrip("\n"))
    if len(lines) > limit:
        lines = lines[:20] + [f"... ({len(lines) - limit} lines left out; all in the op log)"] + lines[-(limit - 20):]
    return lines


def main():
    ap = argparse.ArgumentParser(description="kill -9 soak of snapblk")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--kill", type=int, required=True, help="iterations (kills)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None, help="work directory (must not exist or be empty)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory after a pass")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    if args.dir:
        if os.path.exists(args.dir) and os.listdir(args.dir):
            sys.exit(f"soak: {args.dir} is not empty")
        os.makedirs(args.dir, exist_ok=True)
        work = os.path.abspath(args.dir)
    else:
        work = tempfile.mkdtemp(prefix="snapblk-soak.")
    # A copy: the run keeps one binary even if target/release/snapblk is rebuilt meanwhile.
    shutil.copy2(args.bin, os.path.join(work, "snapblk"))
    args.bin = os.path.join(work, "snapblk")
    soak = Soak(args, work)
    ok = False
    try:
        soak.run()
        ok = True
    except Failure as f:
        report(soak, f, args)
    except Exception as e:  # a bug in the soak itself, or an unexpected client error
        import traceback
        report(soak, Failure(f"unexpected {type(e).__name__}: {e}", traceback.format_exc().split("\n")), args)
    finally:
        if soak.timer:
            soak.timer.cancel()
        if soak.daemon.proc is not None:
            soak.daemon.kill()
            soak.daemon.proc.wait()
        soak.ops_log.close()
    if ok and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


def report(soak, f, args):
    out = [
        "",
        f"SOAK FAILED: seed {soak.seed}, iteration {soak.it} (op {soak.opno}): {f.message}",
        *[f"  {d}" for d in f.details],
        *([f"operation the last kill interrupted ({soak.resolution})"] if soak.resolution else []),
        f"replay: scripts/soak --kill {args.kill} --seed {soak.seed}   (same choices; timing may differ)",
        f"work dir (kept): {soak.work}",
        f"op log: {soak.ops_path}   daemon log: {soak.daemon.log_path}",
        f"op log of iteration {soak.it}{' (data operations of ' + f.volume + ' and every control operation)' if f.volume else ''}:",
        *[f"  {line}" for line in excerpt(soak.ops_path, soak.it, f.volume)],
    ]
    text = "\n".join(out)
    print(text, flush=True)
    with open(os.path.join(soak.work, "failure.txt"), "w") as fh:
        fh.write(text + "\n")


if __name__ == "__main__":
    main()
