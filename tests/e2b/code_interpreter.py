"""Drives the unmodified `e2b-code-interpreter` Python SDK (latest from PyPI) against
`ringfence serve`: values, streaming, rich results, errors, contexts, JavaScript, bash,
cancellation, and that the kernel really runs inside the sandbox with the sandbox's limits.

Run by scripts/conformance.sh with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY set. Each check
prints one line; any failure raises.
"""

import base64
import os
import signal
import subprocess
import time
import urllib.parse

import checks
from checks import check
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox

# RINGFENCE_TIER=gvisor runs the suite on that tier (template "code-interpreter-v1@gvisor"
# wherever a test names none; the SDK itself is unmodified).
_TIER = os.environ.get("RINGFENCE_TIER")
if _TIER:
    _sdk_create = Sandbox.create

    def _create_on_tier(*args, **kwargs):
        if "ringfence.tier" not in (kwargs.get("metadata") or {}):
            kwargs.setdefault("template", f"code-interpreter-v1@{_TIER}")
        return _sdk_create(*args, **kwargs)

    Sandbox.create = _create_on_tier


def values_and_state(s):
    s.run_code("x = 41")
    r = s.run_code("x + 1")
    check("state kept between cells; last expression is the result", r.text == "42", r)
    r = s.run_code("'abc'")
    check("a string result loses one level of quotes", r.text == "abc", r.text)
    r = s.run_code("y = 1")
    check("an assignment has no result", r.text is None and r.results == [], r)
    c1 = s.run_code("1").execution_count
    c2 = s.run_code("2").execution_count
    check("execution count increments", c2 == c1 + 1, (c1, c2))


def streaming(s):
    seen = []
    start = time.monotonic()
    r = s.run_code(
        "import sys, time\nprint('first', flush=True)\ntime.sleep(1.5)\n"
        "print('second')\nprint('oops', file=sys.stderr)",
        on_stdout=lambda m: seen.append((time.monotonic() - start, m.line if hasattr(m, "line") else str(m))),
    )
    total = time.monotonic() - start
    check("stdout collected", "".join(r.logs.stdout) == "first\nsecond\n", r.logs)
    check("stderr collected", "".join(r.logs.stderr) == "oops\n", r.logs)
    check(
        "on_stdout fires as output is produced",
        len(seen) >= 2 and seen[0][0] < total - 1.0,
        (seen, total),
    )
    r = s.run_code("import subprocess; subprocess.run(['echo', 'from a child'])")
    check("a subprocess's output is captured", "from a child" in "".join(r.logs.stdout), r.logs)


def rich(s):
    r = s.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    )
    png = r.results[0].png if r.results else None
    check(
        "matplotlib figure comes back as a PNG",
        png is not None and base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n",
        r,
    )
    r = s.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
    html = r.results[0].html if r.results else None
    check("a DataFrame comes back as HTML", html is not None and "<table" in html, r)
    check("and as text", r.text is not None and "a" in r.text, r.text)
    r = s.run_code("from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))\n7")
    check(
        "display() gives a non-main result",
        len(r.results) == 2 and r.results[0].html == "<b>hi</b>" and not r.results[0].is_main_result,
        r.results,
    )
    check("the last expression is the main result", r.results[1].is_main_result and r.text == "7", r)
    r = s.run_code(
        "class M:\n    def _repr_markdown_(self): return '**m**'\n"
        "    def _repr_svg_(self): return '<svg></svg>'\n    def _repr_latex_(self): return '$x$'\n"
        "    def _repr_json_(self): return {'k': 1}\nM()"
    )
    res = r.results[0] if r.results else None
    check(
        "markdown, SVG, LaTeX and JSON representations",
        res is not None and res.markdown == "**m**" and res.svg == "<svg></svg>"
        and res.latex == "$x$" and res.json == {"k": 1},
        res,
    )


def errors(s):
    r = s.run_code("1/0")
    e = r.error
    check(
        "an error carries name, value and traceback",
        e is not None and e.name == "ZeroDivisionError" and "division by zero" in e.value
        and "1/0" in e.traceback,
        e,
    )
    r = s.run_code("x")
    check("the context survives an error", r.text == "41", r)
    r = s.run_code("import os; os.environ.get('CELL_VAR')", envs={"CELL_VAR": "v1"})
    check("per-cell env vars apply", r.text == "v1", r)
    r = s.run_code("import os; os.environ.get('CELL_VAR')")
    check("and are gone after the cell", r.text is None or r.text == "None", r.text)


def contexts(s):
    ctx = s.create_code_context(language="python")
    r = s.run_code("x", context=ctx)
    check("a new context has fresh state", r.error is not None and r.error.name == "NameError", r)
    s.run_code("z = 5", context=ctx)
    check("its own state persists", s.run_code("z", context=ctx).text == "5")
    ids = [c.id for c in s.list_code_contexts()]
    check("contexts are listed", ctx.id in ids, ids)
    s.restart_code_context(ctx)
    r = s.run_code("z", context=ctx)
    check("restart clears a context's state", r.error is not None and r.error.name == "NameError", r)
    s.remove_code_context(ctx)
    check("a removed context is gone", ctx.id not in [c.id for c in s.list_code_contexts()])
    ctx2 = s.create_code_context(cwd="/tmp")
    r = s.run_code("import os; os.getcwd()", context=ctx2)
    check("a context starts in its cwd", r.text == "/tmp", r.text)


def other_languages(s):
    r = s.run_code("console.log(1+1)", language="javascript")
    check("javascript: console.log streams stdout", "".join(r.logs.stdout) == "2\n", r.logs)
    s.run_code("const a = 20", language="javascript")
    r = s.run_code("a * 2 + 2", language="javascript")
    check("javascript: state and value", r.text == "42", r)
    r = s.run_code("null.x", language="javascript")
    check("javascript: errors", r.error is not None and r.error.name == "TypeError", r.error)
    ctx = s.create_code_context(language="bash")
    s.run_code("export GREETING=hello; cd /tmp", context=ctx)
    r = s.run_code("echo $GREETING from $(pwd)", context=ctx)
    check("bash: variables and cwd persist", "".join(r.logs.stdout) == "hello from /tmp\n", r.logs)


def cancellation(s):
    s.run_code("kept = 'yes'")
    start = time.monotonic()
    try:
        s.run_code("import time\nwhile True: time.sleep(0.1)", timeout=2)
        check("a timed-out cell raises", False, "no exception")
    except TimeoutException:
        check("a timed-out cell raises TimeoutException", time.monotonic() - start < 10)
    time.sleep(0.5)
    r = s.run_code("kept")
    check("the context stays usable with its state after a timeout", r.text == "yes", r)
    check("the sandbox is still running", s.is_running())


def inside_the_sandbox(s):
    r = s.run_code("open('/home/user/from_kernel.txt', 'w').write('k'); import os; os.getuid()")
    check("the kernel runs as the sandbox's user", r.text == "1000", r)
    check(
        "and sees the sandbox's filesystem",
        s.files.read("/home/user/from_kernel.txt") == "k",
    )
    r = s.run_code(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "rc = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n(rc, ctypes.get_errno())"
    )
    check("mount is refused inside the kernel", r.text == "(-1, 1)", r)
    r = s.run_code("open('/usr/evil', 'w')")
    check("the read-only system is not writable", r.error is not None, r)
    if _TIER == "gvisor":
        # gVisor's procfs shows every task's environ to all (0444, unlike Linux's 0400): the
        # agent's holds nothing but what runsc was given. Its memory and descriptors stay shut.
        r = s.run_code("sorted(k.split('=')[0] for k in open('/proc/1/environ').read().split('\\0') if k)")
        check("the agent's environment holds nothing secret", r.text == "['HOME', 'PATH']", r)
        r = s.run_code("open('/proc/1/mem', 'rb').read(1)")
        check("the agent's memory is closed", r.error is not None, r)
        # gVisor lists another task's descriptors and opens those that are not host-backed
        # sockets or pipes: every one a user process can open must be the sentry's /dev/null.
        r = s.run_code(
            "import os\nopened = set()\nfor n in os.listdir('/proc/1/fd'):\n"
            "    for m in (os.O_RDONLY, os.O_WRONLY):\n"
            "        try: os.close(os.open('/proc/1/fd/' + n, m | os.O_NONBLOCK))\n"
            "        except OSError: continue\n"
            "        opened.add(os.readlink('/proc/1/fd/' + n))\nsorted(opened)"
        )
        # /dev/net/tun reopened is a fresh, unattached TUN (attaching needs CAP_NET_ADMIN,
        # which only the agent had): what opening the device node gives anyone.
        opened = set(eval(r.text)) if r.text else None
        check("the agent's descriptors lend nothing",
              opened is not None and opened <= {"/dev/null", "/dev/net/tun"}, r)
        r = s.run_code(
            "import fcntl, os, struct\nfd = os.open('/proc/1/fd/' + next(n for n in os.listdir('/proc/1/fd') "
            "if os.readlink('/proc/1/fd/' + n) == '/dev/net/tun'), os.O_RDWR)\n"
            "fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'eth0', 0x1001))"
        )
        check("the agent's TUN cannot be taken over", r.error is not None
              and r.error.name in ("PermissionError", "OSError"), r.error)
    else:
        r = s.run_code("open('/proc/1/environ').read()")
        check("the agent's /proc entries are closed", r.error is not None, r)
    r = s.run_code(
        "import re\n[l.split()[1] for l in open('/proc/self/status') "
        "if re.match(r'(CapEff|NoNewPrivs|Seccomp):', l)]"
    )
    if _TIER == "gvisor":
        # gVisor's status has no NoNewPrivs line, and its sentry, not a seccomp filter in the
        # sandbox, serves every system call: what must hold is that no capability is left.
        r = s.run_code("[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))]")
        check("no capabilities", r.text == "['0000000000000000', '0000000000000000']", r)
    else:
        check("no capabilities, no_new_privs, seccomp on", r.text == "['0000000000000000', '1', '2']", r)
    r = s.run_code("import socket; socket.gethostname()")
    other = s.commands.run("hostname").stdout.strip()
    check("same hostname as the sandbox's shell", r.text == other, (r.text, other))
    # What the fork server had open must not follow its children into the sandbox.
    r = s.run_code(
        "import os\nfds = []\nfor n in os.listdir('/proc/self/fd'):\n"
        "    try: fds.append(os.readlink(f'/proc/self/fd/{n}'))\n"
        "    except FileNotFoundError: pass  # listdir's own descriptor, closed by now\n"
        "sorted(fds)",
        context=s.create_code_context(),  # fresh: nothing the user ran has opened files yet
    )
    fds = eval(r.text) if r.text else None
    allowed = ("pipe:", "socket:", "/dev/null", "anon_inode:", "/proc/")
    if _TIER == "gvisor":
        # No fork server there: the kernel did its own imports, and matplotlib keeps its fonts
        # open, read-only files of the interpreter environment as the sandbox sees it.
        prefix = s.run_code("import sys; sys.prefix").text.strip("'")
        allowed += (prefix + "/",)
    check(
        "no descriptor of the fork server or the host leaks in",
        fds is not None and all(t.startswith(allowed) for t in fds) and len(fds) < 16,
        fds,
    )
    port = urllib.parse.urlparse(os.environ["E2B_API_URL"]).port
    r = s.run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    check(
        "the server on the host's loopback is unreachable",
        r.error is not None and r.error.name in ("ConnectionRefusedError", "TimeoutError", "OSError"),
        r.error,
    )
    r = s.run_code("import os, signal\nos.kill(1, signal.SIGKILL)")
    check("the agent (pid 1) cannot be killed", r.error is not None and r.error.name == "PermissionError", r.error)
    r = s.run_code(
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "[libc.unshare(0x10000000), ctypes.get_errno(), libc.setns(0, 0), ctypes.get_errno()]"
    )
    if _TIER == "gvisor":
        # gVisor refuses a user namespace to an unprivileged caller with EINVAL.
        check("unshare and setns are refused", r.text in ("[-1, 1, -1, 1]", "[-1, 22, -1, 22]",
              "[-1, 22, -1, 1]"), r.text)
        print("SKIPPED Landlock's signal scope: gVisor implements no Landlock (its sentry is the boundary)")
    else:
        check("unshare and setns are refused", r.text == "[-1, 1, -1, 1]", r.text)
        landlock_signal_scope(s)
    r = s.run_code("import os\nos.setuid(0)")
    check("no way back to root", r.error is not None and r.error.name == "PermissionError", r.error)
    check("the sandbox is still running after all that", s.is_running())


def landlock_signal_scope(s):
    # Landlock, tried on its own: a process of the same uid in the same pid namespace, which
    # the sandbox's own shell may signal, is outside the kernel's Landlock domain (signal
    # scope), so the kernel may not.
    h = s.commands.run("sleep 300", background=True)
    same_domain = s.commands.run(f"kill -0 {h.pid} && echo allowed").stdout.strip()
    r = s.run_code(f"import os\nos.kill({h.pid}, 0)")
    check(
        "Landlock's signal scope holds for the kernel (the shell may signal the process)",
        same_domain == "allowed" and r.error is not None and r.error.name == "PermissionError",
        (same_domain, r.error),
    )
    h.kill()


def memory_hog(s):
    if _TIER == "gvisor":
        # gVisor has no OOM killer of its own: the host's, at the sandbox's cgroup limit,
        # ends the sentry and so the whole sandbox, and nothing else.
        r = s.run_code("hog = []\nwhile True: hog.append(b'x' * (64 << 20))")
        check("a cell beyond the memory limit fails", r.error is not None, r)
        try:
            r = s.run_code("1 + 1")
            ended = r.error is not None
        except Exception as e:  # the SDK's exception for a sandbox that has ended
            ended = "has ended" in str(e) or "not found" in str(e).lower()
        check("and ends the sandbox, said as such", ended)
        other = Sandbox.create()
        try:
            check("other sandboxes are unharmed", other.run_code("2 + 2").text == "4")
        finally:
            other.kill()
        return
    s.run_code("before = 1")
    r = s.run_code("hog = []\nwhile True: hog.append(b'x' * (64 << 20))")
    check(
        "a cell beyond the sandbox's memory limit kills only its kernel (cgroup OOM)",
        r.error is not None and r.error.name == "KernelDied",
        r.error,
    )
    r = s.run_code("1 + 1")
    check("the context works again afterwards", r.text == "2", r)
    check("the sandbox survived", s.is_running() and s.commands.run("echo alive").stdout == "alive\n")


def zygote_pids():
    """Host processes started from the fork server's script: the server itself and, since
    kernels are its forks, every kernel (the suite runs as root on the server's host)."""
    out = subprocess.run(["pgrep", "-f", "ringfence_zygote.py"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def fork_server_restarts():
    before = zygote_pids()
    s = Sandbox.create()
    try:
        s.run_code("1")
        for pid in zygote_pids():
            if pid in before:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        ctx = s.create_code_context()
        r = s.run_code("import numpy; int(numpy.arange(4).sum())", context=ctx)
        check("a killed fork server is restarted on next use", r.text == "6", r)
    finally:
        s.kill()


def main():
    t0 = time.monotonic()
    s = Sandbox.create()
    try:
        r = s.run_code("import pandas as pd; pd.__version__")
        check("first pandas cell in a new sandbox", r.text is not None and r.error is None, r)
        print(f"     create -> first pandas result: {(time.monotonic() - t0) * 1000:.0f} ms")
        values_and_state(s)
        streaming(s)
        rich(s)
        errors(s)
        contexts(s)
        other_languages(s)
        cancellation(s)
        inside_the_sandbox(s)
        memory_hog(s)
    finally:
        s.kill()
    if _TIER == "gvisor":
        print("SKIPPED fork server checks: the gvisor tier's kernels are started by the agent")
        print(f"code interpreter conformance ({_TIER}): {checks.passed} checks passed")
        return
    fork_server_restarts()
    deadline = time.monotonic() + 5
    while len(zygote_pids()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    check("no kernel outlives its sandbox", len(zygote_pids()) == 1, zygote_pids())
    print(f"code interpreter conformance: {checks.passed} checks passed")


if __name__ == "__main__":
    main()
