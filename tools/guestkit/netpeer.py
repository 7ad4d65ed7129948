"""The namespace's end of a bulk TCP transfer with the guest (run inside the test's network namespace).

    netpeer.py recv PORT [--timeout S]          accept one connection on PORT, read to EOF
    netpeer.py send HOST PORT BYTES [--seed N]  connect, send BYTES pseudo-random bytes, close
    netpeer.py sniff IFACE                      count the frames crossing IFACE until SIGTERM

recv and send print one JSON line: bytes, md5, seconds (first byte to EOF, or connect to close), mbit_s.
sniff prints {"sniffing": IFACE} once its packet socket is bound, then on SIGTERM, per direction ("out": the
namespace transmits on IFACE, "in": IFACE receives), the frames seen, those longer than the interface's MTU
allows (Ethernet header included: only a GSO frame is), and the longest.  The kernel hands a packet socket a
GSO frame whole, before segmentation, so frames over the MTU show that segmentation was offloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import select
import signal
import socket
import sys
import time

CHUNK = 1 << 20
ETH_P_ALL = 0x0003
ETH_HLEN = 14
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33  # asm-generic/socket.h (not in Python's socket module)


def recv(port: int, timeout: float) -> dict:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    srv.settimeout(timeout)
    print(json.dumps({"listening": port}), flush=True)
    conn, _ = srv.accept()
    conn.settimeout(timeout)
    h = hashlib.md5()
    total = 0
    start = None
    buf = bytearray(CHUNK)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        if start is None:
            start = time.monotonic()
        h.update(memoryview(buf)[:n])
        total += n
    secs = time.monotonic() - start if start is not None else 0.0
    conn.close()
    srv.close()
    return {
        "bytes": total,
        "md5": h.hexdigest(),
        "seconds": round(secs, 3),
        "mbit_s": round(total * 8 / secs / 1e6, 1) if secs > 0 else 0,
    }


def send(host: str, port: int, size: int, seed: int, timeout: float) -> dict:
    rnd = random.Random(seed)
    h = hashlib.md5()
    deadline = time.monotonic() + timeout
    while True:  # the guest's listener may not be up yet
        try:
            conn = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.settimeout(timeout)
    start = time.monotonic()
    left = size
    while left:
        chunk = rnd.randbytes(min(CHUNK, left))
        h.update(chunk)
        conn.sendall(chunk)
        left -= len(chunk)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(4096):  # until the guest closes: everything sent has been taken
        pass
    secs = time.monotonic() - start
    conn.close()
    return {
        "bytes": size,
        "md5": h.hexdigest(),
        "seconds": round(secs, 3),
        "mbit_s": round(size * 8 / secs / 1e6, 1) if secs > 0 else 0,
    }


def sniff(iface: str) -> dict:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)  # (root: past rmem_max) lose few frames
    s.bind((iface, 0))
    with open(f"/sys/class/net/{iface}/mtu") as f:
        limit = int(f.read()) + ETH_HLEN
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    counts = {d: {"frames": 0, "over_mtu": 0, "longest": 0} for d in ("in", "out")}
    head = bytearray(64)  # MSG_TRUNC: the frame's whole length is returned, only its head copied
    print(json.dumps({"sniffing": iface}), flush=True)
    while not stop:
        try:
            if not select.select([s], [], [], 0.2)[0]:
                continue
            n, addr = s.recvfrom_into(head, len(head), socket.MSG_TRUNC)
        except InterruptedError:
            continue
        c = counts["out" if addr[2] == PACKET_OUTGOING else "in"]
        c["frames"] += 1
        c["over_mtu"] += n > limit
        c["longest"] = max(c["longest"], n)
    s.close()
    return {"mtu_frame": limit, **counts}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recv")
    r.add_argument("port", type=int)
    r.add_argument("--timeout", type=float, default=300)
    s = sub.add_parser("send")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("bytes", type=int)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--timeout", type=float, default=300)
    f = sub.add_parser("sniff")
    f.add_argument("iface")
    a = p.parse_args(argv)
    if a.cmd == "recv":
        out = recv(a.port, a.timeout)
    elif a.cmd == "sniff":
        out = sniff(a.iface)
    else:
        out = send(a.host, a.port, a.bytes, a.seed, a.timeout)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
