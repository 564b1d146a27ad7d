"""The MCP server (`/mcp` on `ringfence serve`, and `ringfence mcp` on stdio) driven by the
official PyPI `mcp` client over both transports: every tool, bad input, key isolation and the
audit trail. Run by scripts/conformance.sh against a fresh server; needs RINGFENCE_BIN,
E2B_API_URL, E2B_API_KEY and E2B_API_KEY_2 (a second tenant).
"""

import asyncio
import json
import os
import sys
import urllib.request

import httpx2
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

URL = os.environ["E2B_API_URL"]
KEY = os.environ["E2B_API_KEY"]
KEY2 = os.environ["E2B_API_KEY_2"]
BIN = os.environ["RINGFENCE_BIN"]
TOOLS = {"create_sandbox", "list_sandboxes", "kill_sandbox", "run_command", "run_code",
         "read_file", "write_file", "list_files"}


def http_session(key):
    client = httpx2.AsyncClient(headers={"X-API-Key": key}, timeout=120)
    return client, streamable_http_client(f"{URL}/mcp", http_client=client)


def stdio_session(key):
    params = StdioServerParameters(
        command=BIN, args=["mcp", "--url", URL], env={"RINGFENCE_API_KEY": key})
    return None, stdio_client(params)


def texts(result):
    return "\n".join(c.text for c in result.content if c.type == "text")


async def call(s, name, args, ok=True):
    r = await s.call_tool(name, args)
    is_error = r.is_error if hasattr(r, "is_error") else r.isError
    assert bool(is_error) != ok, f"{name}({args}): expected ok={ok}, got {texts(r)}"
    return r


def audit(key, sandbox):
    req = urllib.request.Request(f"{URL}/audit?sandbox={sandbox}&limit=1000",
                                 headers={"X-API-Key": key})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["records"]


async def scenario(label, opener):
    client, transport = opener(KEY)
    async with transport as streams, ClientSession(streams[0], streams[1]) as s:
        await s.initialize()
        names = {t.name for t in (await s.list_tools()).tools}
        assert TOOLS <= names, f"tools: {names}"

        r = await call(s, "create_sandbox", {"timeout": 120, "metadata": {"via": label}})
        sid = json.loads(texts(r))["sandbox_id"]

        r = await call(s, "run_command",
                       {"sandbox_id": sid, "command": "echo out-$X; echo err >&2; exit 3",
                        "envs": {"X": label}})
        out = json.loads(texts(r))
        assert out["exit_code"] == 3 and out["stdout"] == f"out-{label}\n", out
        assert out["stderr"] == "err\n", out

        # A command past its timeout is killed and reported as such.
        r = await call(s, "run_command",
                       {"sandbox_id": sid, "command": "sleep 30", "timeout": 1}, ok=False)
        assert "timed out" in texts(r), texts(r)

        body = f"hello from {label} <b>&</b>\n"
        await call(s, "write_file", {"sandbox_id": sid, "path": "/tmp/d/m.txt", "content": body})
        r = await call(s, "read_file", {"sandbox_id": sid, "path": "/tmp/d/m.txt"})
        assert texts(r) == body, texts(r)
        r = await call(s, "list_files", {"sandbox_id": sid, "path": "/tmp/d"})
        assert [e["name"] for e in json.loads(texts(r))] == ["m.txt"], texts(r)
        r = await call(s, "read_file", {"sandbox_id": sid, "path": "/nope"}, ok=False)
        assert "/nope" in texts(r), texts(r)

        r = await call(s, "list_sandboxes", {})
        assert sid in [x["sandbox_id"] for x in json.loads(texts(r))]

        # Bad input: clear errors naming the problem, and the server goes on serving.
        r = await call(s, "run_command", {"sandbox_id": sid}, ok=False)
        assert 'missing required argument "command"' in texts(r), texts(r)
        r = await call(s, "run_command",
                       {"sandbox_id": sid, "command": "true", "timeout": "soon"}, ok=False)
        assert 'argument "timeout" must be number' in texts(r), texts(r)
        r = await call(s, "run_command",
                       {"sandbox_id": sid, "command": "true", "timeout": -1}, ok=False)
        assert "timeout must be more than 0" in texts(r), texts(r)
        r = await call(s, "run_command", {"sandbox_id": sid, "command": "true", "shell": "zsh"},
                       ok=False)
        assert 'unknown argument "shell"' in texts(r), texts(r)
        r = await call(s, "create_sandbox", {"template": "no-such-template"}, ok=False)
        assert "no-such-template" in texts(r), texts(r)
        r = await call(s, "create_sandbox", {"tier": "bogus"}, ok=False)
        assert "bogus" in texts(r), texts(r)
        r = await call(s, "run_code", {"sandbox_id": sid, "code": "1"}, ok=False)
        assert "code-interpreter-v1" in texts(r), texts(r)
        r = await call(s, "run_command", {"sandbox_id": "../../x", "command": "true"}, ok=False)
        assert "not a sandbox id" in texts(r), texts(r)
        try:
            await s.call_tool("format_disk", {})
            raise AssertionError("an unknown tool was accepted")
        except Exception as e:  # the client raises the JSON-RPC error
            assert "unknown tool" in str(e), e

        # Another tenant's session sees nothing of this sandbox and can do nothing to it.
        client2, transport2 = opener(KEY2)
        async with transport2 as st2, ClientSession(st2[0], st2[1]) as s2:
            await s2.initialize()
            r = await call(s2, "list_sandboxes", {})
            assert sid not in texts(r), texts(r)
            for tool, args in [("run_command", {"command": "id"}),
                               ("read_file", {"path": "/tmp/d/m.txt"}),
                               ("write_file", {"path": "/tmp/x", "content": "x"}),
                               ("list_files", {"path": "/"}),
                               ("kill_sandbox", {})]:
                r = await call(s2, tool, {"sandbox_id": sid, **args}, ok=False)
                assert "not found" in texts(r), (tool, texts(r))
        if client2:
            await client2.aclose()

        # Audited exactly as through the E2B API: the command with its exit code.
        recs = audit(KEY, sid)
        cmds = [r for r in recs if r["action"] == "exec.command"]
        assert any("exit 3" in r["detail"].get("command", "") and r["exit_code"] == 3
                   for r in cmds), cmds
        assert any(r["action"] == "sandbox.create" for r in recs), recs
        assert audit(KEY2, sid) == [], "another key reads this sandbox's audit"

        await call(s, "kill_sandbox", {"sandbox_id": sid})
        r = await call(s, "list_sandboxes", {})
        assert sid not in texts(r), texts(r)
        r = await call(s, "run_command", {"sandbox_id": sid, "command": "true"}, ok=False)

        await code_interpreter(s, label)
    if client:
        await client.aclose()
    print(f"mcp over {label}: ok")


async def code_interpreter(s, label):
    r = await s.call_tool("create_sandbox", {"template": "code-interpreter-v1", "timeout": 120})
    if r.is_error:
        print(f"SKIPPED run_code over {label}: no code interpreter here ({texts(r)})")
        return
    sid = json.loads(texts(r))["sandbox_id"]
    try:
        await call(s, "run_code", {"sandbox_id": sid, "code": "x = 6 * 7\nprint('p', x)"})
        r = await call(s, "run_code", {"sandbox_id": sid, "code": "x + 1"})
        assert "43" in texts(r), texts(r)
        r = await call(s, "run_code", {"sandbox_id": sid, "code": (
            "import matplotlib.pyplot as plt\n"
            "plt.plot([1, 2, 3])\nplt.show()")})
        images = [c for c in r.content if c.type == "image"]
        assert images and images[0].mime_type == "image/png", r.content
        assert images[0].data.startswith("iVBOR"), images[0].data[:20]
        r = await call(s, "run_code", {"sandbox_id": sid, "code": "1/0"}, ok=False)
        assert "ZeroDivisionError" in texts(r), texts(r)
        r = await call(s, "run_code", {"sandbox_id": sid, "code": "echo $((2+3))",
                                       "language": "bash"})
        assert "5" in texts(r), texts(r)
        recs = audit(KEY, sid)
        assert sum(r["action"] == "exec.cell" for r in recs) >= 4, recs
    finally:
        await s.call_tool("kill_sandbox", {"sandbox_id": sid})


async def refused(label, opener):
    client, transport = opener("rf_wrong_key")
    try:
        async with transport as streams, ClientSession(streams[0], streams[1]) as s:
            await asyncio.wait_for(s.initialize(), 30)
        raise AssertionError(f"a wrong key was accepted over {label}")
    except AssertionError:
        raise
    except BaseException as e:  # noqa: BLE001 - anyio wraps the refusal in an ExceptionGroup
        assert "401" in repr(e) or "invalid API key" in repr(e) or "refused" in repr(e), repr(e)
    finally:
        if client:
            await client.aclose()
    print(f"mcp over {label}: wrong key refused")


async def main():
    for label, opener in [("http", http_session), ("stdio", stdio_session)]:
        await scenario(label, opener)
        await refused(label, opener)
    # The server still serves after everything above.
    with urllib.request.urlopen(f"{URL}/health") as r:
        assert r.status == 200


if __name__ == "__main__":
    asyncio.run(main())
    print("mcp: all passed")
    sys.exit(0)
