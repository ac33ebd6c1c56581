#!/usr/bin/env python3
"""A stand-in for mcpwarden's user approval, to check approval_client.py without mcpwarden.

    python fake_approval_server.py [PORT] [--always-ask]

Serves one stateless 2026-07-28 Streamable HTTP endpoint, POST /mcp (GET/DELETE: 405), with
one tool, `pay`. Prints `listening on http://127.0.0.1:PORT/mcp` (PORT 0, the default: any free
port), then logs each request body to stderr.

A `tools/call` of `pay` from a client that declared the elicitation capability is answered
with a multi-round-trip result (resultType "input_required") asking `elicitation/create` under
the key `mcpwarden_approval` and carrying a requestState. The client's retry (a new id, the
same name and arguments, plus `inputResponses` and that `requestState`) completes with "paid"
when the answer is accept with content {"approve": true}, else with "declined" (isError). A
client without the capability is refused at once (isError), as mcpwarden does; --always-ask
asks it anyway, to see what the SDK does then. Python stdlib only.
"""

import base64
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock

VERSION = "2026-07-28"
KEY = "mcpwarden_approval"
TOOL = {
    "name": "pay",
    "description": "Pay an amount",
    "inputSchema": {
        "type": "object",
        "properties": {"amount": {"type": "number"}},
        "required": ["amount"],
    },
}
ALWAYS_ASK = "--always-ask" in sys.argv
PENDING = {}  # requestState -> (tool name, arguments) of the call it was issued for
LOCK = Lock()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def complete(text: str, is_error: bool) -> dict:
    return {
        "resultType": "complete",
        "content": [{"type": "text", "text": text}],
        "isError": is_error,
    }


def call_tool(params: dict) -> dict:
    """The result of a tools/call, or {"error": ...} for a JSON-RPC error."""
    name, args = params.get("name"), params.get("arguments") or {}
    if name != "pay":
        return complete(f"Unknown tool: {name}", True)
    if "requestState" in params:  # the retry
        with LOCK:
            asked = PENDING.pop(params["requestState"], None)  # one use only
        if asked != (name, json.dumps(args, sort_keys=True)):
            return {"error": {"code": -32602, "message": "Unknown or mismatched requestState"}}
        answer = (params.get("inputResponses") or {}).get(KEY) or {}
        approved = answer.get("action") == "accept" and (answer.get("content") or {}).get("approve") is True
        return complete("paid", False) if approved else complete("declined", True)
    caps = params["_meta"].get("io.modelcontextprotocol/clientCapabilities") or {}
    if "elicitation" not in caps and not ALWAYS_ASK:
        return complete("approval required, but the client cannot ask its user", True)
    # Like mcpwarden's: "mcpw1." + payload + "." + tag (here random, not a MAC).
    state = "mcpw1." + b64(json.dumps({"tool": name}).encode()) + "." + b64(os.urandom(16))
    with LOCK:
        PENDING[state] = (name, json.dumps(args, sort_keys=True))
    return {
        "resultType": "input_required",
        "inputRequests": {
            KEY: {
                "method": "elicitation/create",
                "params": {
                    "mode": "form",
                    "message": f'mcpwarden: the agent wants to call the tool "{name}" with '
                    f"{json.dumps(args)}. Approve this call?",
                    "requestedSchema": {
                        "type": "object",
                        "properties": {
                            "approve": {
                                "type": "boolean",
                                "title": "Approve",
                                "description": "Allow this tool call once",
                            }
                        },
                        "required": ["approve"],
                    },
                },
            }
        },
        "requestState": state,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn

    def reply(self, status: int, body: dict | None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # stateless 2026-07-28: no GET stream, no session to delete
        self.reply(405, None)

    do_DELETE = do_GET

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        print(f"fake: {self.headers.get('mcp-method')} {body.decode()}", file=sys.stderr, flush=True)
        try:
            msg = json.loads(body)
            rid, method, params = msg["id"], msg["method"], msg.get("params") or {}
            meta = params["_meta"]
        except (ValueError, KeyError, TypeError):
            return self.reply(400, {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Bad request"}})
        if self.path != "/mcp":
            return self.reply(404, None)
        if self.headers.get("mcp-method") != method or meta.get("io.modelcontextprotocol/protocolVersion") != VERSION:
            err = {"code": -32020, "message": "Header mismatch"}
            return self.reply(400, {"jsonrpc": "2.0", "id": rid, "error": err})
        if method == "tools/list":
            result = {"resultType": "complete", "tools": [TOOL], "ttlMs": 0, "cacheScope": "private"}
        elif method == "tools/call":
            result = call_tool(params)
        else:
            err = {"code": -32601, "message": "Method not found"}
            return self.reply(404, {"jsonrpc": "2.0", "id": rid, "error": err})
        if "error" in result:
            return self.reply(200, {"jsonrpc": "2.0", "id": rid, "error": result["error"]})
        result["_meta"] = {"io.modelcontextprotocol/serverInfo": {"name": "fake-mcpwarden", "version": ""}}
        self.reply(200, {"jsonrpc": "2.0", "id": rid, "result": result})

    def log_message(self, *_args) -> None:  # the request bodies above are the log
        pass


def main() -> None:
    ports = [a for a in sys.argv[1:] if not a.startswith("--")]
    server = ThreadingHTTPServer(("127.0.0.1", int(ports[0]) if ports else 0), Handler)
    print(f"listening on http://127.0.0.1:{server.server_port}/mcp", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
