"""The raw TCP stream that measures an emulated link (cluster.Cluster.measure), one end in each node's
namespace, run by path so that neither the package nor torch is imported:

    python tcpstream.py serve ADDR PORT           prints "ready", then one JSON line: bytes, seconds, bytes_per_s
    python tcpstream.py send ADDR PORT SECONDS

The receiver counts what arrives after its first WARM_S seconds: tbf lets a burst through at once and
TCP starts slowly, and neither is the link's rate.
"""
import json
import socket
import sys
import time

WARM_S = 0.25


def main(argv: list[str]) -> None:
    role, addr, port = argv[0], argv[1], int(argv[2])
    if role == "send":
        chunk, end = b"\0" * (1 << 20), time.monotonic() + float(argv[3])
        with socket.create_connection((addr, port), timeout=30) as s:
            while time.monotonic() < end:
                s.sendall(chunk)
        return
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        with conn:
            t0 = start = last = None
            n = 0
            while chunk := conn.recv(1 << 20):
                last = time.perf_counter()
                t0 = t0 or last
                if start is not None:
                    n += len(chunk)
                elif last - t0 >= WARM_S:
                    start = last  # the bytes that arrive after this
    span = (last - start) if start is not None else 0.0
    print(json.dumps({"bytes": n, "seconds": span, "bytes_per_s": n / span if span > 0 else None}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
