"""Fork server for Python kernels: pay the import of IPython, numpy, pandas and matplotlib once
per server instead of once per sandbox.

The server (`ringfence serve`, as root) starts this process outside every sandbox and talks to it
over a unix SOCK_SEQPACKET socket. This process never runs user code and never receives a
secret: each request is one sandbox's entry plan (its namespaces as descriptors, its Landlock
and seccomp policy, its environment) plus one end of a fresh socket. For each request it forks
a child that

1. reports its pid, waits for the server to put it in the sandbox's cgroup;
2. joins the sandbox's user namespace first (which grants it the capabilities it needs inside),
   then the mount, pid, network, UTS, IPC and cgroup namespaces;
3. forks the kernel process itself (a pid namespace applies to children only), reports that
   pid so the server can hold a pidfd for it, and exits; the kernel is then reparented to the
   sandbox's PID 1, the agent, which reaps it;
4. the kernel drops everything a sandbox process may not have, in the order the agent uses
   (no groups, sandbox uid/gid, empty bounding, ambient and effective sets, no_new_privs,
   Landlock, rlimits, seccomp with a user-notification listener handed to the server), checks
   the result in /proc/self/status, and only then starts serving cells.

Every failure before the kernel serves ends that process with `os._exit`, after telling the
server why. The fork server itself exits when the server's end of its socket closes.
"""

import ctypes
import gc
import json
import os
import resource
import signal
import socket
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# The order the descriptors arrive in, after the kernel channel. The network namespace first,
# while still host root: one made ahead by the sandbox's spawner belongs to the host's user
# namespace, which no process in the sandbox's may join. Then the user namespace: joining it
# is what gives the right to join the others.
NAMESPACES = (
    CLONE_NEWNET,
    CLONE_NEWUSER,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWCGROUP,
)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SYS_CAPSET = 126
SYS_SECCOMP = 317
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_RULE_PATH_BENEATH = 1
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class EntryFailed(Exception):
    """One step of entering the sandbox failed; `step` names it for the server's log."""

    def __init__(self, step, message):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


def _check(ret, step):
    if ret < 0:
        err = ctypes.get_errno()
        raise EntryFailed(step, os.strerror(err))
    return ret


def _prctl(option, arg, step):
    _check(_libc.prctl(option, arg, 0, 0, 0), step)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: a u64 followed by an s32, 12 bytes
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _landlock(policy, writable):
    """The agent's policy, rebuilt here because Landlock rules name inodes of this sandbox's
    own mount namespace: writes only beneath `writable`, reads everywhere, and (ABI 6+) no
    signals or abstract unix sockets across the domain's edge."""
    write, file_mask, scopes = policy["write"], policy["file"], policy["scopes"]
    attr = _RulesetAttr(write, 0, scopes)
    # Older kernels accept the larger struct as long as the fields they do not know are zero.
    size = ctypes.c_size_t(ctypes.sizeof(_RulesetAttr))
    rs = _check(
        _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0),
        "landlock: create ruleset",
    )
    try:
        for path in writable:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # the agent skips missing paths too
            try:
                allowed = write if os.path.isdir(path) else write & file_mask
                rule = _PathBeneath(allowed, fd)
                _check(
                    _libc.syscall(
                        SYS_LANDLOCK_ADD_RULE, rs, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0
                    ),
                    f"landlock: rule for {path}",
                )
            finally:
                os.close(fd)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, rs, 0), "landlock: restrict self")
    finally:
        os.close(rs)


def _seccomp(program, listener):
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER if listener else 0
    return _check(
        _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)),
        "seccomp",
    )


def _drop_capabilities(last_cap):
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap, f"drop bounding capability {cap}")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    header = struct.pack("=Ii", LINUX_CAPABILITY_VERSION_3, 0)
    data = bytes(24)  # two {effective, permitted, inheritable} u32 triples, all zero
    _check(_libc.syscall(SYS_CAPSET, header, data), "capset")


def _verify(uid, gid):
    """Fail closed: read back what the kernel now enforces instead of trusting each step."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.split()
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if int(status[key][0], 16) != 0:
            raise EntryFailed("verify", f"{key} is {status[key][0]}")
    if status["NoNewPrivs"][0] != "1" or status["Seccomp"][0] != "2":
        raise EntryFailed("verify", "no_new_privs or seccomp not in force")
    if any(int(u) != uid for u in status["Uid"]) or status["Groups"] != [str(gid)]:
        raise EntryFailed("verify", f"credentials are {status['Uid']} / {status['Groups']}")


def _send_line(chan, obj):
    chan.sendall(json.dumps(obj).encode() + b"\n")


def _expect(chan, word):
    got = b""
    while not got.endswith(b"\n"):
        chunk = chan.recv(1)
        if not chunk:
            os._exit(1)  # the server gave up on this entry
        got += chunk
    if got.strip() != word:
        os._exit(1)


def _harden(plan, chan):
    uid, gid = plan["uid"], plan["gid"]
    os.setsid()
    os.setgroups([gid])  # as the agent gives its processes
    os.setresgid(gid, gid, gid)
    # Our host uid (0) is not the namespace's root, so the kernel will not clear capabilities on
    # this change by itself: they are dropped explicitly below.
    os.setresuid(uid, uid, uid)
    _drop_capabilities(plan["last_cap"])
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
    # Not dumpable (the kernel already cleared the flag on the credential change; keep it so):
    # this process's memory started as the fork server's, and nothing in the sandbox may ptrace
    # it or read its /proc files beyond what any process may of itself.
    _prctl(PR_SET_DUMPABLE, 0, "dumpable")
    if plan.get("landlock"):
        _landlock(plan["landlock"], plan["writable"])
    limits = plan["rlimits"]
    for res, want in (
        (resource.RLIMIT_NOFILE, limits["nofile"]),
        (resource.RLIMIT_NPROC, limits["nproc"]),
        (resource.RLIMIT_CORE, limits["core"]),
    ):
        _, hard = resource.getrlimit(res)
        value = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(res, (value, value))
    errno_prog = bytes.fromhex(plan.get("seccomp_errno") or "")
    notify_prog = bytes.fromhex(plan.get("seccomp_notify") or "")
    if errno_prog:
        _seccomp(errno_prog, False)
    listener = _seccomp(notify_prog, True) if notify_prog else None
    # The server supervises denials through the listener, as it does for the agent's. It takes
    # the descriptor itself (pidfd_getfd): a descriptor sent over a socket would count against
    # this uid's in-flight limit, which every sandbox's user shares, so one sandbox holding many
    # in flight could keep kernels from starting anywhere. It asks for a send only where it may
    # not take it.
    if listener is not None:
        chan.sendall(b"P" + listener.to_bytes(4, "little", signed=True))
        ack = chan.recv(1)
        if ack == b"S":
            socket.send_fds(chan, [b"L"], [listener])
        elif ack != b"K":
            raise EntryFailed("listener", f"unexpected answer {ack!r}")
        os.close(listener)
    else:
        chan.sendall(b"N")
    _verify(uid, gid)


def _enter(plan, chan, ns_fds):
    """Runs in the first child: joins the sandbox and forks the kernel. Never returns."""
    _send_line(chan, {"type": "forked", "pid": os.getpid()})
    _expect(chan, b"go")
    for fd, kind in zip(ns_fds, NAMESPACES):
        _check(_libc.setns(fd, kind), f"setns {kind:#x}")
        os.close(fd)
    # The kernel must not start hardening (and writing to the channel) before the server has
    # its pidfd and this process is gone: it waits for one byte on this pipe.
    rd, wr = os.pipe()
    pid = os.fork()
    if pid:
        os.close(rd)
        _send_line(chan, {"type": "child", "pid": pid})
        _expect(chan, b"ok")
        os.write(wr, b"x")
        os._exit(0)
    os.close(wr)
    os.read(rd, 1)
    os.close(rd)
    _kernel(plan, chan)


def _kernel(plan, chan):
    import ringfence_kernel

    try:
        _harden(plan, chan)
        try:
            os.chdir(plan["cwd"])
        except OSError as e:
            # The client's cwd: the server answers 400 with this, not an internal error.
            raise EntryFailed("cwd", e.strerror or str(e)) from None
    except (OSError, EntryFailed) as e:
        step = getattr(e, "step", "enter")
        _send_line(chan, {"type": "entry_failed", "step": step, "message": str(e)})
        os._exit(1)
    os.environ.clear()
    os.environ.update(plan["env"])
    # The fork server's stdio is the server's: the sandbox's /dev/null replaces it.
    null = os.open("/dev/null", os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)
    fd = chan.detach()
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 16)
    ringfence_kernel.after_fork()
    ringfence_kernel.serve_fd(fd, lang=plan.get("lang", "python"))
    os._exit(0)


def _child(msg, fds):
    try:
        plan = json.loads(msg)
        chan = socket.socket(fileno=fds[0])
        ns_fds = fds[1:]
        if len(ns_fds) != len(NAMESPACES):
            raise EntryFailed("plan", f"{len(ns_fds)} namespace descriptors")
        # Defaults, not the fork server's choices, for everything user code may rely on.
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as CPython sets it at start-up
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _prctl(PR_SET_PDEATHSIG, 0, "pdeathsig")
        _enter(plan, chan, ns_fds)
    except BaseException as e:  # noqa: BLE001 - any failure ends this child, reported
        try:
            _send_line(chan, {"type": "entry_failed", "step": "enter", "message": str(e)})
        except Exception:  # noqa: BLE001
            pass
    os._exit(1)


def main():
    path = sys.argv[1]
    import ringfence_kernel

    ringfence_kernel.preload()
    # Keep the preloaded heap out of the collector's reach: a collection in a child would
    # otherwise touch (and so copy) every page of it.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ctl.connect(path)
    ctl.send(json.dumps({"type": "ready", "pid": os.getpid()}).encode())
    while True:
        msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 16)
        if not msg:
            return
        pid = os.fork()
        if pid == 0:
            ctl.close()
            _child(msg, fds)
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    main()
