"""Clients that push the agent's limits, for tests/tests/limits.rs. Run inside the attached
cgroup; each prints one JSON object on stdout.

  slowloris ADDR N INTERVAL_MS SECONDS   N connections, each sending a request head one byte
                                         per INTERVAL_MS; when the agent closed each
  connections ADDR N HOLD_MS             N connections held open, each then sends one call;
                                         the status each got (0: closed without an answer);
                                         printed, then held HOLD_MS more
  idle ADDR IDLE_MS                      a call, IDLE_MS of silence, a call on the same
                                         connection; both statuses, then whether it stays open
  sse ADDR WAIT_MS                       GET /sse; after WAIT_MS, whether the stream is open
  stall_body ADDR                        a head announcing 100 body bytes, 10 sent; the status
  hold ADDR N MS                         N connections opened (as many as connect), held MS
"""

import json
import select
import socket
import sys
import time

CALL = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                   "params": {"name": "echo", "arguments": {"text": "x"}}}).encode()


def request(host, body=CALL):
    return (b"POST /mcp HTTP/1.1\r\nHost: " + host.encode() +
            b"\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream"
            b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def connect(addr):
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def status(sock):
    """The status of the next response, its whole body read (by Content-Length or to EOF); 0
    when the connection closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    code = int(lines[0].split()[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    while chunked and not (rest == b"0\r\n\r\n" or rest.endswith(b"\r\n0\r\n\r\n")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    while length is not None and len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return code


def is_open(sock):
    """Whether the peer has not closed: nothing to read, or data (not EOF)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(65536, socket.MSG_PEEK) != b""
    except OSError:
        return False


def slowloris(addr, n, interval_ms, seconds):
    head = request(addr)[:60]
    socks = []
    for _ in range(n):
        s = connect(addr)
        s.setblocking(False)
        socks.append(s)
    start = time.monotonic()
    closed = [None] * n
    sent = [0] * n
    while time.monotonic() - start < seconds and None in closed:
        for i, s in enumerate(socks):
            if closed[i] is not None:
                continue
            if not is_open(s):
                closed[i] = int((time.monotonic() - start) * 1000)
                continue
            if sent[i] < len(head):
                try:
                    s.send(head[sent[i]:sent[i] + 1])
                    sent[i] += 1
                except OSError:
                    closed[i] = int((time.monotonic() - start) * 1000)
        time.sleep(interval_ms / 1000)
    print(json.dumps({"closed_after_ms": closed, "bytes_sent": sent}))


def connections(addr, n, hold_ms):
    socks = [connect(addr) for _ in range(n)]
    time.sleep(0.3)
    statuses = []
    for s in socks:
        try:
            s.sendall(request(addr))
            statuses.append(status(s))
        except OSError:
            statuses.append(0)
    print(json.dumps({"statuses": statuses}), flush=True)
    time.sleep(hold_ms / 1000)


def idle(addr, idle_ms):
    s = connect(addr)
    s.sendall(request(addr))
    first = status(s)
    time.sleep(idle_ms / 1000)
    s.sendall(request(addr))
    second = status(s)
    print(json.dumps({"first": first, "second": second, "open": is_open(s)}))


def sse(addr, wait_ms):
    s = connect(addr)
    s.sendall(b"GET /sse HTTP/1.1\r\nHost: " + addr.encode() + b"\r\naccept: text/event-stream\r\n\r\n")
    data = b""
    while b"endpoint" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    got_endpoint = b"endpoint" in data
    time.sleep(wait_ms / 1000)
    print(json.dumps({"endpoint": got_endpoint, "open": is_open(s)}))


def stall_body(addr):
    s = connect(addr)
    head = request(addr, b"x" * 100)
    s.sendall(head[: len(head) - 90])
    start = time.monotonic()
    code = status(s)
    print(json.dumps({"status": code, "after_ms": int((time.monotonic() - start) * 1000)}))


def hold(addr, n, ms):
    socks = []
    for _ in range(n):
        try:
            socks.append(connect(addr))
        except OSError:
            break
    print(json.dumps({"opened": len(socks)}), flush=True)
    time.sleep(ms / 1000)


def main():
    cmd, addr, *rest = sys.argv[1:]
    if cmd == "slowloris":
        slowloris(addr, int(rest[0]), int(rest[1]), float(rest[2]))
    elif cmd == "connections":
        connections(addr, int(rest[0]), int(rest[1]))
    elif cmd == "idle":
        idle(addr, int(rest[0]))
    elif cmd == "sse":
        sse(addr, int(rest[0]))
    elif cmd == "hold":
        hold(addr, int(rest[0]), int(rest[1]))
    elif cmd == "stall_body":
        stall_body(addr)
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
