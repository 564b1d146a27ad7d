"""The guest half of the wasm tier's kernel: loaded once into CPython-on-WASI as the module
`_ringfence`, then called by the host once per request (`handle(request_bytes)`), each call
one `turn` of the instance (crates/wasm/src/agent.rs).

It speaks interp/PROTOCOL.md on fd 1, except `end_of_execution`, which the host sends after
the turn returns (so a cell stopped by the host still ends). While a cell runs, `sys.stdout`
and `sys.stderr` are writers that wrap the cell's text in `stdout`/`stderr` messages, so
nothing the cell prints can forge or break a protocol line; the host validates every line
anyway, as it does for every kernel.
"""

import ast
import base64
import datetime
import json
import linecache
import os
import sys
import traceback

_count = 0
_cell_env = None
os.chdir("/home/user")


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _emit(msg):
    data = (json.dumps(msg) + "\n").encode()
    while data:
        n = os.write(1, data)
        data = data[n:]


class _Writer:
    """A cell's stdout or stderr: each write becomes one protocol message."""

    encoding = "utf-8"
    errors = "strict"

    def __init__(self, name, exec_id):
        self.name, self.exec_id = name, exec_id
        self.buf = ""

    def _send(self, text):
        _emit({"id": self.exec_id, "type": self.name, "text": text, "timestamp": _now()})

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        # Line-buffered, as a terminal is: print()'s text and its newline are one message.
        self.buf += s
        cut = self.buf.rfind("\n")
        if cut >= 0:
            self._send(self.buf[: cut + 1])
            self.buf = self.buf[cut + 1 :]
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if self.buf:
            self._send(self.buf)
            self.buf = ""

    def isatty(self):
        return False

    def fileno(self):
        raise OSError("the cell's output is not a file")


def _formats(value):
    """The MIME bundle of `value`, as E2B's result fields."""
    out = {"text": repr(value)}
    for meth, key in (
        ("_repr_html_", "html"),
        ("_repr_markdown_", "markdown"),
        ("_repr_svg_", "svg"),
        ("_repr_latex_", "latex"),
        ("_repr_javascript_", "javascript"),
    ):
        f = getattr(value, meth, None)
        if callable(f):
            try:
                r = f()
            except Exception:
                r = None
            if isinstance(r, str):
                out[key] = r
    for meth, key in (("_repr_png_", "png"), ("_repr_jpeg_", "jpeg")):
        f = getattr(value, meth, None)
        if callable(f):
            try:
                r = f()
            except Exception:
                r = None
            if isinstance(r, bytes):
                out[key] = base64.b64encode(r).decode()
    f = getattr(value, "_repr_json_", None)
    if callable(f):
        try:
            r = f()
            if isinstance(r, dict):
                out["json"] = r
        except Exception:
            pass
    # As the jail's kernel does (E2B shows a string result without one level of quotes).
    text = out["text"]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        out["text"] = text[1:-1]
    return out


def _figures(exec_id):
    """Open matplotlib figures, each sent as a PNG result and closed (as `plt.show()` would)."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    import io

    for num in plt.get_fignums():
        fig = plt.figure(num)
        buf = io.BytesIO()
        try:
            fig.savefig(buf, format="png")
        except Exception:
            continue
        msg = {"id": exec_id, "type": "result", "is_main_result": False}
        msg["text"] = repr(fig)
        msg["png"] = base64.b64encode(buf.getvalue()).decode()
        _emit(msg)
    plt.close("all")


def _run(exec_id, code, env_vars):
    global _count
    _count += 1
    _emit({"id": exec_id, "type": "number_of_executions", "execution_count": _count})
    saved = {}
    for k, v in (env_vars or {}).items():
        saved[k] = os.environ.get(k)
        os.environ[k] = str(v)
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Writer("stdout", exec_id), _Writer("stderr", exec_id)
    main = sys.modules["__main__"].__dict__
    # The cell's source where tracebacks look for it, so they show its lines.
    name = f"<cell-{_count}>"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
    try:
        tree = ast.parse(code, name, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, name, "exec"), main)
        value = None
        if last is not None:
            value = eval(compile(last, name, "eval"), main)
        _figures(exec_id)
        if value is not None:
            main["_"] = value
            msg = {"id": exec_id, "type": "result", "is_main_result": True}
            msg.update(_formats(value))
            _emit(msg)
    except BaseException as e:  # the cell's own failure, SystemExit included, is its result
        # From the cell's own frame on: this driver's frame is not the user's.
        tb = traceback.format_exception(type(e), e, e.__traceback__.tb_next)
        _emit({
            "id": exec_id,
            "type": "error",
            "name": type(e).__name__,
            "value": str(e),
            "traceback": "".join(tb),
        })
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = old
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def warm():
    """Runs one cell through the whole path, then forgets it (its number, its source, `_`).
    The host snapshots the instance after this (crates/wasm/src/session.rs, `Image`), so every
    sandbox's first cell finds the path's code and caches ready; its messages go nowhere."""
    global _count
    _run("", "1+1", None)
    _count = 0
    linecache.cache.pop("<cell-1>", None)
    sys.modules["__main__"].__dict__.pop("_", None)


def handle(raw):
    req = json.loads(raw)
    op = req.get("op")
    if op == "execute":
        _run(str(req.get("id", "")), str(req.get("code", "")), req.get("env_vars"))
    elif op == "set_env":
        env = req.get("env") or {}
        for k, v in env.items():
            os.environ[str(k)] = str(v)
