"""Template builds through the unmodified SDK (`e2b` 2.63's `Template`): steps (from_template,
run_cmd, copy of local files, set_envs, set_workdir, set_user), the second build fully cached,
skip_cache() from one step on,
build logs and status, a failing step, aliases/tags/exists, a sandbox from the template, a
start command with wait_for_port / wait_for_file, another tenant's view, delete.

The base is `rf-busybox`, which scripts/conformance.sh builds with `ringfence template build`
(Debian's static busybox with its applets linked, and a `/bin/bash` that runs busybox's sh,
since the SDK's commands run `/bin/bash -l -c`). Busybox has no `ss`, which `wait_for_port`
calls: the template below puts a small `ss` in /usr/local/bin that answers from busybox's
netstat, so the helper's own command line runs unchanged.
"""

import os
import sys
import tempfile
import time

from checks import check
from e2b import Sandbox, Template, wait_for_file, wait_for_port
from e2b.exceptions import BuildException, NotFoundException, SandboxException, TemplateException

BASE = "rf-busybox"
NAME = f"sdk-tmpl-{os.getpid()}"
OTHER_KEY = os.environ["E2B_API_KEY_2"]

SS_SHIM = r"""#!/bin/sh
# ss -Htuln sport = :PORT, answered from busybox netstat (a listening socket's line, or nothing)
for a; do last=$a; done
netstat -tuln | grep "${last}[[:space:]]"
exit 0
"""


def raises(fn, exc=Exception):
    try:
        fn()
    except exc as e:
        return e
    return None


def main():
    if not Template.exists(BASE):
        print(f"SKIPPED templates.py: no {BASE} template (scripts/conformance.sh builds it "
              "from /bin/busybox, package busybox-static)")
        return
    ctx = tempfile.mkdtemp()
    os.makedirs(os.path.join(ctx, "app", "sub"))
    with open(os.path.join(ctx, "app", "hello.txt"), "w") as f:
        f.write("hello from the context\n")
    with open(os.path.join(ctx, "app", "sub", "deep.txt"), "w") as f:
        f.write("deep\n")
    with open(os.path.join(ctx, "ss"), "w") as f:
        f.write(SS_SHIM)

    def template():
        return (
            Template(file_context_path=ctx)
            .from_template(BASE)
            .run_cmd("mkdir -p /opt/made && echo built > /opt/made/by-run")
            .copy("app", "/opt/app/")
            .copy("ss", "/usr/local/bin/ss", mode=0o755)
            .set_envs({"GREETING": "hi there", "QUOTED": 'a "b" $c'})
            .set_workdir("/opt/app")
            .run_cmd("pwd > /opt/made/workdir && echo \"$GREETING\" > /opt/made/env")
            .set_user("user")
            .run_cmd("id -u > /home/user/uid")
            .run_cmd("id -u > /opt/made/uid-root", user="root")
            .set_user("root")
        )

    logs = []
    t0 = time.time()
    info = Template.build(template(), NAME, on_build_logs=logs.append)
    cold = time.time() - t0
    messages = [str(getattr(l, "message", l)) for l in logs]
    check("templates: build returns ids", info.template_id == NAME and info.build_id, info)
    check("templates: build logs name the steps", any("RUN" in m for m in messages)
          and any("DONE" in m for m in messages), messages[-10:])

    t0 = time.time()
    logs2 = []
    Template.build(template(), NAME, on_build_logs=logs2.append)
    warm = time.time() - t0
    m2 = [str(getattr(l, "message", l)) for l in logs2]
    check("templates: the second build is fully cached",
          any("CACHED" in m for m in m2) and not any("DONE" in m for m in m2), m2[-12:])
    check("templates: and fast", warm < 5, f"cold {cold:.2f}s, cached {warm:.2f}s")
    print(f"     build through the API: cold {cold:.2f}s, cached {warm:.2f}s")

    # skip_cache() mid-template: that step and those after it rerun; the earlier one stays
    # cached (E2B's semantics: the SDK marks the next step `force`).
    def partly(skip):
        t = Template(file_context_path=ctx).from_template(BASE).run_cmd("echo a > /a")
        t = t.skip_cache() if skip else t
        return t.run_cmd("echo b > /b").run_cmd("echo c > /c")

    Template.build(partly(False), f"{NAME}-skip")
    logs3 = []
    Template.build(partly(True), f"{NAME}-skip", on_build_logs=logs3.append)
    m3 = [str(getattr(l, "message", l)) for l in logs3]
    check("templates: skip_cache() reruns from its step on, the steps before stay cached",
          any(m.startswith("[2/4] CACHED") for m in m3)
          and any(m.startswith("[3/4] DONE") for m in m3)
          and any(m.startswith("[4/4] DONE") for m in m3), m3[-12:])

    # build_in_background + get_build_status with logs_offset
    bg = Template.build_in_background(template(), f"{NAME}:bg")
    for _ in range(300):
        st = Template.get_build_status(bg, logs_offset=0)
        if st.status.value in ("ready", "error"):
            break
        time.sleep(0.2)
    check("templates: build_in_background ends ready", st.status.value == "ready", st)
    later = Template.get_build_status(bg, logs_offset=len(st.log_entries))
    check("templates: logs_offset skips the logs read", len(later.log_entries) == 0
          and len(st.log_entries) > 0, (len(st.log_entries), len(later.log_entries)))

    # Two builds of one template at once: run one after the other, both end ready.
    slow = Template(file_context_path=ctx).from_template(BASE).skip_cache().run_cmd("sleep 1")
    a = Template.build_in_background(slow, f"{NAME}-twice:a")
    b = Template.build_in_background(slow, f"{NAME}-twice:b")
    t0 = time.time()
    ends = {}
    while len(ends) < 2 and time.time() - t0 < 60:
        for k, bi in (("a", a), ("b", b)):
            s = Template.get_build_status(bi, logs_offset=0)
            if s.status.value in ("ready", "error") and k not in ends:
                ends[k] = (s.status.value, time.time() - t0)
        time.sleep(0.1)
    check("templates: concurrent builds of one template both end ready, one after the other",
          [v[0] for v in ends.values()] == ["ready", "ready"]
          and abs(ends["a"][1] - ends["b"][1]) >= 0.9, ends)

    # A failing step: error with the step's output; nothing registered under its name.
    failing = Template(file_context_path=ctx).from_template(BASE).run_cmd(
        "echo about to fail; echo oops >&2; exit 3")
    e = raises(lambda: Template.build(failing, f"{NAME}-broken"), BuildException)
    check("templates: a failing step raises BuildException with its output and exit code",
          e is not None and "exit code 3" in str(e) and "oops" in str(e), e)
    check("templates: a failed build registers nothing", not Template.exists(f"{NAME}-broken"))

    # exists / aliases / tags
    check("templates: exists", Template.exists(NAME))
    check("templates: exists is false for an unknown name",
          not Template.exists(f"{NAME}-nope"))
    Template.assign_tags(f"{NAME}:latest", ["v1", "stable"])
    tags = sorted(t.tag for t in Template.get_tags(NAME))
    check("templates: assign_tags then get_tags", {"latest", "v1", "stable", "bg"} <= set(tags), tags)
    Template.remove_tags(NAME, ["stable"])
    tags = sorted(t.tag for t in Template.get_tags(NAME))
    check("templates: remove_tags", "stable" not in tags and "v1" in tags, tags)
    check("templates: another key cannot see its tags",
          raises(lambda: Template.get_tags(NAME, api_key=OTHER_KEY)) is not None)
    check("templates: another key sees the name as taken (exists)",
          Template.exists(NAME, api_key=OTHER_KEY))

    # A sandbox from it sees the files and the env.
    sb = Sandbox.create(NAME)
    try:
        out = sb.commands.run("cat /opt/app/hello.txt /opt/app/sub/deep.txt /opt/made/by-run "
                              "/opt/made/workdir /opt/made/env /home/user/uid /opt/made/uid-root; "
                              "echo \"$QUOTED\"")
        check("templates: a sandbox sees the copied files, RUN's results (as set_user's user and "
              "as run_cmd's) and the env",
              out.stdout == "hello from the context\ndeep\nbuilt\n/opt/app\nhi there\n1000\n0\n"
              "a \"b\" $c\n", repr(out.stdout))
        v1 = Sandbox.create(f"{NAME}:v1")
        v1.kill()
        check("templates: a tag starts a sandbox too", True)
    finally:
        sb.kill()
    check("templates: another key cannot start a sandbox from it",
          raises(lambda: Sandbox.create(NAME, api_key=OTHER_KEY)) is not None)

    # Start command + ready check.
    served = (
        Template(file_context_path=ctx)
        .from_template(NAME)
        .run_cmd("mkdir -p /srv && echo served > /srv/index.html")
        .set_start_cmd("httpd -f -p 8000 -h /srv", wait_for_port(8000))
    )
    Template.build(served, f"{NAME}-srv")
    sb = Sandbox.create(f"{NAME}-srv")
    try:
        out = sb.commands.run("wget -qO- http://127.0.0.1:8000/index.html")
        check("templates: create answered once wait_for_port passed: the server answers",
              out.stdout == "served\n", repr(out.stdout))
    finally:
        sb.kill()
    marker = (
        Template(file_context_path=ctx)
        .from_template(NAME)
        .set_start_cmd("sleep 1; touch /tmp/ready-marker; sleep 1000", wait_for_file("/tmp/ready-marker"))
    )
    Template.build(marker, f"{NAME}-file")
    t0 = time.time()
    sb = Sandbox.create(f"{NAME}-file")
    try:
        took = time.time() - t0
        out = sb.commands.run("ls /tmp/ready-marker")
        check("templates: wait_for_file: create waited for the file", took >= 1 and out.exit_code == 0,
              f"{took:.2f}s")
    finally:
        sb.kill()
    dead = (
        Template(file_context_path=ctx)
        .from_template(NAME)
        .set_start_cmd("echo cannot start; exit 4", wait_for_file("/tmp/never"))
    )
    Template.build(dead, f"{NAME}-dead")
    e = raises(lambda: Sandbox.create(f"{NAME}-dead"))
    check("templates: a start command that dies fails create with its output",
          e is not None and "cannot start" in str(e) and "exit code 4" in str(e), e)

    # Delete: every tag goes; another key cannot delete.
    from e2b.api.client_sync import get_api_client
    from e2b.connection_config import ConnectionConfig
    from e2b.api.client.api.templates import delete_templates_template_id

    def delete(name, key=None):
        cfg = ConnectionConfig(api_key=key) if key else ConnectionConfig()
        return delete_templates_template_id.sync_detailed(template_id=name, client=get_api_client(cfg))

    check("templates: another key cannot delete it", delete(NAME, OTHER_KEY).status_code == 404)
    for n in (f"{NAME}-srv", f"{NAME}-file", f"{NAME}-dead", f"{NAME}-twice", f"{NAME}-skip", NAME):
        r = delete(n)
        check(f"templates: delete {n}", r.status_code == 204, r.status_code)
    check("templates: deleted templates do not exist", not Template.exists(NAME))
    check("templates: a sandbox cannot start from a deleted one",
          raises(lambda: Sandbox.create(f"{NAME}:v1")) is not None)


if __name__ == "__main__":
    main()
