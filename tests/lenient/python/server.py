"""lenient-python: a tiny MCP server that parses request bodies the way Python servers do.

The body (Content-Length, or chunked) is handed as bytes to the standard library's
json.loads, which detects UTF-8, UTF-16 and UTF-32 (either byte order, with or without a BOM)
by itself and skips a UTF-8 BOM; duplicate keys: the last wins; NaN, Infinity and lone
surrogate escapes are accepted.

Every path and every HTTP method is served the same way. A tools/call is executed: one JSON
line {"tool": <name as read>, "arguments": <arguments as read>} is appended to the --log file
(flushed) before the answer is sent.

Usage: python3 server.py --listen 127.0.0.1:PORT --log executions.jsonl [--requests requests.jsonl]
Prints "listening <addr>" on stdout once bound.
"""

import argparse
import json
import math
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def schema(props):
    return {"type": "object", "properties": props}


TOOLS = [
    {"name": "echo", "description": "Echo text", "inputSchema": schema({"text": {"type": "string"}})},
    {"name": "secret_dump", "description": "Dump secrets", "inputSchema": schema({})},
    {"name": "start_security_scan", "description": "Start a scan", "inputSchema": schema({"cluster": {"type": "string"}})},
    {"name": "drop_cluster", "description": "Drop a cluster", "inputSchema": schema({"cluster": {"type": "string"}})},
    {"name": "transfer", "description": "Transfer money", "inputSchema": schema({"amount": {"type": "number"}, "to": {"type": "string"}})},
]

LOCK = threading.Lock()
OPTS = None


def loggable(v):
    """v as standard JSON can carry it: NaN and infinities as strings ("nan", "inf"), lone
    surrogates (which JSON's \\uD800 escapes let a str hold) as U+FFFD."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, dict):
        return {loggable(k): loggable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [loggable(x) for x in v]
    return v


def log_line(path, v):
    if not path:
        return
    line = json.dumps(loggable(v))
    with LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def rpc_error(id_, code, message):
    return {"jsonrpc": "2.0", "id": id_, "error": {"code": code, "message": message}}


def answer(m):
    """The response to one message, or None for a notification or a response."""
    if not isinstance(m, dict):
        return rpc_error(None, -32600, "Invalid Request")
    if not isinstance(m.get("method"), str) or m.get("id") is None:
        return None
    params = m.get("params")
    if not isinstance(params, dict):
        params = {}
    method = m["method"]
    if method == "initialize":
        version = params.get("protocolVersion")
        result = {
            "protocolVersion": version if isinstance(version, str) else "2025-06-18",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "lenient-python", "version": "1"},
        }
    elif method == "tools/list":
        result = {"tools": TOOLS}
    elif method == "tools/call":
        name = params.get("name")
        log_line(OPTS.log, {"tool": name, "arguments": params.get("arguments")})
        result = {"content": [{"type": "text", "text": f"python ran {name}"}]}
    else:
        result = {}
    return {"jsonrpc": "2.0", "id": m["id"], "result": result}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __getattr__(self, name):
        # http.server dispatches to do_<METHOD>: every method gets the same handler.
        if name.startswith("do_"):
            return self.handle_any
        raise AttributeError(name)

    def log_message(self, format, *args):
        pass

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send(self, status, v=None):
        body = b"" if v is None else json.dumps(v).encode()
        self.send_response(status)
        if v is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        try:
            body = self.read_body()
        except ValueError as e:
            self.close_connection = True
            self.send(400, rpc_error(None, -32700, f"Parse error: {e}"))
            return
        log_line(OPTS.requests, {"method": self.command, "path": self.path, "length": len(body)})
        try:
            parsed = json.loads(body)
        except Exception as e:  # JSONDecodeError, UnicodeDecodeError, RecursionError
            self.send(400, rpc_error(None, -32700, f"Parse error: {e}"))
            return
        batch = isinstance(parsed, list)
        out = [r for r in map(answer, parsed if batch else [parsed]) if r is not None]
        if not out:
            self.send(202)
            return
        self.send(200, out if batch else out[0])


def main():
    global OPTS
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--log", required=True)
    p.add_argument("--requests", default="")
    OPTS = p.parse_args()
    host, port = OPTS.listen.rsplit(":", 1)
    host = host.strip("[]")

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, int(port)), Handler)
    bound_host, bound_port = server.server_address[:2]
    shown = f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"
    print(f"listening {shown}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
