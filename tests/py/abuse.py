"""Protocol abuse against a snapblk daemon: bad requests get the right NBD error codes, broken
connections are dropped, and a well-behaved client connected throughout keeps working.

  abuse.py SOCKET VOLUME SNAPSHOT_EXPORT
"""
import errno
import os
import socket
import struct
import sys

import nbd

SOCK, VOL, SNAP = sys.argv[1], sys.argv[2], sys.argv[3]
URI = f"nbd+unix:///{VOL}?socket={SOCK}"
NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
OPT_GO, REP_ACK, REP_ERR_UNSUP, REQUEST_MAGIC, SIMPLE_REPLY = 7, 1, 0x80000001, 0x25609513, 0x67446698
REP_ERR_POLICY = 0x80000002

good = nbd.NBD()
good.connect_uri(URI)
size = good.get_size()
step = 0


def check_good_client():
    """The well-behaved client still reads back what it writes."""
    global step
    step += 1
    data = os.urandom(8192)
    off = (step * 65536) % (size - 8192)
    good.pwrite(data, off)
    assert good.pread(8192, off) == data, f"step {step}: good client read back wrong data"


def expect_errno(what, want, fn):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            sys.exit(f"{what}: got errno {e.errnum} ({e}), want {want}")
        print(f"ok: {what} -> {errno.errorcode[want]}")
        check_good_client()
        return
    sys.exit(f"{what}: succeeded but should fail with {errno.errorcode[want]}")


def loose(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)  # let bad requests reach the server
    h.connect_uri(uri)
    return h


h = loose(URI)
expect_errno("read past the end", errno.EINVAL, lambda: h.pread(4096, size))
expect_errno("read straddling the end", errno.EINVAL, lambda: h.pread(8192, size - 4096))
expect_errno("write past the end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size))
expect_errno("trim past the end", errno.ENOSPC, lambda: h.trim(8192, size - 4096))
expect_errno("zero past the end", errno.ENOSPC, lambda: h.zero(8192, size))
expect_errno("read over the maximum size", errno.EINVAL, lambda: h.pread(33 << 20, 0))
expect_errno("write over the maximum size", errno.EINVAL, lambda: h.pwrite(bytes(33 << 20), 0))
# The connection is still in sync after all that.
h.pwrite(b"y" * 4096, 0)
assert h.pread(4096, 0) == b"y" * 4096
h.shutdown()

ro = loose(f"nbd+unix:///{SNAP}?socket={SOCK}")
expect_errno("write to a read-only snapshot", errno.EPERM, lambda: ro.pwrite(b"z" * 4096, 0))
expect_errno("trim of a read-only snapshot", errno.EPERM, lambda: ro.trim(4096, 0))
expect_errno("zero of a read-only snapshot", errno.EPERM, lambda: ro.zero(4096, 0))
expect_errno("read past the end of a snapshot", errno.EINVAL, lambda: ro.pread(4096, size))
ro.shutdown()

# Block status past the end (base:allocation negotiated).
bs = nbd.NBD()
bs.set_strict_mode(0)
bs.add_meta_context("base:allocation")
bs.connect_uri(URI)
expect_errno("block status past the end", errno.EINVAL,
             lambda: bs.block_status(4096, size, lambda *a: 0))
bs.shutdown()

# An export that does not exist: the handshake fails, nothing else is disturbed.
try:
    nbd.NBD().connect_uri(f"nbd+unix:///no-such-volume?socket={SOCK}")
    sys.exit("connecting to a missing export succeeded")
except nbd.Error as e:
    print(f"ok: unknown export refused ({e})")
check_good_client()


def raw():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(SOCK)
    greeting = recv_exact(s, 18)
    magic, opt, flags = struct.unpack(">QQH", greeting)
    assert magic == NBDMAGIC and opt == IHAVEOPT and flags & 1, "bad greeting"
    return s


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_server(s):
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def option(s, opt, data):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def option_reply(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, "bad option reply magic"
    return opt, rtype, recv_exact(s, length)


# Truncated handshake: two bytes of client flags, then hang up.
s = raw()
s.sendall(b"\x00\x00")
s.close()
check_good_client()
print("ok: truncated handshake")

# Wrong option magic: the server cannot resynchronize and closes.
s = raw()
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
assert closed_by_server(s), "server kept a connection with a bad option magic"
check_good_client()
print("ok: wrong option magic closes the connection")

# Unknown option: ERR_UNSUP, and the handshake continues to a working GO.
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, 99, b"hello")
opt, rtype, _ = option_reply(s)
assert (opt, rtype) == (99, REP_ERR_UNSUP), f"unknown option answered {rtype:#x}"
name = VOL.encode()
option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while True:
    opt, rtype, _ = option_reply(s)
    if rtype == REP_ACK:
        break
    assert rtype == 3, f"GO answered {rtype:#x}"
print("ok: unknown option -> ERR_UNSUP, then GO works")


def request(s, cmd, offset, length, cookie, flags=0, magic=REQUEST_MAGIC):
    s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length))


def simple_reply(s):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_REPLY, f"bad reply magic {magic:#x}"
    return error, cookie


request(s, 0, 0, 4096, 1)
error, cookie = simple_reply(s)
assert (error, cookie) == (0, 1)
recv_exact(s, 4096)
request(s, 99, 0, 0, 2)
assert simple_reply(s) == (errno.EINVAL, 2), "unknown command must get EINVAL"
request(s, 0, 0, 4096, 3, flags=0x8000)
assert simple_reply(s) == (errno.EINVAL, 3), "unknown flags must get EINVAL"
request(s, 0, 0, 0, 4)
assert simple_reply(s) == (errno.EINVAL, 4), "zero-length read must get EINVAL"
request(s, 7, 0, 4096, 5)
assert simple_reply(s) == (errno.EINVAL, 5), "block status without structured replies must get EINVAL"
check_good_client()
print("ok: unknown command, unknown flags, zero length, block status without contexts -> EINVAL")
request(s, 0, 0, 4096, 6, magic=0xDEADBEEF)
assert closed_by_server(s), "server kept a connection after a bad request magic"
check_good_client()
print("ok: bad request magic closes the connection")

# Truncated request, then hang up mid-payload of a write.
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while option_reply(s)[1] != REP_ACK:
    pass
s.sendall(struct.pack(">IHH", REQUEST_MAGIC, 0, 1))
s.close()
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while option_reply(s)[1] != REP_ACK:
    pass
request(s, 1, 0, 65536, 7)
s.sendall(b"partial")
s.close()
check_good_client()
print("ok: truncated requests")

# Many reads in flight, then hang up without reading a single reply.
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while option_reply(s)[1] != REP_ACK:
    pass
for c in range(64):
    request(s, 0, (c * 1048576) % (size - 1048576), 1048576, 100 + c)
s.close()
check_good_client()
print("ok: hang-up with 64 MiB of replies pending")

# A write header announcing 1 GiB of payload, and no payload: an error reply or a close,
# never a hang of the server or a huge allocation.
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while option_reply(s)[1] != REP_ACK:
    pass
request(s, 1, 0, 1 << 30, 8)
try:
    head = s.recv(16)
    if head:
        magic, error, cookie = struct.unpack(">IIQ", head)
        assert magic == SIMPLE_REPLY and error != 0 and cookie == 8, f"oversized write answered {head.hex()}"
except (ConnectionResetError, socket.timeout):
    pass
s.close()
check_good_client()
print("ok: oversized write header")

# A read of 1 GiB (over the maximum block size) on a raw connection: EINVAL or EOVERFLOW,
# and the connection stays in sync.
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
while option_reply(s)[1] != REP_ACK:
    pass
request(s, 0, 0, 1 << 30, 9)
error, cookie = simple_reply(s)
assert cookie == 9 and error in (errno.EINVAL, errno.EOVERFLOW), f"1 GiB read answered error {error}"
request(s, 0, 4096, 512, 10)
assert simple_reply(s) == (0, 10), "connection out of sync after an oversized read"
recv_exact(s, 512)
request(s, 2, 0, 0, 11)  # NBD_CMD_DISC: the server closes
assert closed_by_server(s), "server kept the connection after NBD_CMD_DISC"
check_good_client()
print("ok: oversized read, then disconnect")

# Garbage instead of a handshake, and a huge option length.
s = raw()
s.sendall(b"\xff" * 64)  # client flags with unknown bits set
assert closed_by_server(s), "server kept a connection after garbage client flags"
s = raw()
s.sendall(struct.pack(">I", 3))
option(s, 5, b"")  # STARTTLS: this daemon runs without TLS (NBD_REP_ERR_POLICY)
opt, rtype, _ = option_reply(s)
assert rtype == REP_ERR_POLICY, hex(rtype)
s.sendall(struct.pack(">QII", IHAVEOPT, 1, 1 << 30))  # EXPORT_NAME of 1 GiB
assert closed_by_server(s)
check_good_client()
print("ok: garbage and oversized options")
good.shutdown()
print("all abuse cases handled")
