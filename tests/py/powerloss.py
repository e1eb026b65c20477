"""Power-loss soak of the real snapblk daemon in a VM. Run it via scripts/soak --power-loss N.

  powerloss.py --kernel VMLINUZ --initrd INITRD --power-loss N [--seed S] [--dir D] [--keep] [--self-check]

kill -9 keeps the page cache; a power cut does not. Here the daemon runs in a qemu guest
(TCG, no network) with its directory on ext4 on a virtio disk. The disk is a raw image on the
host served by nbdkit through its cache filter in writeback mode: writes stay in the filter's
cache until the guest sends a FLUSH, so killing qemu and nbdkit together loses everything the
guest had not flushed to its disk — its page cache and the disk's volatile cache — as a power
cut would. The guest (scripts/vm/power-init, examples/powerloss.rs) writes a record of every
step to a second serial port, a host file, before each request (intent) and after its answer
(acknowledged).

Boot k (k = 0..N) first dumps every volume and snapshot as the daemon recovered them after
the cut of boot k-1, then runs a random workload (writes with and without FUA, FLUSHes,
snapshot create with and without --durable, snapshot delete, a clean daemon restart now and
then) until the host kills qemu and
nbdkit with SIGKILL at a random moment. Boot N only dumps. Each dump is checked against the
model of boot k-1's records:
  - a block that a write covered by an acknowledged FLUSH (or FUA, or a later snapshot that
    survived) holds that write or a later one; other blocks hold their value at the start of
    the boot or any write of the boot on them (acknowledged or in flight), per 4 KiB block;
  - a snapshot whose `--durable` create answered is listed (unless a delete of it started),
    every listed snapshot holds exactly the volume as of its create, one listed after a cut
    must be there after every later cut, and one whose delete answered is gone;
  - the volumes listed are the volumes created.
Every random choice (the guest's workload and the host's kill plan) comes from the seed.

--self-check: the guest records writes as FUA and FLUSHes as done without sending either; the
soak must then find flushed writes lost within N cuts (exit 0 when it does, 1 when it does
not): the check is shown to be able to fail, and the disk to lose unflushed writes.
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

IMAGE_SIZE = 1 << 30
START_TIMEOUT = 300  # s from qemu's start to the workload's start (normally 20-40 s under TCG)
LAST_TIMEOUT = 300  # s for the last boot to dump and power off


class Failure(Exception):
    def __init__(self, message, details=()):
        super().__init__(message)
        self.message = message
        self.details = list(details)


class QemuCrashed(Failure):
    """qemu died of a signal on its own before the workload started (seen: a TCG assertion,
    `iotlb_to_section`, once in 22 boots): one more power cut, during the boot."""


class Op:
    def __init__(self, wid, first, count, fua):
        self.id, self.first, self.count, self.fua = wid, first, count, fua
        self.acked = False
        self.durable = False


class Snap:
    def __init__(self, content, durable, ops_before):
        self.content = content
        self.durable = durable  # created with --durable
        self.ops_before = ops_before  # how many of the boot's ops on the volume precede it
        self.acked = False
        self.required = False  # must be listed after the next cut
        self.deleting = False
        self.deleted = False


class Model:
    """What the records of one boot allow the next boot's dump to hold."""

    def __init__(self):
        self.base = {}  # volume -> [value per block] at the start of the boot
        self.snaps = {}  # (volume, name) -> Snap
        self.ops = {}  # volume -> [Op] of the boot, in order
        self.by_id = {}
        self.flush_mark = {}
        self.interrupted = "nothing (between steps)"
        self.stats = dict(writes=0, flushed=0, flushes=0, snaps=0, durable_snaps=0, deletes=0, restarts=0)

    def view(self, vol):
        """The volume as the acknowledged writes left it (what a snapshot taken now holds)."""
        v = list(self.base[vol])
        for op in self.ops[vol]:
            if op.acked:
                v[op.first : op.first + op.count] = [op.id] * op.count
        return v

    def apply(self, line):
        f = line.split()
        kind = f[0]
        if kind == "NEWVOL":
            self.base[f[1]] = [0] * int(f[2])
            self.ops[f[1]] = []
        elif kind == "w":
            wid, vol, first, count, fua = int(f[1]), f[2], int(f[3]), int(f[4]), f[5] == "1"
            op = Op(wid, first, count, fua)
            self.ops[vol].append(op)
            self.by_id[wid] = op
            self.interrupted = f"write {wid} {vol} blocks {first}..{first + count - 1}{' FUA' if fua else ''}"
        elif kind == "W":
            op = self.by_id[int(f[1])]
            op.acked = True
            op.durable = op.fua
            self.stats["writes"] += 1
            self.interrupted = "nothing (between steps)"
        elif kind == "f":
            self.flush_mark[f[1]] = len(self.ops[f[1]])
            self.interrupted = f"FLUSH {f[1]}"
        elif kind == "F":
            for op in self.ops[f[1]][: self.flush_mark[f[1]]]:
                op.durable = op.durable or op.acked
            self.stats["flushes"] += 1
            self.interrupted = "nothing (between steps)"
        elif kind == "s":
            vol, name, durable = f[1], f[2], f[3] == "1"
            self.snaps[(vol, name)] = Snap(self.view(vol), durable, len(self.ops[vol]))
            self.interrupted = f"snapshot create {vol} --name {name}{' --durable' if durable else ''}"
        elif kind == "S":
            s = self.snaps[(f[1], f[2])]
            s.acked = True
            self.stats["snaps"] += 1
            if s.durable:
                s.required = True
                self.stats["durable_snaps"] += 1
                for op in self.ops[f[1]][: s.ops_before]:
                    op.durable = True
            self.interrupted = "nothing (between steps)"
        elif kind == "d":
            self.snaps[(f[1], f[2])].deleting = True
            self.interrupted = f"snapshot delete {f[1]}@{f[2]}"
        elif kind == "D":
            self.snaps[(f[1], f[2])].deleted = True
            self.stats["deletes"] += 1
            self.interrupted = "nothing (between steps)"
        elif kind == "r":
            self.interrupted = "a clean daemon restart (SIGTERM, checkpoint, start)"
        elif kind == "R":
            # A clean stop makes everything acknowledged durable (README, "Daemon restarts").
            for ops in self.ops.values():
                for op in ops:
                    op.durable = op.durable or op.acked
            for s in self.snaps.values():
                if s.acked and not s.deleted:
                    s.required = True
            self.stats["restarts"] += 1
            self.interrupted = "nothing (between steps)"
        elif kind == "ERROR":
            raise Failure(f"the guest stopped: {line[6:]}")
        elif kind != "START":
            raise Failure(f"unknown record line: {line}")

    def check(self, dump):
        """Checks the next boot's dump; returns counts, and makes the dump the new base."""
        listed_vols, listed_snaps, contents, bad, verified = dump
        if set(listed_vols) != set(self.base):
            raise Failure("the volumes listed differ from the volumes created",
                          [f"listed: {sorted(listed_vols)}", f"created: {sorted(self.base)}"])
        counts = dict(blocks=0, flushed_blocks=0, snaps=0, required=0, gone=0, verified=len(verified))
        problems = []
        for key in listed_snaps:
            s = self.snaps.get(key)
            if s is None:
                raise Failure(f"snapshot {key[0]}@{key[1]} is listed but was never created")
            want, got = s.content, contents[f"{key[0]}@{key[1]}"]
            diff = [b for b in range(len(want)) if want[b] != got[b]]
            if diff:
                problems.append(f"snapshot {key[0]}@{key[1]} changed: {len(diff)} block(s) differ, e.g. "
                                + ", ".join(f"block {b} holds {got[b]}, was {want[b]}" for b in diff[:5]))
            if s.deleted:
                problems.append(f"snapshot {key[0]}@{key[1]} is back: its delete had answered (a delete commits before it answers)")
            counts["snaps"] += 1
            counts["required"] += s.required
            # A snapshot that survived the cut holds the volume's earlier writes: they survived too.
            for op in self.ops[key[0]][: s.ops_before]:
                op.durable = True
        for key, s in self.snaps.items():
            if key not in listed_snaps:
                if s.required and not s.deleting:
                    problems.append(f"snapshot {key[0]}@{key[1]} is gone, but it was durable"
                                    + (" (created with --durable)" if s.durable else " (listed after an earlier cut)"))
                counts["gone"] += s.acked and not s.deleted
        for vol, base in self.base.items():
            got = contents[vol]
            hist = [[] for _ in base]
            for op in self.ops[vol]:
                for b in range(op.first, op.first + op.count):
                    hist[b].append(op)
            for b, ops in enumerate(hist):
                last = max((i for i, op in enumerate(ops) if op.durable), default=None)
                if last is None:
                    allowed = {base[b]} | {op.id for op in ops}
                else:
                    allowed = {op.id for op in ops[last:]}
                    counts["flushed_blocks"] += 1
                counts["blocks"] += 1
                if got[b] not in allowed:
                    why = next((w for w in bad if w.startswith(f"{vol} {b} ")), None)
                    problems.append(
                        f"volume {vol} block {b} holds {why or got[b]}; allowed: {sorted(allowed)} "
                        f"(start of boot: {base[b]}; writes of the boot: "
                        + (", ".join(f"{op.id}{'' if op.acked else ' (in flight)'}{' durable' if op.durable else ''}" for op in ops) or "none")
                        + ")")
        if problems:
            raise Failure(f"{len(problems)} problem(s) after the power cut", problems)
        # The next boot starts from what was read; what survived a cut must survive the next.
        self.base = {vol: contents[vol] for vol in self.base}
        self.snaps = {key: self.snaps[key] for key in listed_snaps}
        for s in self.snaps.values():
            s.required, s.deleting, s.deleted, s.acked, s.ops_before = True, False, False, True, 0
        self.ops = {vol: [] for vol in self.base}
        self.by_id = {}
        self.interrupted = "nothing (between steps)"
        self.stats["flushed"] = 0
        return counts

    def count_flushed(self):
        self.stats["flushed"] = sum(op.durable for ops in self.ops.values() for op in ops)


def parse_dump(lines):
    vols, snaps, contents, bad, verified = [], [], {}, [], []
    for line in lines:
        f = line.split(" ", 2)
        if f[0] == "VOL":
            vols.append(f[1])
        elif f[0] == "SNAP":
            snaps.append((f[1], f[2]))
        elif f[0] == "BAD":
            bad.append(f"{f[1]} {f[2]}")
        elif f[0] == "DUMP":
            values = []
            for run in f[2].split(","):
                v, n = run.split("*")
                values.extend([v if v == "x" else int(v)] * int(n))
            contents[f[1]] = values
        elif f[0] == "VERIFIED":
            verified.append(f[1])
        elif f[0] == "ERROR":
            raise Failure(f"the guest stopped: {line[6:]}")
    return vols, snaps, contents, bad, verified


class Boot:
    """One boot of the VM: nbdkit serving the disk image, qemu, and the record file."""

    def __init__(self, args, work, k, last, attempt):
        self.k = k
        suffix = f"-retry{attempt}" if attempt else ""
        self.records = os.path.join(work, f"records-{k}{suffix}.log")
        self.console = os.path.join(work, f"console-{k}{suffix}.log")
        sock = os.path.join(work, "disk.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        env = dict(os.environ, TMPDIR=work)  # the cache filter's (volatile) cache file
        self.logs = [open(os.path.join(work, name), "ab") for name in ("nbdkit.log", "qemu.log")]
        self.nbdkit = subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "--unix", sock, "--filter=cache",
             "file", os.path.join(work, "disk.img"), "cache=writeback"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logs[0], env=env)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if self.nbdkit.poll() is not None or time.monotonic() > deadline:
                raise Failure("nbdkit did not start (see nbdkit.log in the work directory)")
            time.sleep(0.01)
        append = f"console=ttyS0 quiet panic=-1 powerloss.boot={k} powerloss.seed={args.seed} powerloss.last={int(last)}"
        if args.self_check:
            append += " powerloss.claim=1"
        self.qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "1G", "-smp", "2", "-nic", "none", "-no-reboot",
             "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}", "-serial", f"file:{self.records}",
             "-kernel", args.kernel, "-initrd", args.initrd, "-append", append,
             "-drive", f"file=nbd+unix:///?socket={sock},format=raw,if=virtio,cache=writeback"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.logs[1])
        self.started = time.monotonic()
        self.pos = 0
        self.partial = ""
        self.lines = []

    def poll(self):
        """New complete record lines since the last call."""
        if not os.path.exists(self.records):
            return []
        with open(self.records, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        text = self.partial + data.decode("utf-8", "replace").replace("\r", "")
        *new, self.partial = text.split("\n")
        self.lines.extend(new)
        return new

    def wait_for(self, pred, timeout, what):
        """Waits for a record line `pred` accepts; a guest that stops is a failure, and so is
        the timeout, unless `what` is None (then it just ends the wait)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.poll():
                if line.startswith("ERROR"):
                    raise Failure(f"boot {self.k}: the guest stopped: {line[6:]}", self.console_tail())
                if pred(line):
                    return line
            if self.qemu.poll() is not None:
                if self.qemu.returncode < 0 and "START" not in self.lines:
                    raise QemuCrashed(f"boot {self.k}: qemu died of signal {-self.qemu.returncode} while booting",
                                      self.console_tail())
                raise Failure(f"boot {self.k}: qemu exited ({self.qemu.returncode}) before {what or 'the power cut'}", self.console_tail())
            if time.monotonic() > deadline:
                if what is None:
                    return None
                raise Failure(f"boot {self.k}: no {what} within {timeout} s", self.console_tail())
            time.sleep(0.002)

    def cut(self):
        """The power cut: SIGKILL to qemu and to nbdkit (its unflushed cache goes with it)."""
        for p in (self.qemu, self.nbdkit):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in (self.qemu, self.nbdkit):
            p.wait()
        self.poll()
        self.close_logs()

    def stop(self):
        for p in (self.qemu, self.nbdkit):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
        self.close_logs()

    def close_logs(self):
        for f in self.logs:
            f.close()

    def console_tail(self, n=40):
        try:
            with open(self.console, "rb") as f:
                text = f.read().decode("utf-8", "replace").replace("\r", "")
        except OSError:
            return []
        return ["console: " + x for x in text.rstrip("\n").split("\n")[-n:]]


def dump_of(lines):
    """The check part of a boot's records (BOOT .. CHECKED) and the rest."""
    try:
        end = lines.index("CHECKED")
    except ValueError:
        raise Failure("the boot's records have no CHECKED line")
    return parse_dump(lines[:end]), lines[end + 1 :]


def kill_plan(rng, self_check):
    """When to cut the power: a time after the workload's start, or shortly after the start of
    its j-th snapshot create or delete or daemon restart (mid-create, mid-commit, mid-checkpoint,
    just after)."""
    if rng.random() < 0.5 or self_check:
        return ("time", rng.uniform(0.0, 8.0))
    return ("snapshot op", rng.randint(1, 3), rng.choice([0.0, rng.uniform(0, 0.05), rng.uniform(0, 0.5)]))


def plan_text(plan):
    if plan[0] == "time":
        return f"{plan[1]:.2f} s after the start"
    return f"{plan[2] * 1000:.0f} ms after snapshot op or restart #{plan[1]}"


def run_boot(args, boot, rng, last):
    """Runs one boot to its end: the cut (or, for the last one, the clean power-off).
    Returns the kill plan, the seconds until the workload started and the cut's delay."""
    if last:
        boot.wait_for(lambda x: x == "DONE", LAST_TIMEOUT, "DONE (the last boot's dump and clean stop)")
        boot.qemu.wait(timeout=60)
        boot.stop()
        return None, 0.0, 0.0
    boot.wait_for(lambda x: x == "START", START_TIMEOUT, "workload START")
    boot_s = time.monotonic() - boot.started
    plan = kill_plan(rng, args.self_check)
    t_start = time.monotonic()
    if plan[0] == "time":
        boot.wait_for(lambda x: False, plan[1], None)
    else:
        seen = [0]

        def snapshot_op(line):
            seen[0] += line[:2] in ("s ", "d ") or line == "r"
            return seen[0] >= plan[1]

        # (a workload without that many snapshot operations is cut after 30 s)
        boot.wait_for(snapshot_op, 30, None)
        time.sleep(plan[2])
    boot.cut()
    return plan, boot_s, time.monotonic() - t_start


def run(args, work):
    model = Model()
    t0 = time.monotonic()
    totals = dict(writes=0, flushed=0, snaps=0, durable_snaps=0, blocks=0, flushed_blocks=0, snaps_checked=0, verified=0, qemu_crashes=0)
    for k in range(args.power_loss + 1):
        last = k == args.power_loss
        rng = random.Random(args.seed * 1000003 + k)
        for attempt in range(4):
            boot = Boot(args, work, k, last, attempt)
            try:
                plan, boot_s, kill_after = run_boot(args, boot, rng, last)
                break
            except QemuCrashed as e:
                boot.stop()  # (nbdkit's unflushed cache goes too: a power cut)
                if attempt == 3:
                    raise
                totals["qemu_crashes"] += 1
                print(f"  {e.message} (qemu.log in the work dir): counted as a power cut during boot; booting again",
                      flush=True)
            except BaseException:
                boot.stop()
                raise
        if f"BOOT {k}" not in boot.lines:
            raise Failure(f"boot {k}: no BOOT line in the records", boot.console_tail())
        dump, rest = dump_of(boot.lines[boot.lines.index(f"BOOT {k}") + 1 :])
        if k > 0:
            try:
                counts = model.check(dump)
            except Failure as e:
                e.message = f"after the power cut of boot {k - 1} ({cut_note}): {e.message}"
                raise
            totals["blocks"] += counts["blocks"]
            totals["flushed_blocks"] += counts["flushed_blocks"]
            totals["snaps_checked"] += counts["snaps"]
            totals["verified"] += counts["verified"]
            print(f"  check at boot {k}: {counts['blocks']} blocks ok ({counts['flushed_blocks']} covered by a FLUSH/FUA/snapshot), "
                  f"{counts['snaps']} snapshots exact ({counts['required']} required, {counts['verified']} verified in the store), "
                  f"{counts['gone']} non-durable snapshot(s) gone", flush=True)
        elif dump[0] or dump[1]:
            raise Failure(f"boot 0 found volumes or snapshots on a new disk: {dump[0]} {dump[1]}")
        if last:
            break
        for line in rest:
            if line:
                model.apply(line)
        model.count_flushed()
        s = model.stats
        for key in ("writes", "flushed", "snaps", "durable_snaps"):
            totals[key] += s[key]
        cut_note = f"cut {kill_after:.2f} s after the start, during {model.interrupted}"
        print(f"power-loss {k + 1}/{args.power_loss}: boot {k} up in {boot_s:.0f} s; plan {plan_text(plan)}; {cut_note}; "
              f"{s['writes']} writes ({s['flushed']} covered by a FLUSH, FUA or snapshot), {s['flushes']} flushes, "
              f"{s['snaps']} snapshots ({s['durable_snaps']} durable), {s['deletes']} deletes, {s['restarts']} restarts", flush=True)
        model.stats = dict(writes=0, flushed=0, flushes=0, snaps=0, durable_snaps=0, deletes=0, restarts=0)
    return totals, time.monotonic() - t0


def self_check(args, work):
    try:
        run(args, work)
    except Failure as e:
        lost = e.message.endswith("after the power cut") and any(" block " in d for d in e.details)
        if lost:
            print(f"self-check passed: the soak found writes claimed flushed but never flushed lost: {e.message}")
            for d in e.details[:3]:
                print(f"  {d}")
            shutil.rmtree(work, ignore_errors=True)
            return 0
        print(f"self-check FAILED: the soak stopped for another reason: {e.message}", file=sys.stderr)
        for d in e.details[:40]:
            print(f"  {d}", file=sys.stderr)
        print(f"work dir (kept): {work}", file=sys.stderr)
        return 1
    print(f"self-check FAILED: {args.power_loss} power cuts lost none of the writes claimed flushed but never flushed "
          "(does the disk still lose unflushed writes?)", file=sys.stderr)
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--power-loss", type=int, required=True, metavar="N")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--self-check", action="store_true")
    args = ap.parse_args()
    if args.power_loss < 1:
        ap.error("--power-loss N needs N >= 1")
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        if os.listdir(args.dir):
            ap.error(f"--dir {args.dir} is not empty")
        work = args.dir
    else:
        work = tempfile.mkdtemp(prefix="snapblk-power.")
    with open(os.path.join(work, "disk.img"), "wb") as f:
        f.truncate(IMAGE_SIZE)
    print(f"power-loss soak: {args.power_loss} power cuts, seed {args.seed}, work dir {work}", flush=True)
    if args.self_check:
        sys.exit(self_check(args, work))
    try:
        totals, elapsed = run(args, work)
    except Failure as e:
        print(f"POWER-LOSS SOAK FAILED: seed {args.seed}: {e.message}", file=sys.stderr)
        for d in e.details[:60]:
            print(f"  {d}", file=sys.stderr)
        print(f"replay: scripts/soak --power-loss {args.power_loss} --seed {args.seed}   (same choices; timing may differ)",
              file=sys.stderr)
        print(f"work dir (kept): {work} (records-K.log: the records of boot K; console-K.log: its console and daemon log)",
              file=sys.stderr)
        sys.exit(1)
    print(f"power-loss soak passed: seed {args.seed}, {args.power_loss} power cuts in {elapsed:.0f} s; "
          f"{totals['writes']} writes acknowledged ({totals['flushed']} covered by a FLUSH, FUA or snapshot), "
          f"{totals['snaps']} snapshots ({totals['durable_snaps']} durable); "
          f"checked {totals['blocks']} blocks ({totals['flushed_blocks']} covered) and {totals['snaps_checked']} snapshots "
          f"({totals['verified']} verified in the store): 0 losses"
          + (f"; qemu crashed by itself while booting {totals['qemu_crashes']} time(s) (extra cuts)" if totals["qemu_crashes"] else ""),
          flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
