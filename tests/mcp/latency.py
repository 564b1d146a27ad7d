"""Median latency of MCP tool calls over streamable HTTP and over `ringfence mcp` (stdio), for
docs/PERFORMANCE.md: `run_command` of `true` and `list_files` of `/`, N calls each, one warm
sandbox. Same environment as mcp_client.py."""

import asyncio
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from mcp_client import ClientSession, KEY, http_session, stdio_session, texts  # noqa: E402

N = int(os.environ.get("N", "30"))


async def measure(label, opener):
    client, transport = opener(KEY)
    async with transport as st, ClientSession(st[0], st[1]) as s:
        await s.initialize()
        sid = json.loads(texts(await s.call_tool("create_sandbox", {"timeout": 120})))["sandbox_id"]
        for tool, args in [("run_command", {"command": "true"}), ("list_files", {"path": "/"})]:
            await s.call_tool(tool, {"sandbox_id": sid, **args})
            times = []
            for _ in range(N):
                t = time.perf_counter()
                r = await s.call_tool(tool, {"sandbox_id": sid, **args})
                times.append((time.perf_counter() - t) * 1000)
                assert not r.is_error, texts(r)
            print(f"{label:5} {tool:12} median {statistics.median(times):6.1f} ms  "
                  f"p90 {sorted(times)[int(N * 0.9) - 1]:6.1f} ms  (n={N})")
        await s.call_tool("kill_sandbox", {"sandbox_id": sid})
    if client:
        await client.aclose()


async def main():
    await measure("http", http_session)
    await measure("stdio", stdio_session)


asyncio.run(main())
