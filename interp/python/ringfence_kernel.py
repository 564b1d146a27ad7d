"""Ringfence's Python and bash kernels: one code-interpreter context per process.

The kernel speaks the JSON-lines protocol of interp/PROTOCOL.md, over stdio
(`python3 ringfence_kernel.py [--lang python|bash]`) or over a connected unix stream socket
(`serve_fd`, called by the fork server ringfence_zygote.py, which runs `preload()` once and
`after_fork()` in each kernel it forks).

Python cells run in IPython's InteractiveShell (no Jupyter, no ZMQ). Its display hook, display
publisher and traceback display are replaced so that values, `display()` calls and errors
become `result` and `error` messages. Bash cells run in one persistent bash process.

Output. The user's fds 1 and 2 are pipes that this process reads, so output written at the fd
level (os.write, subprocesses) is captured like print(). sys.stdout and sys.stderr do not go
through those pipes: they append to one ordered queue directly, after first moving whatever the
pipes already hold into it, so output keeps the order it was written in (a print() after a
finished subprocess comes after that subprocess's output). A pump thread moves pipe data into
the queue as it arrives and sends the queue after a short coalescing delay, so output streams
while a cell runs, without one message per print() call.
"""

import argparse
import base64
import codecs
import contextlib
import datetime
import fcntl
import io
import json
import math
import os
import queue
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
import traceback

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets import Type
from traitlets.config import Config

import ringfence_charts

# Thread pools of the numerical libraries, limited while numpy loads them: the fork server forks
# kernels after preload(), and threads do not survive a fork (a pool's state would be broken in
# every kernel).
_THREAD_POOL_VARS = (
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
_INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

# Output is sent this long after its first byte was queued, unless the queue reaches
# _FLUSH_CHARS first: short enough to look live, long enough to batch a loop of prints.
_COALESCE_S = 0.02
_FLUSH_CHARS = 1 << 20
# Longest `text` of one stdout/stderr message; longer output is split over several.
_CHUNK_CHARS = 1 << 16
_READ_BYTES = 1 << 16

# Jupyter MIME types and the `result` fields they fill (docs: E2B's code-interpreter server).
# Anything else goes to `extra`.
_RESULT_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}
_BINARY_MIME = {"image/png", "image/jpeg", "application/pdf"}

_preloaded = False
# os._exit as it was: the Python kernel replaces it for user code (see _Output.exit_now), and the
# kernel's own exits must not wait on output.
_real_exit = os._exit
# The kernel's own stderr, for its own failures (see _fatal_on_error).
_diag_fd = 2


def preload():
    """Imports and warms everything expensive, once per process.

    Creates no per-context state (no shell, no figures) and leaves the process with a single
    thread, so the fork server can fork kernels from it. matplotlib settles its config and
    cache directories here, from MPLCONFIGDIR or the home directory as it always does.
    """
    global _preloaded
    if _preloaded:
        return
    saved = {name: os.environ.get(name) for name in _THREAD_POOL_VARS}
    os.environ.update(dict.fromkeys(_THREAD_POOL_VARS, "1"))
    try:
        import numpy  # OpenBLAS reads the variables when it loads
    finally:
        # Loaded pools keep their size; user code and its subprocesses see the environment
        # they were given.
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    import pandas

    _seed_matplotlib_cache()
    import matplotlib.pyplot
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    matplotlib.pyplot.switch_backend(_INLINE_BACKEND)  # imports it; there are no figures yet
    # One render through the path inline figures take loads the fonts and the rest of what a
    # first plot would otherwise pay for. An object-oriented Figure, not pyplot, so that no
    # figure is left registered for a kernel to show.
    fig = Figure(figsize=(1, 1))
    axes = fig.add_subplot()
    axes.plot(numpy.arange(3), numpy.arange(3) ** 2, label="x")
    axes.legend()
    print_figure(fig, "png", bbox_inches="tight")
    pandas.DataFrame({"a": [1.5], "b": ["x"]})._repr_html_()
    _preloaded = True


def _seed_matplotlib_cache():
    """Copies the font list built with the environment (scripts/interp-env.sh) into matplotlib's
    cache directory when that has none: without it matplotlib scans every font on the system,
    seconds of a cold start. The environment itself is read-only inside sandboxes, so the list
    cannot be used where it is."""
    import matplotlib  # reads matplotlibrc only; fonts load with matplotlib.font_manager

    prebuilt = os.path.join(sys.prefix, "share", "ringfence", "mplconfig")
    try:
        names = [n for n in os.listdir(prebuilt) if n.startswith("fontlist-")]
    except OSError:
        return
    cache = matplotlib.get_cachedir()
    for name in names:
        target = os.path.join(cache, name)
        if os.path.exists(target):
            continue
        partial = f"{target}.{os.getpid()}.tmp"  # kernels may start side by side
        try:
            shutil.copyfile(os.path.join(prebuilt, name), partial)
            os.replace(partial, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)


def after_fork():
    """Run in each kernel the fork server forks: reseeds what would otherwise be the same in
    every kernel. numpy's global RandomState here; `random` reseeds itself on fork."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def serve_fd(fd, lang="python"):
    """Serves one context over `fd`, a connected AF_UNIX stream socket; never returns."""
    os.set_inheritable(fd, False)
    _serve(fd, fd, lang)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Ringfence code-interpreter kernel (stdio)")
    parser.add_argument("--lang", choices=("python", "bash", "java", "r"), default="python")
    args = parser.parse_args(argv)
    if args.lang == "python":
        preload()
    # Private copies of the channel (os.dup's are close-on-exec), taken before _Output points
    # fds 0 and 1 elsewhere.
    _serve(os.dup(0), os.dup(1), args.lang)


def _serve(in_fd, out_fd, lang):
    global _diag_fd
    kernels = {
        "python": _PythonKernel,
        "bash": _BashKernel,
        "java": lambda out, in_fd: _DriverKernel(out, in_fd, "java"),
        "r": lambda out, in_fd: _DriverKernel(out, in_fd, "r"),
    }
    if lang not in kernels:
        raise ValueError(f"unknown kernel language {lang!r}")
    _diag_fd = os.dup(2)
    with _fatal_on_error():
        out = _Output(out_fd, {in_fd, out_fd})
        sys.stdout = _TextStream(out, "stdout", 1)
        sys.stderr = _TextStream(out, "stderr", 2)
        kernels[lang](out, in_fd).serve_forever()


@contextlib.contextmanager
def _fatal_on_error():
    """For the kernel's own code (never user code): a failure is a bug, and a kernel that lost
    its main loop or a thread would hang. It is reported on the kernel's original fd 2 (what
    the server gave it; the user's fd 2 is a capture pipe by then) and the kernel exits."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(_diag_fd, traceback.format_exc().encode("utf-8", "replace"))
        _real_exit(1)


def _thread(target, name):
    def run():
        with _fatal_on_error():
            target()

    threading.Thread(target=run, name=name, daemon=True).start()


def _timestamp(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )


def _encode(msg):
    """One protocol line. Lone surrogates (which UTF-8 cannot carry) become '?'."""
    try:
        text = json.dumps(msg, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:  # NaN or infinity (invalid JSON), or a reference cycle
        text = json.dumps(_plain_json(msg, 0), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "replace") + b"\n"


def _plain_json(value, depth):
    """`value` with what JSON cannot hold replaced: non-finite floats by null, other objects,
    and anything nested absurdly deep (a cycle), by their str()."""
    if depth > 100:
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, depth + 1) for v in value]
    return str(value)


def _error(name, value, tb):
    return {"type": "error", "name": name, "value": value, "traceback": tb}


def _result(bundle, is_main):
    """A `result` message from a Jupyter MIME bundle, as E2B's server maps one."""
    msg = {"type": "result"}
    extra = {}
    for mime, value in bundle.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = (
                base64.b64encode(value).decode("ascii")
                if mime in _BINARY_MIME
                else bytes(value).decode("utf-8", "replace")
            )
        field = _RESULT_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
        else:
            msg[field] = value
    text = msg.get("text")
    # The repr of a str: E2B shows the string itself (one level of quotes removed).
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        msg["text"] = text[1:-1]
    if extra:
        msg["extra"] = extra
    msg["is_main_result"] = is_main
    return msg


class _OutputLock:
    """The output lock. While the main thread holds it, SIGINT must not raise: a
    KeyboardInterrupt between two writes of one line would leave half a line on the channel.
    The Python kernel's SIGINT handler sees `critical` and sets `deferred` instead, which the
    main thread raises as it releases the lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._main = threading.get_ident()
        self.critical = False
        self.deferred = False

    def __enter__(self):
        if threading.get_ident() == self._main:
            self.critical = True
        self._lock.acquire()

    def __exit__(self, *exc_info):
        self._lock.release()
        if threading.get_ident() == self._main:
            self.critical = False
            if self.deferred:
                self.deferred = False
                raise KeyboardInterrupt

    def acquire(self, timeout):
        return self._lock.acquire(timeout=timeout)


class _Output:
    """The channel's writing side, and the capture of everything the user's code writes.

    All writes to the channel happen with `lock` held, one whole line at a time. Stream output
    is tagged with the running execution's id; output arriving between executions (from
    background threads or processes) belongs to none and is dropped.
    """

    def __init__(self, chan_fd, chan_fds):
        """`chan_fd` is where messages go; `chan_fds` are all of the channel's descriptors,
        closed in processes that user code forks."""
        self._chan = chan_fd
        self._chan_fds = chan_fds
        self.lock = _OutputLock()
        self._exec_id = None
        self.error_sent = False
        # Queued stream output: [stream, time of first write, [texts]], consecutive writes to
        # one stream merged.
        self._queue = []
        self._queued_chars = 0
        self._deadline = None  # monotonic time the queue is due to be sent
        self._forked = False

        self._null = os.open(os.devnull, os.O_RDWR)
        self._pipes = {}  # read end -> (stream, incremental decoder)
        self._user_fds = []  # (private write end, the user's fd it is duplicated onto)
        for name, user_fd in (("stdout", 1), ("stderr", 2)):
            r, w = os.pipe()
            os.set_blocking(r, False)
            self._pipes[r] = (name, codecs.getincrementaldecoder("utf-8")("replace"))
            self._user_fds.append((w, user_fd))
        self._readable = select.poll()
        for r in self._pipes:
            self._readable.register(r, select.POLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.restore_fds()
        os.register_at_fork(after_in_child=self._after_fork_in_child)

    def restore_fds(self):
        """Points the user's fds 0, 1 and 2 at /dev/null and the capture pipes, whatever the
        last cell did to them (closed fd 1, redirected it, ...)."""
        os.dup2(self._null, 0)
        for private, user_fd in self._user_fds:
            os.dup2(private, user_fd)

    def start(self):
        _thread(self._pump, "ringfence-output")

    # Called by the main thread only, between executions or at their edges.

    def send_ready(self, language):
        with self.lock:
            self._write_locked({"type": "ready", "language": language, "pid": os.getpid()})

    def begin(self, exec_id):
        with self.lock:
            self._exec_id = exec_id
            self.error_sent = False
            self.lock.deferred = False

    def end(self):
        with self.lock:
            self._drain_locked()
            self._send_queue_locked()
            self._write_locked({"type": "end_of_execution", "id": self._exec_id})
            self._exec_id = None

    # Called from any thread while an execution runs.

    def send(self, msg):
        """Sends a message of the running execution, after all output written before it."""
        with self.lock:
            if self._exec_id is None:
                return
            self._drain_locked()
            self._send_queue_locked()
            if msg["type"] == "error":
                self.error_sent = True
            self._write_locked({**msg, "id": self._exec_id})

    def write(self, stream, text):
        """Python-level output (sys.stdout/sys.stderr)."""
        if self._forked:
            self._write_fd(stream, text)
            return
        if not text or self._exec_id is None:
            return
        with self.lock:
            self._drain_locked()
            idle = self._deadline is None
            self._queue_locked(stream, text)
            if self._queued_chars >= _FLUSH_CHARS:
                self._send_queue_locked()
            elif idle:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")

    def exit_now(self, status):
        """os._exit for user code: output written before it is sent, and never half a line.
        The lock is kept so that the pump cannot start another line."""
        if not self._forked and self.lock.acquire(timeout=1):
            with contextlib.suppress(OSError):
                self._drain_locked()
                self._send_queue_locked()
        _real_exit(status)

    # Internals; *_locked run with the lock held.

    def _pump(self):
        poller = select.poll()
        for fd in (*self._pipes, self._wake_r):
            poller.register(fd, select.POLLIN)
        while True:
            with self.lock:
                deadline = self._deadline
            timeout = None if deadline is None else max(0, (deadline - time.monotonic()) * 1000)
            ready = poller.poll(None if timeout is None else math.ceil(timeout))
            with self.lock:
                for fd, events in ready:
                    if events & select.POLLNVAL:
                        _real_exit(1)  # user code closed this process's own descriptors
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(fd, _READ_BYTES)
                    else:
                        self._read_pipe_locked(fd, _READ_BYTES)
                if self._queue and (
                    time.monotonic() >= self._deadline or self._queued_chars >= _FLUSH_CHARS
                ):
                    self._send_queue_locked()

    def _read_pipe_locked(self, fd, limit):
        """Reads up to `limit` bytes from a capture pipe into the queue; returns the count."""
        try:
            data = os.read(fd, limit)
        except BlockingIOError:
            return 0
        name, decoder = self._pipes[fd]
        self._queue_locked(name, decoder.decode(data))
        return len(data)

    def _drain_locked(self):
        """Moves everything the capture pipes hold now into the queue: all that was written to
        fds 1 and 2 before this call, since a finished write is in the pipe. Bounded by what
        is there now, so a process that never stops writing cannot hold it up."""
        for fd, _ in self._readable.poll(0):
            available = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
            left = int.from_bytes(available, sys.byteorder)
            while left > 0:
                got = self._read_pipe_locked(fd, min(left, _READ_BYTES))
                if not got:
                    break
                left -= got
                if self._queued_chars >= _FLUSH_CHARS:
                    self._send_queue_locked()

    def _queue_locked(self, stream, text):
        if not text or self._exec_id is None:
            return
        if self._queue and self._queue[-1][0] == stream:
            self._queue[-1][2].append(text)
        else:
            self._queue.append([stream, time.time(), [text]])
        self._queued_chars += len(text)
        if self._deadline is None:
            self._deadline = time.monotonic() + _COALESCE_S

    def _send_queue_locked(self):
        for stream, started, texts in self._queue:
            text = "".join(texts)
            stamp = _timestamp(started)
            for i in range(0, len(text), _CHUNK_CHARS):
                self._write_locked(
                    {
                        "type": stream,
                        "id": self._exec_id,
                        "text": text[i : i + _CHUNK_CHARS],
                        "timestamp": stamp,
                    }
                )
        self._queue.clear()
        self._queued_chars = 0
        self._deadline = None

    def _write_locked(self, msg):
        data = memoryview(_encode(msg))
        try:
            while data:
                data = data[os.write(self._chan, data) :]
        except OSError:
            _real_exit(1)  # the server is gone

    def _write_fd(self, stream, text):
        data = text.encode("utf-8", "replace")
        fd = 1 if stream == "stdout" else 2
        while data:
            data = data[os.write(fd, data) :]

    def _after_fork_in_child(self):
        """A process forked by user code (os.fork, multiprocessing) writes its Python-level
        output to fds 1 and 2, which this kernel still reads, and holds no channel: the
        kernel's threads do not exist in it, and a kernel that dies must read as EOF to the
        server even while its children live on."""
        self._forked = True
        for fd in (*self._chan_fds, *self._pipes, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _TextStream(io.TextIOBase):
    """sys.stdout / sys.stderr of a kernel."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, out, stream, fd):
        super().__init__()
        self._out = out
        self._stream = stream
        self._fd = fd
        self.buffer = _BinaryStream(self)

    @property
    def name(self):
        return f"<{self._stream}>"

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._out.write(self._stream, s)
        return len(s)

    def flush(self):
        pass  # nothing is buffered here; the queue is sent within _COALESCE_S

    def close(self):
        pass  # the kernel's streams outlive a cell that closes them


class _BinaryStream(io.RawIOBase):
    """`sys.stdout.buffer`: bytes decoded as UTF-8, invalid sequences replaced."""

    def __init__(self, text):
        super().__init__()
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self):
        return True

    def fileno(self):
        return self._text.fileno()

    def write(self, b):
        self._text.write(self._decoder.decode(bytes(b)))
        return len(b)

    def close(self):
        pass


class _Kernel:
    """What both languages share: the request reader, the execution loop and interrupts.

    The reader thread reads the request channel all the time, so that `interrupt` is seen while
    a cell runs; everything else is queued for the main thread, in order.
    """

    language = ""

    def __init__(self, out, in_fd):
        self.out = out
        self._in_fd = in_fd
        self._requests = queue.Queue()
        self._count = 0
        # Shared with the reader thread, under _state.
        self._state = threading.Lock()
        self._waiting = set()  # ids of executions received, not started
        self._cancelled = set()  # of those, ids interrupted before they started
        self._running = None
        self._interrupted = False

    def serve_forever(self):
        self.out.start()
        self.out.send_ready(self.language)
        _thread(self._read_requests, "ringfence-requests")
        while True:
            req = self._requests.get()
            if req["op"] == "execute":
                self._execute(req)
            else:
                self.set_env(req["env"])

    def _read_requests(self):
        buf = bytearray()
        while True:
            try:
                chunk = os.read(self._in_fd, _READ_BYTES)
            except OSError:
                chunk = b""
            if not chunk:
                self.shutdown()
            start = len(buf)
            buf += chunk
            end = buf.find(b"\n", start)
            while end >= 0:
                self._handle(bytes(buf[:end]))
                del buf[: end + 1]
                end = buf.find(b"\n")

    def _handle(self, line):
        try:
            req = json.loads(line)
        except ValueError:
            return
        if not isinstance(req, dict):
            return
        op, exec_id = req.get("op"), req.get("id")
        if op == "set_env" and isinstance(req.get("env"), dict):
            self._requests.put(req)
        elif not isinstance(exec_id, str):
            return
        elif op == "execute" and isinstance(req.get("code"), str):
            with self._state:
                self._waiting.add(exec_id)
            self._requests.put(req)
        elif op == "interrupt":
            with self._state:
                if exec_id == self._running and not self._interrupted:
                    self._interrupted = True
                    self.interrupt()
                elif exec_id in self._waiting:
                    self._cancelled.add(exec_id)

    def _execute(self, req):
        exec_id = req["id"]
        env_vars = req.get("env_vars")
        with self._state:
            self._waiting.discard(exec_id)
            self._running = exec_id
            self._interrupted = exec_id in self._cancelled
            self._cancelled.discard(exec_id)
        self._count += 1
        self.out.begin(exec_id)
        self.out.send({"type": "number_of_executions", "execution_count": self._count})
        self.out.restore_fds()
        self.run(req["code"], env_vars if isinstance(env_vars, dict) else {})
        self.out.restore_fds()
        with self._state:
            self._running = None
            interrupted = self._interrupted
        if interrupted and not self.out.error_sent:
            # Interrupted code that swallowed the KeyboardInterrupt (IPython's `!cmd` does):
            # the protocol still reports the interrupt.
            self.out.send(_error("KeyboardInterrupt", "", "KeyboardInterrupt"))
        self.out.end()

    def is_interrupted(self):
        with self._state:
            return self._interrupted

    # Per language.

    def run(self, code, env_vars):
        raise NotImplementedError

    def interrupt(self):
        """Called by the reader thread, with _state held, for the running execution."""
        raise NotImplementedError

    def set_env(self, env):
        raise NotImplementedError

    def shutdown(self):
        """The request channel closed: exit now, whatever is running."""
        _real_exit(0)


def _make_shell(out):
    """An InteractiveShell whose displays and errors become protocol messages."""

    class Hook(DisplayHook):
        """The value of a cell's last expression: `result` with is_main_result true."""

        def write_output_prompt(self):
            pass

        def write_format_data(self, format_dict, md_dict=None):
            out.send(_result(format_dict, True))

        def finish_displayhook(self):
            self._is_active = False

    class Publisher(DisplayPublisher):
        """display() and inline figures: `result` with is_main_result false."""

        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
            out.send(_result(data, False))

        def clear_output(self, wait=False):
            pass

    class Shell(InteractiveShell):
        displayhook_class = Type(Hook)
        display_pub_class = Type(Publisher)
        # `!cmd` through subprocess with the kernel's fds (the capture pipes), not IPython's
        # default of a pexpect pty: sandboxes may have no /dev/ptmx, and a pty would merge
        # stderr into stdout.
        system = InteractiveShell.system_raw

        def enable_gui(self, gui=None):
            # Figures are shown inline; there is no display for a GUI event loop.
            if gui not in (None, "inline"):
                raise RuntimeError(f"no GUI event loop ({gui}) in a sandbox: use inline figures")

        def _showtraceback(self, etype, evalue, stb):
            try:
                value = str(evalue)
            except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
                value = f"<unprintable {etype.__name__} object>"
            out.send(_error(etype.__name__, value, self.InteractiveTB.stb2text(stb)))

    config = Config()
    config.HistoryManager.enabled = False  # no sqlite file, no history-saving thread
    config.InteractiveShell.colors = "nocolor"  # tracebacks are read as text, not on a tty
    shell = Shell.instance(config=config)
    shell.enable_matplotlib("inline")
    ringfence_charts.install(shell)
    return shell


class _PythonKernel(_Kernel):
    language = "python"

    def __init__(self, out, in_fd):
        super().__init__(out, in_fd)
        preload()
        self.shell = _make_shell(out)
        # SIGINT raises KeyboardInterrupt only while this is set, by the main thread itself
        # around user code: an interrupt that arrives as a cell ends cannot break the kernel.
        self._in_user_code = False
        signal.signal(signal.SIGINT, self._on_sigint)
        os._exit = out.exit_now

    def _on_sigint(self, signum, frame):
        if not self._in_user_code:
            return
        if self.out.lock.critical:
            self.out.lock.deferred = True
            return
        raise KeyboardInterrupt

    def interrupt(self):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def run(self, code, env_vars):
        saved = {}
        try:
            for name, value in env_vars.items():
                saved.setdefault(name, os.environ.get(name))
                os.environ[name] = value
        except (TypeError, ValueError) as e:
            self._restore_env(saved)
            self.out.send(_error(type(e).__name__, str(e), traceback.format_exc()))
            return
        self.shell.execution_count = self._count
        try:
            self._in_user_code = True
            if self.is_interrupted():
                raise KeyboardInterrupt
            self.shell.run_cell(code, store_history=True)
        except KeyboardInterrupt:
            pass  # outside the cell's code (IPython reports it inside): _execute reports it
        finally:
            self._in_user_code = False
            self._restore_env(saved)

    @staticmethod
    def _restore_env(saved):
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def set_env(self, env):
        os.environ.clear()
        for name, value in env.items():
            with contextlib.suppress(TypeError, ValueError):  # a name putenv refuses
                os.environ[name] = value


_BASH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class _BashKernel(_Kernel):
    """Cells run in one interactive bash that keeps variables, functions and the cwd.

    bash runs with `-i` because only an interactive shell abandons the rest of a command list
    on SIGINT (a script would go on to the next command, or die); it has no terminal, no
    prompts and no history. Its fds 1 and 2 are the capture pipes. It reports on a private
    pipe (`ctl`, closed for the cell's own commands): PROMPT_COMMAND, which bash runs after
    every top-level command line, even an interrupted one, writes `done <status>`, and each
    command line we send starts by writing `start`, so that a stale `done` is never taken for
    the current one.

    A cell's status is its last command's, as `$?` would show it (and the next cell's `$?`
    starts as it). A non-zero status is reported as an error, as Jupyter's bash kernel does:
    name `ExitStatus`, value the status. An interrupted cell reports `KeyboardInterrupt`. A cell
    that makes bash exit (`exit`, `set -e`) reports `BashExited`, and a fresh bash, with the
    context's base environment and the kernel's starting directory, takes its place.
    """

    language = "bash"

    def __init__(self, out, in_fd):
        super().__init__(out, in_fd)
        # The SIGINT our interrupts send goes to bash's process group only; one meant for the
        # whole sandbox must not end the kernel (bash gets the default back at exec).
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        self._status = 0
        self._started = False
        self._start_bash()

    def _start_bash(self):
        ctl_r, low = os.pipe()
        # High numbers, where a cell's `exec 3>file` and bash's own {var}> (from 10) do not land.
        ctl_w = fcntl.fcntl(low, fcntl.F_DUPFD_CLOEXEC, 100)
        os.close(low)
        err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, 100)
        # stderr stays /dev/null until the setup line: what an interactive bash without a
        # terminal says on start (no job control, a first prompt) is noise.
        self._bash = subprocess.Popen(
            ["/bin/bash", "--noprofile", "--norc", "--noediting", "-i"],
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(ctl_w, err),
            start_new_session=True,  # its own process group, for interrupts
        )
        os.close(ctl_w)
        os.close(err)
        self._ctl = ctl_r
        self._ctl_w = ctl_w  # the number bash knows it by
        self._ctl_buf = bytearray()
        self._status = 0
        setup = (
            f"exec 2>&{err} {err}>&-; PS1= PS2= PS0=; set +H +m +o history; unset HISTFILE; "
            "__rf_status() { return \"$1\"; }; "
            f"PROMPT_COMMAND='printf \"done %s\\n\" \"$?\" >&{ctl_w}'"
        )
        self._command(setup)

    def _command(self, line, cell=False):
        """Runs one top-level command line; returns its status, or None if bash exited.
        Only a cell's command line can be interrupted."""
        try:
            self._bash.stdin.write(
                f"printf 'start\\n' >&{self._ctl_w}; {line}\n".encode("utf-8", "replace")
            )
            self._bash.stdin.flush()
        except OSError:
            return None
        while True:
            reply = self._ctl_line()
            if reply in (b"start", None):
                break  # anything else is a `done` left over from an interrupted command
        if reply is None:
            return None
        if cell:
            with self._state:
                self._started = True
                if self._interrupted:
                    self.interrupt()
        nudged = False
        while not self._ctl_ready(1.0):
            # An interrupt that lands while PROMPT_COMMAND itself runs can cost its `done`; an
            # empty command line gets another.
            if cell and not nudged and self.is_interrupted():
                nudged = True
                with contextlib.suppress(OSError):
                    self._bash.stdin.write(b"\n")
                    self._bash.stdin.flush()
        reply = self._ctl_line()
        with self._state:
            self._started = False
        return None if reply is None else int(reply.split()[1])

    def _ctl_ready(self, timeout):
        if b"\n" in self._ctl_buf:
            return True
        return bool(select.select([self._ctl], [], [], timeout)[0])

    def _ctl_line(self):
        """The next line bash wrote to ctl, None at EOF."""
        while b"\n" not in self._ctl_buf:
            data = os.read(self._ctl, 4096)
            if not data:
                return None
            self._ctl_buf += data
        line, _, rest = bytes(self._ctl_buf).partition(b"\n")
        self._ctl_buf = bytearray(rest)
        return line

    def interrupt(self):
        # Before `start`, bash may still be reading the command line; _command sends it then.
        if self._started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._bash.pid, signal.SIGINT)

    def run(self, code, env_vars):
        bad = [name for name in env_vars if not _BASH_NAME.match(name)]
        if bad or not all(isinstance(v, str) for v in env_vars.values()):
            self.out.send(_error("ValueError", f"invalid environment variable names: {bad}", ""))
            return
        names = list(env_vars)
        status = 0
        if names:
            # Saved as `declare -p` prints them (nothing when unset), restored by eval.
            status = self._command(
                "__rf_saved=(); "
                + "".join(
                    f'__rf_saved+=("$(declare -p {n} 2>/dev/null)"); export {n}={shlex.quote(v)}; '
                    for n, v in env_vars.items()
                )
            )
        if status is not None:
            status = self._command(
                f"__rf_status {self._status}; eval -- {shlex.quote(code)} "
                f"</dev/null {self._ctl_w}>&-",
                cell=True,
            )
        if status is None:
            self.out.send(
                _error(
                    "BashExited",
                    f"bash exited with status {self._bash.wait()}",
                    "bash was restarted: variables, functions and the working directory "
                    "were reset",
                )
            )
            self._replace_bash()
            return
        self._status = status
        if names:
            self._command(
                "".join(f'unset {n}; eval "${{__rf_saved[{i}]}}"; ' for i, n in enumerate(names))
                + "unset __rf_saved"
            )
        if status != 0 and not self.is_interrupted():
            self.out.send(_error("ExitStatus", str(status), f"exit status {status}"))

    def _replace_bash(self):
        """A fresh bash for one that exited."""
        self._bash.wait()
        with contextlib.suppress(OSError):
            self._bash.stdin.close()
        os.close(self._ctl)
        self._start_bash()

    def set_env(self, env):
        env = {k: v for k, v in env.items() if _BASH_NAME.match(k) and isinstance(v, str)}
        # The kernel's own environment too: a restarted bash starts from it.
        os.environ.clear()
        os.environ.update(env)
        replied = self._command(
            "for __rf_n in $(compgen -e); do unset \"$__rf_n\"; done 2>/dev/null; unset __rf_n; "
            + "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
        )
        if replied is None:
            self._replace_bash()

    def shutdown(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._bash.pid, signal.SIGKILL)
        _real_exit(0)


# Drivers of the `java` and `r` kernels: sources read when this module is imported (in the
# fork server, on the host, before any kernel enters a sandbox whose filesystem does not have
# them), written into the sandbox's /tmp when a kernel of that language starts.
_HERE = os.path.dirname(os.path.abspath(__file__))


def _driver_source(name, repo_dir):
    """Next to this file where the server writes it, or where it lives in the repository."""
    for path in (os.path.join(_HERE, name), os.path.join(_HERE, "..", repo_dir, name)):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            pass
    return None


_DRIVER_SOURCES = {
    "java": ("RingfenceJShell.java", _driver_source("RingfenceJShell.java", "java")),
    "r": ("ringfence_kernel.R", _driver_source("ringfence_kernel.R", "r")),
}


class _DriverKernel(_Kernel):
    """A kernel whose cells run in another language's own process (the driver): `java`
    (interp/java/RingfenceJShell.java, the jdk.jshell API) and `r` (interp/r/ringfence_kernel.R).

    The driver's fds 1 and 2 are this kernel's capture pipes, so everything its cells print
    streams like a Python cell's output. Requests go to its stdin and replies come back on a
    pipe whose fd number is its last argument, both framed as `<tag> <byte count>\\n<bytes>`: to the driver `exec` (a cell) and `env`
    (NUL-separated `NAME=value`, or a bare `NAME` to unset); from it `ready`, then per request
    any of `result` (the text of the cell's value), `ename`/`evalue`/`etrace` (an error) and
    finally `done`. Output is flushed before a reply, so it comes first. An interrupt is
    SIGINT to the driver's process group (its subprocesses too); a driver that exits is
    replaced by a fresh one (state lost), as bash is.
    """

    commands = {
        "java": lambda path, fd: [
            "java",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Xshare:auto",
            "--add-opens",
            "java.base/java.lang=ALL-UNNAMED",
            "--add-opens",
            "java.base/java.util=ALL-UNNAMED",
            path,
            str(fd),
        ],
        "r": lambda path, fd: [
            "R", "--no-echo", "--no-restore", "--no-save", "--vanilla", "-f", path, "--args", str(fd)
        ],
    }

    def __init__(self, out, in_fd, language):
        self.language = language
        super().__init__(out, in_fd)
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        self._dir = None
        self._proc = None
        self._start_driver()

    def _start_driver(self):
        name, source = _DRIVER_SOURCES[self.language]
        if source is None:
            raise RuntimeError(f"no driver source {name} next to ringfence_kernel.py")
        if self._dir is None:
            import tempfile

            self._dir = tempfile.mkdtemp(prefix=f".ringfence-{self.language}-")
            with open(os.path.join(self._dir, name), "w", encoding="utf-8") as f:
                f.write(source)
        ctl_r, ctl_w = os.pipe()
        argv = self.commands[self.language](os.path.join(self._dir, name), ctl_w)
        # The driver dies with this kernel even when the kernel is SIGKILLed (a removed context
        # or a kernel that did not stop in time): setpriv sets the parent-death signal, which
        # survives its exec of the driver. (preexec_fn could do it too, but is unsafe in a
        # process with threads.)
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            pass_fds=(ctl_w,),
            start_new_session=True,  # its own process group, for interrupts
        )
        os.close(ctl_w)
        self._ctl = ctl_r
        self._ctl_buf = bytearray()
        tag, body = self._reply(None)
        if tag != "ready":
            status = self._proc.wait()
            raise RuntimeError(f"the {self.language} driver did not start (status {status}): {body}")

    def _send(self, tag, text):
        data = text.encode("utf-8", "replace")
        try:
            self._proc.stdin.write(f"{tag} {len(data)}\n".encode() + data)
            self._proc.stdin.flush()
            return True
        except OSError:
            return False

    def _read_exact(self, n):
        while len(self._ctl_buf) < n:
            chunk = os.read(self._ctl, max(n - len(self._ctl_buf), _READ_BYTES))
            if not chunk:
                return None
            self._ctl_buf += chunk
        data = bytes(self._ctl_buf[:n])
        del self._ctl_buf[:n]
        return data

    def _reply(self, _unused):
        """The driver's next reply (tag, text); (None, "") once it exited."""
        while b"\n" not in self._ctl_buf:
            chunk = os.read(self._ctl, _READ_BYTES)
            if not chunk:
                return None, ""
            self._ctl_buf += chunk
        header, _, rest = bytes(self._ctl_buf).partition(b"\n")
        self._ctl_buf = bytearray(rest)
        try:
            tag, size = header.decode("ascii").split(" ")
            body = self._read_exact(int(size))
        except (UnicodeDecodeError, ValueError):
            return None, ""
        if body is None:
            return None, ""
        return tag, body.decode("utf-8", "replace")

    def _request(self, tag, text):
        """Sends one request and relays its replies; False if the driver died on the way."""
        if not self._send(tag, text):
            return False
        err = {}
        while True:
            kind, body = self._reply(None)
            if kind is None:
                return False
            if kind == "done":
                break
            if kind == "result":
                self.out.send(_result({"text/plain": body}, True))
            elif kind in ("ename", "evalue", "etrace"):
                err[kind] = body
                if kind == "etrace":
                    name = err.get("ename", "Error")
                    if self.is_interrupted():
                        name = "KeyboardInterrupt"
                    self.out.send(_error(name, err.get("evalue", ""), body))
                    err = {}
        return True

    def run(self, code, env_vars):
        bad = [n for n in env_vars if not isinstance(n, str) or not n or "=" in n or "\0" in n]
        if bad or not all(isinstance(v, str) and "\0" not in v for v in env_vars.values()):
            self.out.send(_error("ValueError", f"invalid environment variables: {bad}", ""))
            return
        alive = True
        if env_vars:
            saved = self._env_snapshot(env_vars)
            alive = self._request("env", "\0".join(f"{k}={v}" for k, v in env_vars.items()))
        if alive:
            alive = self._request("exec", code)
        if alive and env_vars:
            alive = self._request("env", "\0".join(saved))
        if not alive:
            status = self._proc.wait()
            if not self.is_interrupted():
                self.out.send(
                    _error(
                        "KernelDied",
                        f"the {self.language} process exited with status {status}",
                        f"a fresh {self.language} process was started: its state was reset",
                    )
                )
            self._restart()

    @staticmethod
    def _env_snapshot(names):
        return [f"{n}={os.environ[n]}" if n in os.environ else n for n in names]

    def _restart(self):
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        os.close(self._ctl)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        self._start_driver()

    def interrupt(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGINT)

    def set_env(self, env):
        os.environ.clear()
        for name, value in env.items():
            with contextlib.suppress(TypeError, ValueError):
                os.environ[name] = value
        # The driver's own copy: replaced wholesale by restarting it with the new environment
        # would lose its state, so only the variables are changed.
        if not self._request("env", "\0".join(f"{k}={v}" for k, v in os.environ.items())):
            self._restart()

    def shutdown(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)
        _real_exit(0)


if __name__ == "__main__":
    main()
