"""Drives the unmodified `e2b-code-interpreter` Python SDK (latest from PyPI) against
`ringfence serve`: values, streaming, rich results, errors, contexts, JavaScript, bash,
cancellation, and that the kernel really runs inside the sandbox with the sandbox's limits.

Run by scripts/conformance.sh with E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY set. Each check
prints one line; any failure raises.
"""

import base64
import datetime
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


def chart_of(s, code):
    """The chart of the one figure `code` shows."""
    r = s.run_code(code)
    charts = [x.chart for x in r.results if x.chart is not None]
    check(f"the figure comes back with a PNG and a chart: {code.splitlines()[-1]!r}",
          r.error is None and len(charts) == 1 and any(x.png for x in r.results), r)
    return charts[0]


def charts(s):
    from e2b_code_interpreter.charts import (
        BarChart, BoxAndWhiskerChart, ChartType, LineChart, PieChart, ScaleType, ScatterChart,
        SuperChart,
    )

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.plot([1, 2, 3], [2, 4, 3], label='sales')\nplt.title('Trend')\n"
                 "plt.xlabel('time (s)')\nplt.ylabel('value')\nplt.legend()\nplt.show()")
    check("line chart: type, title, labels, unit, scales",
          isinstance(c, LineChart) and c.type == ChartType.LINE and c.title == "Trend"
          and c.x_label == "time (s)" and c.x_unit == "s" and c.y_label == "value"
          and c.x_scale == ScaleType.LINEAR and c.y_scale == ScaleType.LINEAR, c.to_dict())
    check("line chart: elements with their points",
          [(e.label, e.points) for e in c.elements] == [("sales", [(1, 2), (2, 4), (3, 3)])],
          c.to_dict())
    check("line chart: ticks with labels",
          len(c.x_ticks) == len(c.x_tick_labels) > 1 and 1 in c.x_ticks, c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.scatter([1, 10, 100], [3, 2, 1], label='pts')\nplt.xscale('log')\nplt.show()")
    check("scatter chart with a log scale",
          isinstance(c, ScatterChart) and c.x_scale == ScaleType.LOG
          and c.elements[0].label == "pts" and c.elements[0].points == [(1, 3), (10, 2), (100, 1)],
          c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt, datetime as dt\nplt.figure()\n"
                 "plt.plot([dt.datetime(2024, 1, 1), dt.datetime(2024, 1, 3)], [5, 6])\nplt.show()")
    check("datetime scale: x values as ISO dates",
          isinstance(c, LineChart) and c.x_scale == ScaleType.DATETIME
          and [p[0][:10] for p in c.elements[0].points] == ["2024-01-01", "2024-01-03"]
          and all(isinstance(t, str) for t in c.x_ticks), c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.plot(['mon', 'tue', 'wed'], [1, 5, 2])\nplt.show()")
    check("categorical scale: x values are the categories",
          c.x_scale == ScaleType.CATEGORICAL
          and c.elements[0].points == [("mon", 1), ("tue", 5), ("wed", 2)], c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.bar(['a', 'b'], [3, 7], label='2024')\nplt.bar(['a', 'b'], [1, 2], label='2025')\n"
                 "plt.title('Bars')\nplt.show()")
    check("bar chart: label, group and value of every bar",
          isinstance(c, BarChart) and c.title == "Bars"
          and [(e.label, e.group, e.value) for e in c.elements]
          == [("a", "2024", 3), ("b", "2024", 7), ("a", "2025", 1), ("b", "2025", 2)], c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.pie([1, 3], labels=['cats', 'dogs'])\nplt.show()")
    check("pie chart: label, angle and radius of every wedge",
          isinstance(c, PieChart)
          and [(e.label, round(e.angle), e.radius) for e in c.elements]
          == [("cats", 90, 1), ("dogs", 270, 1)], c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.boxplot([[1, 2, 3, 4, 5, 50], [2, 3, 4]], tick_labels=['A', 'B'])\nplt.show()")
    a = c.elements[0] if c.elements else None
    check("box-and-whisker chart: quartiles, whiskers and outliers",
          isinstance(c, BoxAndWhiskerChart) and [e.label for e in c.elements] == ["A", "B"]
          and (a.min, a.first_quartile, a.median, a.third_quartile, a.max, a.outliers)
          == (1, 2.25, 3.5, 4.75, 5, [50]), c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nfig, (l, r) = plt.subplots(1, 2)\n"
                 "l.plot([1, 2])\nr.pie([1, 1])\nfig.suptitle('Both')\nplt.show()")
    check("several axes make a superchart of their charts",
          isinstance(c, SuperChart) and c.title == "Both"
          and [type(e) for e in c.elements] == [LineChart, PieChart], c.to_dict())

    c = chart_of(s, "import matplotlib.pyplot as plt\nplt.figure()\n"
                 "plt.imshow([[1, 2], [3, 4]])\nplt.show()")
    check("a figure of another kind is an unknown chart",
          c.type == ChartType.UNKNOWN and c.elements == [], c.to_dict())

    r = s.run_code("import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2])\n"
                   "plt.savefig('/tmp/fig.png')")
    check("a saved figure that is still open is shown too",
          len(r.results) == 1 and r.results[0].png and r.results[0].chart is not None, r)
    check("and the file was written", s.files.read("/tmp/fig.png", format="bytes")[:4] == b"\x89PNG")


def data_and_images(s):
    r = s.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', None], "
                   "'t': pd.to_datetime(['2020-01-01', '2021-06-30'])})")
    check("a DataFrame's data: columns and values, timestamps in ISO 8601",
          r.results and r.results[0].data == {
              "a": [1, 2], "b": ["x", None], "t": ["2020-01-01T00:00:00", "2021-06-30T00:00:00"]},
          r.results and r.results[0].data)
    r = s.run_code("from PIL import Image\nImage.new('RGB', (8, 4), 'red').show()")
    png = r.results[0].png if r.results else None
    check("PIL Image.show() gives a PNG result",
          png is not None and base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
          and not r.results[0].is_main_result, r)
    r = s.run_code("from PIL import Image\nImage.new('RGB', (8, 4), 'red')")
    png = r.results[0].png if r.results else None
    check("a PIL image as the last expression is a PNG main result",
          png is not None and base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
          and r.results[0].is_main_result, r)


def typescript(s):
    r = s.run_code("const n: number = 20\ninterface P { x: number }\n"
                   "const p: P = { x: 1 }\nconsole.log(`x is ${p.x}`)", language="ts")
    check("typescript: a cell with types runs and streams stdout",
          r.error is None and "".join(r.logs.stdout) == "x is 1\n", r)
    r = s.run_code("n * 2 + 2", language="typescript")
    check("typescript: state between cells; the last expression is the result", r.text == "42", r)
    r = s.run_code("type T = string\n\nfunction f(x: T): never {\n  throw new RangeError('boom ' + x)\n}\n"
                   "f('y')", language="typescript")
    e = r.error
    check("typescript: a thrown error with name, value, and a traceback at the TypeScript lines",
          e is not None and e.name == "RangeError" and e.value == "boom y"
          and "<cell-" in e.traceback and ":4" in e.traceback and ":6" in e.traceback, e)
    r = s.run_code("let x: = 1", language="typescript")
    check("typescript: a syntax error points into the cell",
          r.error is not None and r.error.name == "SyntaxError" and "let x: = 1" in r.error.traceback,
          r.error)
    r = s.run_code("process.env.TS_VAR as string", language="typescript", envs={"TS_VAR": "t1"})
    check("typescript: per-cell env vars", r.text == "t1", r)
    ctx = s.create_code_context(language="typescript")
    check("a typescript context", ctx.language == "typescript", ctx)
    r = s.run_code("typeof n", context=ctx)
    check("with its own state", r.text == "undefined", r)
    start = time.monotonic()
    try:
        s.run_code("await new Promise(() => {})", context=ctx, timeout=2)
        check("a timed-out typescript cell raises", False, "no exception")
    except TimeoutException:
        check("a timed-out typescript cell raises TimeoutException", time.monotonic() - start < 10)
    time.sleep(0.5)
    r = s.run_code("const k: string = 'still here'; k", context=ctx)
    check("typescript: the context works after an interrupt", r.text == "still here", r)


def driver_languages(s):
    """java (JShell) and r: state, streaming, errors, env vars and interrupts, each checked
    inside the sandbox (seccomp and Landlock apply to the JVM and to R as to any kernel)."""
    for lang, program, c in (
        ("java", "java", {
            "define": "int x = 41;", "value_cell": 'System.out.println("out");\nx + 1',
            "value": "42", "throw": 'int[] a = new int[1];\na[3] = 1;',
            "name": "java.lang.ArrayIndexOutOfBoundsException",
            "getenv": 'String.valueOf(System.getenv("CELL_VAR"))', "env_set": "v1", "env_unset": "null",
            "loop": "while (true) { x = x; }", "use": "x", "use_value": "41",
        }),
        ("r", "R", {
            "define": "x <- 41", "value_cell": 'cat("out\\n")\nx + 1', "value": "[1] 42",
            "throw": 'f <- function() stop("bad")\nf()', "name": "simpleError",
            "getenv": 'Sys.getenv("CELL_VAR", "unset")', "env_set": '[1] "v1"',
            "env_unset": '[1] "unset"', "loop": "repeat { x <- x }", "use": "x", "use_value": "[1] 41",
        }),
    ):
        if subprocess.run(["sh", "-c", f"command -v {program}"], capture_output=True).returncode:
            print(f"SKIPPED {lang}: no {program} on this host (scripts/setup.sh installs it)")
            continue
        if _TIER == "gvisor":
            try:
                s.create_code_context(language=lang)
                check(f"{lang}: refused on gvisor, naming the tier", False, "created")
            except Exception as e:
                check(f"{lang}: refused on gvisor, naming the tier", "tier" in str(e), repr(e))
            continue
        ctx = s.create_code_context(language=lang)
        check(f"{lang}: a context", ctx.language == lang, ctx)
        s.run_code(c["define"], context=ctx)
        r = s.run_code(c["value_cell"], context=ctx)
        check(f"{lang}: state between cells, stdout, the last value as the result",
              "".join(r.logs.stdout) == "out\n" and r.text == c["value"], r)
        r = s.run_code(c["throw"], context=ctx)
        check(f"{lang}: errors carry name, value and traceback",
              r.error is not None and r.error.name == c["name"] and r.error.traceback, r.error)
        r = s.run_code(c["getenv"], context=ctx, envs={"CELL_VAR": "v1"})
        check(f"{lang}: per-cell env vars apply", r.text == c["env_set"], r)
        r = s.run_code(c["getenv"], context=ctx)
        check(f"{lang}: and are gone after the cell", r.text == c["env_unset"], r)
        start = time.monotonic()
        try:
            s.run_code(c["loop"], context=ctx, timeout=3)
            check(f"{lang}: a timed-out cell raises", False, "no exception")
        except TimeoutException:
            check(f"{lang}: a timed-out cell raises TimeoutException", time.monotonic() - start < 10)
        time.sleep(1)
        r = s.run_code(c["use"], context=ctx)
        check(f"{lang}: interrupted, the context keeps its state", r.text == c["use_value"], r)
        r = s.run_code(c["getenv"].replace("CELL_VAR", "HOME"), context=ctx)
        check(f"{lang}: runs inside the sandbox as its user", "/home/user" in (r.text or ""), r)


def default_and_root_contexts(s):
    langs = {c.language for c in s.list_code_contexts() if c.id.startswith("default")}
    check("a used sandbox still lists its default python and javascript contexts",
          {"javascript", "python"} <= langs, [c.__dict__ for c in s.list_code_contexts()])
    ctx = s.create_code_context(cwd="/root", language="python")
    check("a context in /root is created there", ctx.cwd == "/root", ctx)
    r = s.run_code("import os\nopen('made_here', 'w').write('r')\n(os.getcwd(), os.getuid())",
                   context=ctx)
    check("it runs in /root as the sandbox's root, and may write there",
          r.text == "('/root', 0)", r)
    r = s.run_code("import re\n[l.split()[1] for l in open('/proc/self/status') "
                   "if re.match(r'(CapEff|CapBnd|NoNewPrivs|Seccomp):', l)]", context=ctx)
    # gVisor's status has no NoNewPrivs line and its sentry, not a seccomp filter, serves
    # every call (see inside_the_sandbox): there, no capability is what must hold.
    want = ("['0000000000000000', '0000000000000000', '0']" if _TIER == "gvisor"
            else "['0000000000000000', '0000000000000000', '1', '2']")
    check("the root kernel holds no capabilities (none in its bounding set), no_new_privs, seccomp",
          r.text == want, r)
    r = s.run_code("import subprocess\nsubprocess.run(['grep', '^CapEff', '/proc/self/status'], "
                   "capture_output=True, text=True).stdout.split()[1]", context=ctx)
    check("and neither does a program it executes as root", r.text == "0000000000000000", r)
    r = s.run_code("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                   "(libc.mount(b'none', b'/mnt', b'tmpfs', 0, None), ctypes.get_errno())",
                   context=ctx)
    check("root's kernel cannot mount", r.text == "(-1, 1)", r)
    if _TIER == "gvisor":
        r = s.run_code("open('/proc/1/mem', 'rb').read(1)", context=ctx)
        check("root's kernel cannot read the agent's memory", r.error is not None, r)
    else:
        r = s.run_code("open('/proc/1/environ').read()", context=ctx)
        check("root's kernel cannot read the agent's /proc entries", r.error is not None, r)
    if _TIER == "gvisor":
        # gVisor lets the container's uid 0 signal its init: root can end its own sandbox
        # (nothing beyond it; docs/SECURITY.md), which would end this suite's sandbox too.
        print("SKIPPED root's kernel killing the agent: on gvisor that ends the sandbox itself")
    else:
        r = s.run_code("import os, signal\nos.kill(1, signal.SIGKILL)", context=ctx)
        check("root's kernel cannot kill the agent", s.is_running() and s.run_code("1").text == "1", r)
    r = s.run_code("open('/usr/evil', 'w')", context=ctx)
    check("root's kernel cannot write the read-only system", r.error is not None, r)
    check("the file it made is root's", s.commands.run("stat -c %u /root/made_here", user="root")
          .stdout.strip() == "0")


def fresh_sandbox():
    from e2b.sandbox.sandbox_api import SandboxQuery

    s = Sandbox.create()
    try:
        listed = s.list_code_contexts()
        check("a fresh sandbox lists E2B's default contexts, python and javascript",
              sorted(c.language for c in listed) == ["javascript", "python"]
              and all(c.cwd == "/home/user" for c in listed), [c.__dict__ for c in listed])
        started = s.get_info().started_at
        found = [x.sandbox_id for x in Sandbox.list(query=SandboxQuery(started_after=started))
                 .next_items()]
        check("list(started_after=<a sandbox's own started_at>) includes it",
              s.sandbox_id in found, (started, found))
        later = started + datetime.timedelta(milliseconds=1)
        found = [x.sandbox_id for x in Sandbox.list(query=SandboxQuery(started_after=later))
                 .next_items()]
        check("and a millisecond later excludes it", s.sandbox_id not in found, (later, found))
    finally:
        s.kill()


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
    for lang in ("python", "javascript"):
        try:
            s.create_code_context(cwd="/no/such/dir", language=lang)
            check(f"{lang}: a context in a missing cwd is refused", False, "created")
        except Exception as e:  # noqa: BLE001 - the SDK raises its generic SandboxException
            check(f"{lang}: a context in a missing cwd is refused with 400 naming it",
                  "400" in str(e) and "/no/such/dir" in str(e), e)
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
        charts(s)
        data_and_images(s)
        errors(s)
        contexts(s)
        other_languages(s)
        typescript(s)
        default_and_root_contexts(s)
        driver_languages(s)
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
    fresh_sandbox()
    deadline = time.monotonic() + 5
    while len(zygote_pids()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    check("no kernel outlives its sandbox", len(zygote_pids()) == 1, zygote_pids())
    print(f"code interpreter conformance: {checks.passed} checks passed")


if __name__ == "__main__":
    main()
