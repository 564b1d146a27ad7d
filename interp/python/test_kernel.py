"""Tests of ringfence_kernel.py against the exact messages of interp/PROTOCOL.md.

Each test starts real kernels with the interpreter environment's python (built by
scripts/interp-env.sh):

    /opt/ringfence/python/bin/python3 -m unittest interp/python/test_kernel.py -v
"""

import base64
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = os.path.join(HERE, "ringfence_kernel.py")
ENV_DIR = os.environ.get("RINGFENCE_INTERP_ENV", "/opt/ringfence/python")
PYTHON = os.path.join(ENV_DIR, "bin", "python3")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Kernel:
    """A kernel process and the messages it sends, read by a thread and checked line by line."""

    def __init__(self, test, lang="python", argv=None, pass_fds=(), send=None, recv=None):
        self.test = test
        if argv is None:
            argv = [PYTHON, KERNEL, "--lang", lang]
        stdio = subprocess.PIPE if send is None else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdin=stdio, stdout=stdio, pass_fds=pass_fds, cwd=HERE)
        self._send = send or self._send_stdin
        recv = recv or (lambda: self.proc.stdout.read1(1 << 16))
        self.lines = queue.Queue()
        self.malformed = []
        threading.Thread(target=self._read, args=(recv,), daemon=True).start()
        self.seq = 0
        test.addCleanup(self.close)
        ready = self.recv(30)
        test.assertEqual(ready, {"type": "ready", "language": lang, "pid": self.proc.pid})

    def _send_stdin(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _read(self, recv):
        buf = b""
        while True:
            data = recv()
            if not data:
                if buf:
                    self.malformed.append(buf)  # a last line without its newline
                self.lines.put(None)
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line.decode("utf-8"))
                except ValueError:
                    self.malformed.append(line)
                    continue
                if not isinstance(msg, dict):
                    self.malformed.append(line)
                    continue
                self.lines.put(msg)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self.test.assertEqual(self.malformed, [])

    def send(self, obj):
        self._send(json.dumps(obj).encode() + b"\n")

    def recv(self, timeout=30):
        """The next message, or None at EOF."""
        return self.lines.get(timeout=timeout)

    def start(self, code, env_vars=None):
        self.seq += 1
        exec_id = f"x{self.seq}"
        self.send({"op": "execute", "id": exec_id, "code": code, "env_vars": env_vars})
        return exec_id

    def finish(self, exec_id, timeout=30):
        """Messages of `exec_id` up to its end_of_execution, checked for order and shape."""
        msgs = []
        while True:
            msg = self.recv(timeout)
            self.test.assertIsNotNone(msg, f"EOF before the end of {exec_id}: {msgs}")
            self.test.assertEqual(msg.pop("id"), exec_id)
            msgs.append(msg)
            if msg["type"] == "end_of_execution":
                break
        self.test.assertEqual(msgs[0]["type"], "number_of_executions")
        self.test.assertEqual(msgs[-1], {"type": "end_of_execution"})
        for m in msgs:
            if m["type"] in ("stdout", "stderr"):
                self.test.assertIsInstance(m["text"], str)
                self.test.assertRegex(m["timestamp"], TIMESTAMP)
            if m["type"] == "error":
                self.test.assertEqual(set(m), {"type", "name", "value", "traceback"})
                for field in ("name", "value", "traceback"):
                    self.test.assertIsInstance(m[field], str)
        return msgs

    def run(self, code, env_vars=None, timeout=30):
        return self.finish(self.start(code, env_vars), timeout)


def stream(msgs, name="stdout"):
    return "".join(m["text"] for m in msgs if m["type"] == name)


def of_type(msgs, kind):
    return [m for m in msgs if m["type"] == kind]


class PythonKernelTest(unittest.TestCase):
    def setUp(self):
        self.k = Kernel(self)

    def test_value_and_print(self):
        msgs = self.k.run("x = 1; x += 1; print('hello'); x")
        self.assertEqual(
            [(m["type"], m.get("text")) for m in msgs[1:]],
            [("stdout", "hello\n"), ("result", "2"), ("end_of_execution", None)],
        )
        self.assertEqual(msgs[0], {"type": "number_of_executions", "execution_count": 1})
        self.assertIs(of_type(msgs, "result")[0]["is_main_result"], True)

    def test_string_result_loses_one_level_of_quotes(self):
        self.assertEqual(of_type(self.k.run("'abc'"), "result")[0]["text"], "abc")
        self.assertEqual(of_type(self.k.run("'\"q\"'"), "result")[0]["text"], '"q"')

    def test_no_result_after_semicolon_or_statement(self):
        self.assertEqual(of_type(self.k.run("1;"), "result"), [])
        self.assertEqual(of_type(self.k.run("y = 3"), "result"), [])

    def test_execution_count_increments_through_errors(self):
        counts = [self.k.run(code)[0]["execution_count"] for code in ("1", "1/0", "", "2")]
        self.assertEqual(counts, [1, 2, 3, 4])

    def test_stdout_streams_while_the_cell_runs(self):
        sent = time.monotonic()
        exec_id = self.k.start("import time\nprint('first')\ntime.sleep(1)\nprint('second')")
        self.assertEqual(self.k.recv()["type"], "number_of_executions")
        first = self.k.recv()
        arrived = time.monotonic() - sent
        self.assertEqual((first["type"], first["text"]), ("stdout", "first\n"))
        self.assertLess(arrived, 0.8)
        rest = []
        while True:
            msg = self.k.recv()
            rest.append(msg)
            if msg["type"] == "end_of_execution":
                break
        self.assertGreaterEqual(time.monotonic() - sent, 1.0)
        self.assertEqual(msg["id"], exec_id)
        self.assertEqual(stream(rest), "second\n")

    def test_fd_level_output_is_captured_in_order(self):
        msgs = self.k.run(
            "import os, subprocess\n"
            "print('p1')\n"
            "os.write(1, b'fd\\n')\n"
            "subprocess.run(['echo', 'sub'])\n"
            "print('p2')\n"
            "os.write(2, b'err\\n')\n"
        )
        self.assertEqual(stream(msgs), "p1\nfd\nsub\np2\n")
        self.assertEqual(stream(msgs, "stderr"), "err\n")

    def test_non_utf8_bytes_are_replaced(self):
        msgs = self.k.run(
            "import os, sys\nos.write(1, b'\\xff\\xfeok\\n')\nsys.stdout.buffer.write(b'b\\x80\\n')"
        )
        self.assertEqual(stream(msgs), "\ufffd\ufffdok\nb\ufffd\n")

    def test_lone_surrogate_does_not_break_the_line(self):
        self.assertEqual(stream(self.k.run("print('a\\udcff')")), "a?\n")

    def test_huge_output_is_split_into_bounded_messages(self):
        msgs = self.k.run("print('x' * 5_000_000)")
        out = of_type(msgs, "stdout")
        self.assertEqual(stream(msgs), "x" * 5_000_000 + "\n")
        self.assertTrue(all(len(m["text"]) <= 1 << 16 for m in out))

    def test_many_prints_are_coalesced(self):
        msgs = self.k.run("for i in range(100000):\n    print(i)")
        self.assertEqual(stream(msgs), "".join(f"{i}\n" for i in range(100000)))
        self.assertLess(len(of_type(msgs, "stdout")), 1000)

    def test_matplotlib_figure_is_a_png(self):
        msgs = self.k.run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
        (fig,) = of_type(msgs, "result")
        self.assertIs(fig["is_main_result"], False)
        self.assertTrue(base64.b64decode(fig["png"]).startswith(PNG_MAGIC))
        self.assertIn("Figure", fig["text"])

    def test_figure_left_open_is_shown_at_the_end_of_the_cell(self):
        msgs = self.k.run("import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [1, 2]);")
        (fig,) = of_type(msgs, "result")
        self.assertTrue(base64.b64decode(fig["png"]).startswith(PNG_MAGIC))

    def chart(self, code):
        msgs = self.k.run("import matplotlib.pyplot as plt\nplt.figure()\n" + code + "\nplt.show()")
        (fig,) = of_type(msgs, "result")
        self.assertTrue(base64.b64decode(fig["png"]).startswith(PNG_MAGIC))
        return fig["chart"]

    def test_line_chart(self):
        c = self.chart("plt.plot([1, 2], [3, 5], label='l')\nplt.title('t')\nplt.ylabel('m [kg]')")
        self.assertEqual((c["type"], c["title"], c["y_label"], c["y_unit"]), ("line", "t", "m [kg]", "kg"))
        self.assertEqual(c["elements"], [{"label": "l", "points": [[1, 3], [2, 5]]}])
        self.assertEqual((c["x_scale"], c["y_scale"]), ("linear", "linear"))
        self.assertEqual(len(c["x_ticks"]), len(c["x_tick_labels"]))

    def test_scales(self):
        c = self.chart("plt.scatter(['a', 'b'], [1, 100])\nplt.yscale('log')")
        self.assertEqual((c["type"], c["x_scale"], c["y_scale"]), ("scatter", "categorical", "log"))
        self.assertEqual(c["elements"][0]["points"], [["a", 1], ["b", 100]])
        c = self.chart("import datetime as d\nplt.plot([d.date(2024, 5, 1), d.date(2024, 5, 2)], [1, 2])")
        self.assertEqual(c["x_scale"], "datetime")
        self.assertTrue(c["elements"][0]["points"][0][0].startswith("2024-05-01T00:00:00"))

    def test_bar_pie_box_super_unknown(self):
        c = self.chart("plt.barh(['x', 'y'], [4, 6], label='g')")
        self.assertEqual(c["elements"], [
            {"label": "x", "group": "g", "value": 4}, {"label": "y", "group": "g", "value": 6}])
        c = self.chart("plt.pie([1, 1, 2], labels=['a', 'b', 'c'])")
        self.assertEqual([(e["label"], e["angle"]) for e in c["elements"]],
                         [("a", 90.0), ("b", 90.0), ("c", 180.0)])
        c = self.chart("plt.boxplot([1, 2, 3, 4, 5])")
        self.assertEqual(c["type"], "box_and_whisker")
        self.assertEqual({k: c["elements"][0][k] for k in ("min", "median", "max", "outliers")},
                         {"min": 1, "median": 3, "max": 5, "outliers": []})
        c = self.chart("plt.subplot(121).plot([1])\nplt.subplot(122).bar(['a'], [1])")
        self.assertEqual([e["type"] for e in c["elements"]], ["line", "bar"])
        self.assertEqual(c["type"], "superchart")
        self.assertEqual(self.chart("plt.imshow([[1]])"), {"type": "unknown", "title": None, "elements": []})

    def test_a_figure_the_extractor_cannot_read_still_gives_its_png(self):
        msgs = self.k.run("import matplotlib.pyplot as plt\nplt.plot([1])\n"
                          "plt.gca().get_lines()[0].get_xydata = None\nplt.show()")
        (fig,) = of_type(msgs, "result")
        self.assertTrue(base64.b64decode(fig["png"]).startswith(PNG_MAGIC))
        self.assertNotIn("chart", fig)
        self.assertEqual(of_type(msgs, "error"), [])

    def test_dataframe_data_and_pil_images(self):
        (r,) = of_type(self.k.run("import pandas as pd\npd.DataFrame({1: [1.5, float('nan')]})"), "result")
        self.assertEqual(r["data"], {"1": [1.5, None]})
        (r,) = of_type(self.k.run("from PIL import Image\nImage.new('L', (2, 2)).show()"), "result")
        self.assertTrue(base64.b64decode(r["png"]).startswith(PNG_MAGIC))
        self.assertIs(r["is_main_result"], False)
        (r,) = of_type(self.k.run("from PIL import Image\nImage.new('L', (2, 2))"), "result")
        self.assertTrue(base64.b64decode(r["png"]).startswith(PNG_MAGIC))
        self.assertIs(r["is_main_result"], True)

    def test_saved_figure_still_open_is_shown(self):
        msgs = self.k.run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.savefig('/dev/null', format='png')")
        (fig,) = of_type(msgs, "result")
        self.assertEqual(fig["chart"]["type"], "line")

    def test_dataframe_gives_html_and_text(self):
        msgs = self.k.run("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
        (res,) = of_type(msgs, "result")
        self.assertIs(res["is_main_result"], True)
        self.assertIn("<table", res["html"])
        self.assertEqual(res["text"].split(), ["a", "b", "0", "1", "x", "1", "2", "y"])

    def test_display_is_not_the_main_result(self):
        msgs = self.k.run(
            "from IPython.display import display, HTML\n"
            "print('before')\n"
            "display(HTML('<b>hi</b>'))\n"
            "print('after')\n"
            "7"
        )
        kinds = [(m["type"], m.get("is_main_result")) for m in msgs[1:-1]]
        self.assertEqual(
            kinds, [("stdout", None), ("result", False), ("stdout", None), ("result", True)]
        )
        self.assertEqual(msgs[2]["html"], "<b>hi</b>")
        self.assertEqual(msgs[4]["text"], "7")

    def test_rich_reprs(self):
        msgs = self.k.run(
            "class R:\n"
            "    def _repr_markdown_(self): return '**m**'\n"
            "    def _repr_latex_(self): return '$x$'\n"
            "    def _repr_json_(self): return {'k': [1, 2]}\n"
            "    def _repr_svg_(self): return '<svg></svg>'\n"
            "    def _repr_javascript_(self): return 'console.log(1)'\n"
            "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
            "        return {'application/x-custom': 'c'}\n"
            "R()"
        )
        (res,) = of_type(msgs, "result")
        self.assertEqual(res["markdown"], "**m**")
        self.assertEqual(res["latex"], "$x$")
        self.assertEqual(res["json"], {"k": [1, 2]})
        self.assertEqual(res["svg"], "<svg></svg>")
        self.assertEqual(res["javascript"], "console.log(1)")
        self.assertEqual(res["extra"], {"application/x-custom": "c"})

    def test_png_repr_is_base64(self):
        msgs = self.k.run(
            "class P:\n    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\nrest'\nP()"
        )
        (res,) = of_type(msgs, "result")
        self.assertEqual(base64.b64decode(res["png"]), PNG_MAGIC + b"rest")

    def test_error(self):
        msgs = self.k.run("1/0")
        (err,) = of_type(msgs, "error")
        self.assertEqual((err["name"], err["value"]), ("ZeroDivisionError", "division by zero"))
        self.assertIn("----> 1 1/0", err["traceback"])
        self.assertNotIn("\x1b[", err["traceback"])

    def test_syntax_error(self):
        (err,) = of_type(self.k.run("def f(:"), "error")
        self.assertEqual(err["name"], "SyntaxError")

    def test_output_before_an_error_comes_first(self):
        msgs = self.k.run("print('one')\nraise ValueError('bad')")
        self.assertEqual([m["type"] for m in msgs[1:]], ["stdout", "error", "end_of_execution"])
        self.assertEqual(msgs[2]["value"], "bad")

    def test_state_persists(self):
        self.k.run("def f(n): return n * 2\ndata = [1, 2]")
        self.assertEqual(of_type(self.k.run("f(len(data))"), "result")[0]["text"], "4")

    def test_shell_escape_and_magics(self):
        msgs = self.k.run(
            "!echo hi; echo oops >&2\n%env RF_MAGIC=1\nimport os; os.environ['RF_MAGIC']"
        )
        self.assertEqual(stream(msgs), "hi\nenv: RF_MAGIC=1\n")
        self.assertEqual(stream(msgs, "stderr"), "oops\n")
        self.assertEqual(of_type(msgs, "result")[0]["text"], "1")

    def test_top_level_await(self):
        msgs = self.k.run("import asyncio\nawait asyncio.sleep(0.01)\n'done'")
        self.assertEqual(of_type(msgs, "result")[0]["text"], "done")

    def test_interrupt_keeps_state(self):
        self.k.run("kept = 41")
        exec_id = self.k.start("import time\nprint('sleeping')\ntime.sleep(30)")
        self.assertEqual(self.k.recv()["type"], "number_of_executions")
        self.assertEqual(self.k.recv()["text"], "sleeping\n")
        sent = time.monotonic()
        self.k.send({"op": "interrupt", "id": exec_id})
        msgs = [self.k.recv(5), self.k.recv(5)]
        self.assertLess(time.monotonic() - sent, 3)
        self.assertEqual(msgs[0]["type"], "error")
        self.assertEqual(msgs[0]["name"], "KeyboardInterrupt")
        self.assertEqual(msgs[1], {"type": "end_of_execution", "id": exec_id})
        self.assertEqual(of_type(self.k.run("kept + 1"), "result")[0]["text"], "42")

    def test_interrupt_a_print_loop(self):
        exec_id = self.k.start("while True:\n    print('x' * 100)")
        self.assertEqual(self.k.recv()["type"], "number_of_executions")
        self.assertEqual(self.k.recv()["type"], "stdout")
        self.k.send({"op": "interrupt", "id": exec_id})
        msgs = []
        while not msgs or msgs[-1]["type"] != "end_of_execution":
            msgs.append(self.k.recv(5))
        self.assertEqual([m["type"] for m in msgs[-2:]], ["error", "end_of_execution"])
        self.assertEqual(msgs[-2]["name"], "KeyboardInterrupt")
        self.assertEqual(set(stream(msgs)), {"x", "\n"})

    def test_output_between_executions_is_dropped(self):
        self.k.run(
            "import threading, time\n"
            "def chatter():\n"
            "    for _ in range(30):\n"
            "        print('bg'); time.sleep(0.01)\n"
            "threading.Thread(target=chatter).start()"
        )
        time.sleep(0.5)
        self.assertTrue(self.k.lines.empty())
        self.assertEqual(stream(self.k.run("print('own')")), "own\n")

    def test_interrupt_a_shell_command(self):
        exec_id = self.k.start("!sleep 30")
        self.assertEqual(self.k.recv()["type"], "number_of_executions")
        time.sleep(0.5)
        self.k.send({"op": "interrupt", "id": exec_id})
        msgs = []
        while not msgs or msgs[-1]["type"] != "end_of_execution":
            msgs.append(self.k.recv(5))
        self.assertEqual(of_type(msgs, "error")[0]["name"], "KeyboardInterrupt")
        self.assertEqual(self.k.run("1")[0]["execution_count"], 2)

    def test_interrupt_sent_right_after_execute(self):
        exec_id = self.k.start("import time\ntime.sleep(30)")
        self.k.send({"op": "interrupt", "id": exec_id})
        msgs = self.k.finish(exec_id, timeout=5)
        self.assertEqual(of_type(msgs, "error")[0]["name"], "KeyboardInterrupt")

    def test_interrupt_of_another_execution_is_ignored(self):
        exec_id = self.k.start("import time\ntime.sleep(0.5)\n'slept'")
        self.k.send({"op": "interrupt", "id": "not-" + exec_id})
        msgs = self.k.finish(exec_id)
        self.assertEqual(of_type(msgs, "error"), [])
        self.assertEqual(of_type(msgs, "result")[0]["text"], "slept")

    def test_env_vars_apply_to_one_cell(self):
        self.k.run("import os\nos.environ['RF_B'] = 'orig'")
        code = "print(os.environ.get('RF_A'), os.environ['RF_B'])\n!echo $RF_A"
        msgs = self.k.run(code, env_vars={"RF_A": "1", "RF_B": "tmp"})
        self.assertEqual(stream(msgs), "1 tmp\n1\n")
        self.assertEqual(stream(self.k.run(code)), "None orig\n\n")

    def test_set_env_replaces_the_environment(self):
        self.k.send({"op": "set_env", "env": {"RF_C": "c", "PATH": os.environ["PATH"]}})
        msgs = self.k.run(
            "import os\nprint(os.environ.get('RF_C'), 'HOME' in os.environ)\n!echo $RF_C"
        )
        self.assertEqual(stream(msgs), "c False\nc\n")

    def test_system_exit_is_an_error(self):
        (err,) = of_type(self.k.run("import sys\nsys.exit(3)"), "error")
        self.assertEqual((err["name"], err["value"]), ("SystemExit", "3"))
        self.assertEqual(of_type(self.k.run("'alive'"), "result")[0]["text"], "alive")

    def test_closed_fd1_is_restored(self):
        msgs = self.k.run("import os\nos.close(1)\nprint('python-level')")
        self.assertEqual(stream(msgs), "python-level\n")
        msgs = self.k.run("import subprocess\nsubprocess.run(['echo', 'fd-level'])")
        self.assertEqual(stream(msgs), "fd-level\n")

    def test_closed_sys_stdout_still_works(self):
        self.k.run("import sys\nsys.stdout.close()")
        self.assertEqual(stream(self.k.run("print('ok')")), "ok\n")

    def test_forked_child_output_is_captured(self):
        msgs = self.k.run(
            "import multiprocessing as mp\n"
            "p = mp.get_context('fork').Process(target=print, args=('from child',))\n"
            "p.start(); p.join()\n"
            "p.exitcode"
        )
        self.assertEqual(stream(msgs), "from child\n")
        self.assertEqual(of_type(msgs, "result")[0]["text"], "0")

    def test_input_reads_eof(self):
        (err,) = of_type(self.k.run("input()"), "error")
        self.assertEqual(err["name"], "EOFError")

    def test_os_exit_ends_with_eof(self):
        exec_id = self.k.start("import os\nprint('bye')\nos._exit(3)")
        msgs = [self.k.recv(), self.k.recv(), self.k.recv()]
        self.assertEqual([m and m["type"] for m in msgs], ["number_of_executions", "stdout", None])
        self.assertEqual(msgs[1]["id"], exec_id)
        self.assertEqual(self.k.proc.wait(5), 3)

    def test_request_eof_ends_the_kernel(self):
        exec_id = self.k.start("import time\ntime.sleep(30)")
        self.assertEqual(self.k.recv()["id"], exec_id)
        self.k.proc.stdin.close()
        self.assertEqual(self.k.proc.wait(5), 0)
        self.assertIsNone(self.k.recv())


class BashKernelTest(unittest.TestCase):
    def setUp(self):
        self.k = Kernel(self, "bash")

    def test_state_persists(self):
        msgs = self.k.run("x=5; cd /tmp; f() { echo \"f:$1\"; }; echo set")
        self.assertEqual(stream(msgs), "set\n")
        msgs = self.k.run("echo $x $PWD; f 1; echo err >&2")
        self.assertEqual(stream(msgs), "5 /tmp\nf:1\n")
        self.assertEqual(stream(msgs, "stderr"), "err\n")
        self.assertEqual(msgs[0]["execution_count"], 2)

    def test_nonzero_status_is_an_error(self):
        msgs = self.k.run("echo before; ls /nonexistent-rf")
        self.assertEqual(stream(msgs), "before\n")
        (err,) = of_type(msgs, "error")
        self.assertEqual((err["name"], err["value"]), ("ExitStatus", "2"))
        self.assertEqual(stream(self.k.run("echo $?")), "2\n")
        self.assertEqual(of_type(self.k.run("false; true"), "error"), [])

    def test_syntax_errors_do_not_hang(self):
        (err,) = of_type(self.k.run("echo 'unterminated"), "error")
        self.assertEqual(err["value"], "2")
        self.assertEqual(stream(self.k.run("echo fine")), "fine\n")

    def test_stdin_is_empty(self):
        self.assertEqual(stream(self.k.run("cat; echo end")), "end\n")

    def test_interrupt_keeps_state(self):
        self.k.run("kept=yes")
        for code in ("sleep 30; echo not-reached", "while true; do :; done"):
            exec_id = self.k.start(code)
            self.assertEqual(self.k.recv()["type"], "number_of_executions")
            time.sleep(0.5)
            self.k.send({"op": "interrupt", "id": exec_id})
            msgs = []
            while not msgs or msgs[-1]["type"] != "end_of_execution":
                msgs.append(self.k.recv(3))
            self.assertNotIn("not-reached", stream(msgs))
            self.assertEqual(of_type(msgs, "error")[0]["name"], "KeyboardInterrupt")
        self.assertEqual(stream(self.k.run("echo $kept")), "yes\n")

    def test_env_vars_apply_to_one_cell(self):
        self.k.run("export RF_B=orig; RF_L=local")
        code = "echo ${RF_A-unset} $RF_B $RF_L; sh -c 'echo ${RF_L-unexported}'"
        msgs = self.k.run(code, env_vars={"RF_A": "a b", "RF_B": "tmp", "RF_L": "x"})
        self.assertEqual(stream(msgs), "a b tmp x\nx\n")
        self.assertEqual(stream(self.k.run(code)), "unset orig local\nunexported\n")

    def test_set_env_replaces_the_environment(self):
        self.k.send({"op": "set_env", "env": {"RF_C": "c", "PATH": os.environ["PATH"]}})
        msgs = self.k.run("echo $RF_C ${HOME-nohome}; env | grep -c RF_C")
        self.assertEqual(stream(msgs), "c nohome\n1\n")

    def test_exit_restarts_bash(self):
        msgs = self.k.run("exit 4")
        (err,) = of_type(msgs, "error")
        self.assertEqual((err["name"], err["value"]), ("BashExited", "bash exited with status 4"))
        self.assertEqual(stream(self.k.run("echo again")), "again\n")


class _DriverKernelTests:
    """What the `java` and `r` kernels share; each language supplies its cells."""

    lang = ""
    program = ""
    cells = {}

    def setUp(self):
        if shutil.which(self.program) is None:
            self.skipTest(f"SKIPPED: no {self.program} on this host (scripts/setup.sh installs it)")
        self.k = Kernel(self, self.lang)

    def test_state_result_and_streams(self):
        c = self.cells
        self.assertEqual(of_type(self.k.run(c["define"]), "result"), [])
        msgs = self.k.run(c["print_and_value"])
        self.assertEqual(stream(msgs), "out\n")
        self.assertEqual(stream(msgs, "stderr"), "err\n")
        (res,) = of_type(msgs, "result")
        self.assertEqual((res["text"], res["is_main_result"]), (c["value"], True))
        # Output comes before the result, in the order written.
        self.assertEqual(msgs[-2]["type"], "result")

    def test_errors_keep_the_session(self):
        c = self.cells
        self.k.run(c["define"])
        (err,) = of_type(self.k.run(c["throw"]), "error")
        self.assertEqual((err["name"], err["value"]), c["thrown"])
        self.assertIn(c["trace_has"], err["traceback"])
        (err,) = of_type(self.k.run(c["syntax"]), "error")
        self.assertEqual(err["name"], c["syntax_name"])
        (res,) = of_type(self.k.run(c["use"]), "result")
        self.assertEqual(res["text"], c["use_value"])

    def test_env_vars_apply_to_one_cell(self):
        c = self.cells
        (res,) = of_type(self.k.run(c["getenv"], {"RF_CELL": "v1"}), "result")
        self.assertEqual(res["text"], c["getenv_set"])
        (res,) = of_type(self.k.run(c["getenv"]), "result")
        self.assertEqual(res["text"], c["getenv_unset"])

    def test_interrupt_keeps_state(self):
        c = self.cells
        self.k.run(c["define"])
        exec_id = self.k.start(c["loop"])
        self.assertEqual(self.k.recv(30)["type"], "number_of_executions")
        time.sleep(1)
        self.k.send({"op": "interrupt", "id": exec_id})
        msgs = []
        while not msgs or msgs[-1]["type"] != "end_of_execution":
            msgs.append(self.k.recv(10))
        self.assertEqual(of_type(msgs, "error")[0]["name"], "KeyboardInterrupt")
        (res,) = of_type(self.k.run(c["use"]), "result")
        self.assertEqual(res["text"], c["use_value"])

    def test_a_dead_driver_is_replaced(self):
        (err,) = of_type(self.k.run(self.cells["exit"]), "error")
        self.assertEqual(err["name"], "KernelDied")
        (res,) = of_type(self.k.run(self.cells["fresh"]), "result")
        self.assertEqual(res["text"], self.cells["fresh_value"])


class JavaKernelTest(_DriverKernelTests, unittest.TestCase):
    lang = "java"
    program = "java"
    cells = {
        "define": "int x = 41;",
        "print_and_value": 'System.out.println("out"); System.err.println("err");\nx + 1',
        "value": "42",
        "throw": 'void f() { throw new IllegalStateException("bad"); }\nf();',
        "thrown": ("java.lang.IllegalStateException", "bad"),
        "trace_has": "at .f(",
        "syntax": "x.foo()",
        "syntax_name": "CompilationError",
        "use": "x",
        "use_value": "41",
        "getenv": 'String.valueOf(System.getenv("RF_CELL"))',
        "getenv_set": "v1",
        "getenv_unset": "null",
        "loop": "while (true) { x = x; }",
        "exit": "System.exit(3);",
        "fresh": "1 + 1",
        "fresh_value": "2",
    }


class RKernelTest(_DriverKernelTests, unittest.TestCase):
    lang = "r"
    program = "R"
    cells = {
        "define": "x <- 41",
        "print_and_value": 'cat("out\\n"); message("err")\nx + 1',
        "value": "[1] 42",
        "throw": 'f <- function() stop("bad")\ng <- function() f()\ng()',
        "thrown": ("simpleError", "bad"),
        "trace_has": "1. g()\n2. f()",
        "syntax": "x +",
        "syntax_name": "SyntaxError",
        "use": "x",
        "use_value": "[1] 41",
        "getenv": 'Sys.getenv("RF_CELL", "unset")',
        "getenv_set": '[1] "v1"',
        "getenv_unset": '[1] "unset"',
        "loop": "repeat { x <- x }",
        "exit": "quit(status = 3)",
        "fresh": "1 + 1",
        "fresh_value": "[1] 2",
    }


class TransportTest(unittest.TestCase):
    def test_serve_fd_over_a_socketpair(self):
        ours, theirs = socket.socketpair()
        argv = [
            PYTHON,
            "-c",
            "import sys, ringfence_kernel\n"
            "ringfence_kernel.preload()\n"
            "ringfence_kernel.after_fork()\n"
            f"ringfence_kernel.serve_fd({theirs.fileno()})",
        ]
        k = Kernel(self, argv=argv, pass_fds=(theirs.fileno(),), send=ours.sendall,
                   recv=lambda: ours.recv(1 << 16))
        theirs.close()
        msgs = k.run("import os\nprint('over a socket')\nos.write(1, b'fd\\n')\n6 * 7")
        self.assertEqual(stream(msgs), "over a socket\nfd\n")
        self.assertEqual(of_type(msgs, "result")[0]["text"], "42")
        ours.shutdown(socket.SHUT_WR)
        self.assertEqual(k.proc.wait(5), 0)
        ours.close()

    def test_preload_leaves_one_thread_and_no_state(self):
        script = (
            "import os, threading, ringfence_kernel\n"
            "ringfence_kernel.preload()\n"
            "import matplotlib.pyplot as plt\n"
            "print(threading.active_count(), len(os.listdir('/proc/self/task')),\n"
            "      plt.get_fignums(), 'OPENBLAS_NUM_THREADS' in os.environ,\n"
            "      __import__('IPython').get_ipython() is None)\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        out = subprocess.run([PYTHON, "-c", script], cwd=HERE, env=env, capture_output=True,
                             text=True, check=True).stdout
        self.assertEqual(out, "1 1 [] False True\n")

    def test_after_fork_reseeds_numpy(self):
        script = (
            "import os, ringfence_kernel, numpy\n"
            "ringfence_kernel.preload()\n"
            "for _ in range(2):\n"
            "    if os.fork() == 0:\n"
            "        ringfence_kernel.after_fork()\n"
            "        print(numpy.random.random(), flush=True)\n"
            "        os._exit(0)\n"
            "    os.wait()\n"
        )
        out = subprocess.run([PYTHON, "-c", script], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.split()
        self.assertEqual(len(out), 2)
        self.assertNotEqual(out[0], out[1])


if __name__ == "__main__":
    unittest.main()
