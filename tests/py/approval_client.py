#!/usr/bin/env python3
"""Call one MCP tool as an official Python SDK (mcp==2.3.0) client speaking 2026-07-28.

    python approval_client.py URL TOOL ARGS_JSON MODE

MODE: `accept` (elicitation callback set; it answers accept, content {"approve": true}),
`decline` (callback set; it answers decline) or `none` (no callback, so the client does not
declare the elicitation capability).

Connects over Streamable HTTP with the protocol pinned to 2026-07-28 (no server/discover probe)
and calls the tool once with `Client.call_tool`, which itself drives the multi-round-trip loop:
on a result of resultType "input_required" it runs each `elicitation/create` input request
through the elicitation callback and retries tools/call with `inputResponses` and the echoed
`requestState` (mcp/client/_input_required.py). Prints one JSON line:

    {"ok": bool, "is_error": bool|null, "text": str, "elicitations": int,
     "messages": [str], "error": str|null}

`ok` is true when the call ended in a tool result (`is_error` is then its isError), false when
the SDK raised (`error`: "MCPError <code>: <message>" for a JSON-RPC error, else
"<ExceptionType>: <text>"). Exits 0; 2 only for usage errors. Never runs longer than ~30 s.
"""

import json
import os
import sys
import threading

import anyio
from mcp import Client, MCPError, types

TIMEOUT_S = 30.0
MODES = ("accept", "decline", "none")

out = {"ok": False, "is_error": None, "text": "", "elicitations": 0, "messages": [], "error": None}
printed = threading.Lock()  # held once the line is out: the one line is printed exactly once


def emit() -> None:
    if printed.acquire(blocking=False):
        print(json.dumps(out), flush=True)


def describe(exc: BaseException) -> str:
    # anyio task groups wrap failures in exception groups: report the first real one.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCPError {exc.code}: {exc.message}"
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"TimeoutError: no result within {TIMEOUT_S:.0f} s"
    return f"{type(exc).__name__}: {exc}"


async def call(url: str, tool: str, args: dict, mode: str) -> None:
    async def on_elicit(_ctx, params: types.ElicitRequestParams) -> types.ElicitResult:
        out["elicitations"] += 1
        out["messages"].append(params.message)
        if mode == "accept":
            return types.ElicitResult(action="accept", content={"approve": True})
        return types.ElicitResult(action="decline")

    with anyio.fail_after(TIMEOUT_S):
        async with Client(
            url,
            mode="2026-07-28",
            # Setting a callback is what declares {"elicitation": {"form": {}, "url": {}}}.
            elicitation_callback=on_elicit if mode != "none" else None,
            read_timeout_seconds=TIMEOUT_S,
        ) as client:
            result = await client.call_tool(tool, args)
    out["ok"] = True
    out["is_error"] = bool(result.is_error)
    out["text"] = "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def main() -> None:
    if len(sys.argv) != 5 or sys.argv[4] not in MODES:
        print(f"usage: {sys.argv[0]} URL TOOL ARGS_JSON {'|'.join(MODES)}", file=sys.stderr)
        sys.exit(2)
    url, tool, args_json, mode = sys.argv[1:]
    try:
        args = json.loads(args_json)
    except ValueError as e:
        print(f"ARGS_JSON is not JSON: {e}", file=sys.stderr)
        sys.exit(2)
    if not isinstance(args, dict):
        print("ARGS_JSON must be a JSON object", file=sys.stderr)
        sys.exit(2)

    # Backstop should shutdown itself hang past the deadline: report and leave.
    def give_up() -> None:
        out["ok"], out["error"] = False, f"TimeoutError: no answer within {TIMEOUT_S + 5:.0f} s"
        emit()
        os._exit(0)

    watchdog = threading.Timer(TIMEOUT_S + 5, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        anyio.run(call, url, tool, args, mode)
    except BaseException as e:  # noqa: BLE001 - every failure becomes the JSON line
        out["ok"], out["error"] = False, describe(e)
    emit()


if __name__ == "__main__":
    main()
