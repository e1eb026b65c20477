"""Write-order load for the consistency-group test: writes sequence number n (8 bytes, little
endian, at offset 0) to export A, waits for the reply, then n to export B, waits, then n+1 ...
until the file STOP exists. Prints the last n written.

usage: seqwriter.py URI_A URI_B STOP
"""
import os
import struct
import sys

import nbd


def main():
    uri_a, uri_b, stop = sys.argv[1:4]
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(uri_a)
    b.connect_uri(uri_b)
    n = 0
    while not os.path.exists(stop):
        n += 1
        block = struct.pack("<Q", n) + bytes(4088)
        a.pwrite(block, 0)  # returns once the server acknowledged it
        b.pwrite(block, 0)
    a.shutdown()
    b.shutdown()
    print(n)


if __name__ == "__main__":
    main()
