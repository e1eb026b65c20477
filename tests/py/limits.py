"""Per-connection and per-daemon limits of snapblk's NBD server, from raw sockets (the NBD
handshake done by hand) and a well-behaved libnbd client that must keep being served.

  limits.py flood SOCKET VOLUME CONNECTIONS REQUESTS SIZE SECONDS
      CONNECTIONS clients each send REQUESTS READs of SIZE bytes and never read a reply; a
      libnbd client meanwhile writes and reads back data for SECONDS. Prints "flooding" once
      every request is sent (the caller watches the daemon's memory from then on).
  limits.py cap SOCKET VOLUME MAX SNAPBLK DIR
      With the daemon started with --max-connections MAX: connections over MAX are closed at
      once, while the libnbd client and the control API (`SNAPBLK --dir DIR volume list`) work,
      and a slot freed is usable again.
  limits.py silent SOCKET VOLUME TIMEOUT
      With --handshake-timeout TIMEOUT (seconds): a client that sends nothing, or stops in the
      middle of the handshake, is dropped after TIMEOUT; one idle after its handshake is not.
"""
import os
import socket
import struct
import subprocess
import sys
import time

import nbd

NBDMAGIC, IHAVEOPT, OPTION_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_GO, REP_ACK, REP_INFO = 7, 1, 3
REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, CMD_READ = 0x25609513, 0x67446698, 0
CLIENT_FLAGS = 3  # FIXED_NEWSTYLE | NO_ZEROES


def fail(message):
    sys.exit(f"FAIL: {message}")


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def connect(sock_path, timeout=10):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock_path)
    return s


def greeting(s):
    magic, opt, flags = struct.unpack(">QQH", recv_exact(s, 18))
    if magic != NBDMAGIC or opt != IHAVEOPT or not flags & 1:
        fail(f"bad greeting {magic:#x} {opt:#x} {flags:#x}")


def negotiate(sock_path, volume):
    """A raw connection in the transmission phase (fixed newstyle, NBD_OPT_GO, simple replies)."""
    s = connect(sock_path)
    greeting(s)
    name = volume.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">I", CLIENT_FLAGS) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        if magic != OPTION_REPLY_MAGIC:
            fail(f"bad option reply magic {magic:#x}")
        recv_exact(s, length)
        if rtype == REP_ACK:
            return s
        if rtype != REP_INFO:
            fail(f"NBD_OPT_GO for {volume} answered {rtype:#x}")


def read_request(s, cookie, offset, length):
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length))


def closed_by_server(s, within):
    """True when the server closes `s` within `within` seconds without sending anything."""
    s.settimeout(within)
    try:
        data = s.recv(1)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    if data:
        fail(f"the server sent {data!r} on a connection it should have closed")
    return True


class Good:
    """A well-behaved libnbd client; every check writes fresh data and reads it back."""

    def __init__(self, sock_path, volume):
        self.h = nbd.NBD()
        self.h.connect_uri(f"nbd+unix:///{volume}?socket={sock_path}")
        self.size = self.h.get_size()
        self.rounds = 0
        self.slowest = 0.0

    def check(self):
        self.rounds += 1
        data = os.urandom(1 << 20)
        off = (self.rounds * (1 << 20)) % (self.size - (1 << 20))
        started = time.monotonic()
        self.h.pwrite(data, off)
        if self.h.pread(len(data), off) != data:
            fail(f"round {self.rounds}: the good client read back wrong data")
        self.slowest = max(self.slowest, time.monotonic() - started)


def flood(sock_path, volume, connections, requests, size, seconds):
    good = Good(sock_path, volume)
    good.check()
    span = good.size - size
    flooders = [negotiate(sock_path, volume) for _ in range(connections)]
    for s in flooders:
        # One send: a request a send would stall once the server stops reading (backpressure).
        s.sendall(b"".join(
            struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, cookie, (cookie * size) % span // 4096 * 4096, size)
            for cookie in range(requests)))
    print(f"flooding: {connections} connections x {requests} reads of {size >> 20} MiB, no reply read",
          flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        good.check()
        time.sleep(0.05)
    if good.slowest > 5:
        fail(f"the good client waited {good.slowest:.1f} s for one 1 MiB write and read")
    # The flooders' connections are still there and in sync (backpressure, not a disconnect).
    for s in flooders:
        s.settimeout(10)
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        if magic != SIMPLE_REPLY_MAGIC or error != 0 or cookie >= requests:
            fail(f"a flooding connection's first reply is {magic:#x} error {error} cookie {cookie}")
        s.close()
    good.check()
    print(f"good client served: {good.rounds} rounds of a 1 MiB write and read, slowest {good.slowest * 1000:.0f} ms")


def cap(sock_path, volume, max_connections, snapblk, daemon_dir):
    good = Good(sock_path, volume)
    good.check()
    holders = [negotiate(sock_path, volume) for _ in range(max_connections - 1)]
    print(f"ok: {max_connections} connections open (the good client and {len(holders)} raw ones)")
    for i in range(5):
        s = connect(sock_path)
        started = time.monotonic()
        if not closed_by_server(s, 5):
            fail(f"connection {max_connections + i + 1} over --max-connections {max_connections} "
                 "is still open after 5 s")
        waited = time.monotonic() - started
        if waited > 2:
            fail(f"connection over the cap closed only after {waited:.1f} s")
        s.close()
    print("ok: 5 connections over the cap closed at once")
    good.check()
    print("ok: the good client is still served")
    out = subprocess.run([snapblk, "--dir", daemon_dir, "volume", "list"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or volume not in out.stdout:
        fail(f"`snapblk volume list` while the NBD cap is reached: exit {out.returncode}\n{out.stdout}{out.stderr}")
    print("ok: the control API answers")
    # A slot given back is usable again (the server notices the hang-up asynchronously).
    holders.pop().close()
    deadline = time.monotonic() + 5
    while True:
        s = connect(sock_path)
        try:
            greeting(s)
            break
        except (EOFError, ConnectionResetError):
            s.close()
            if time.monotonic() > deadline:
                fail("no connection accepted 5 s after one of the capped connections closed")
            time.sleep(0.05)
    s.close()
    print("ok: a freed slot serves a new connection")
    for h in holders:
        h.close()
    good.check()


def silent(sock_path, volume, timeout):
    good = Good(sock_path, volume)
    cases = [
        ("sends nothing", b""),
        ("stops after its flags", struct.pack(">I", CLIENT_FLAGS)),
        ("stops in the middle of an option", struct.pack(">IQ", CLIENT_FLAGS, IHAVEOPT) + b"\0\0"),
    ]
    sockets = []
    for what, sent in cases:
        s = connect(sock_path)
        greeting(s)
        s.sendall(sent)
        sockets.append((what, s, time.monotonic()))
    for what, s, started in sockets:
        if not closed_by_server(s, timeout + 5):
            fail(f"a client that {what} is still connected {timeout + 5} s later")
        waited = time.monotonic() - started
        if waited < timeout * 0.8:
            fail(f"a client that {what} was dropped after {waited:.2f} s, before the {timeout} s timeout")
        print(f"ok: a client that {what} was dropped after {waited:.2f} s")
        s.close()
    # The timeout covers the handshake only: a client may stay idle after it.
    s = negotiate(sock_path, volume)
    time.sleep(timeout * 2.5)
    read_request(s, 1, 0, 4096)
    s.settimeout(10)
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    if (magic, error, cookie) != (SIMPLE_REPLY_MAGIC, 0, 1):
        fail(f"idle connection's read answered {magic:#x} {error} {cookie}")
    recv_exact(s, 4096)
    s.close()
    print(f"ok: a client idle for {timeout * 2.5:.1f} s after its handshake is still served")
    good.check()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "flood":
        flood(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), float(args[5]))
    elif cmd == "cap":
        cap(args[0], args[1], int(args[2]), args[3], args[4])
    elif cmd == "silent":
        silent(args[0], args[1], float(args[2]))
    else:
        sys.exit(__doc__)
    print("all limits cases handled")


main()
