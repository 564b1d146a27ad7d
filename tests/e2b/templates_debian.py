"""`pip_install` and `apt_install` of the unmodified SDK's `Template` (e2b 2.63), built on the
Debian base (`ringfence template bootstrap`): the SDK turns each into a RUN step as root
(`apt-get update` + `apt-get install -y ...`; `pip install ...`), which reaches Debian's archive
and PyPI through the operator's build egress; a sandbox from the result runs the installed
command and imports the installed module, as `user`.

The base has no pip (E2B's base image does): the template installs `python3-pip` with
`apt_install` first, and sets `PIP_BREAK_SYSTEM_PACKAGES=1` (Debian 12's Python is marked
externally managed, PEP 668, so a system-wide `pip install` is refused without it).

SLOW: an `apt-get update` and two downloads (about 30-60 s here). The base comes into the
server's data directory from the machine's cached bootstrap as hard links (scripts/
conformance.sh: no copy); SKIPPED where there is none.
"""

import os
import shutil
import tempfile
import time

from checks import check
from e2b import Sandbox, Template

BASE = os.environ.get("RF_DEBIAN_TEMPLATE", "rf-debian")
NAME = f"sdk-debian-{os.getpid()}"


def main():
    if not Template.exists(BASE):
        print(f"SKIPPED templates_debian.py: no {BASE} template (scripts/conformance.sh links it "
              "from the Debian base the cargo tests bootstrap, /var/cache/ringfence-test/debian)")
        return
    # pip checks PyPI's certificate against the CAs of the template, and hosts that reach PyPI
    # through a TLS-inspecting proxy (this development host does) trust that proxy's CA only in
    # their own bundle: the build gets the host's bundle. Where the host's bundle is Debian's
    # stock one (CI), this changes nothing.
    ctx = tempfile.mkdtemp()
    host_ca = os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    shutil.copy(host_ca, os.path.join(ctx, "host-ca.crt"))
    t = (
        Template(file_context_path=ctx)
        .from_template(BASE)
        .apt_install(["jq", "python3-pip"], no_install_recommends=True)
        .copy("host-ca.crt", "/usr/local/share/ringfence-test/host-ca.crt")
        .set_envs({"PIP_BREAK_SYSTEM_PACKAGES": "1",
                   "PIP_CERT": "/usr/local/share/ringfence-test/host-ca.crt"})
        .pip_install("tomli-w")
    )
    logs = []
    t0 = time.time()
    info = Template.build(t, NAME, on_build_logs=logs.append)
    took = time.time() - t0
    messages = [str(getattr(l, "message", l)) for l in logs]
    check("templates (debian): apt_install and pip_install build", info.template_id == NAME,
          messages[-10:])
    check("templates (debian): the steps ran apt-get and pip",
          any("apt-get install" in m for m in messages) and any("pip install" in m for m in messages),
          messages[-20:])
    print(f"     apt_install + pip_install build on the Debian base: {took:.1f}s")

    sb = Sandbox.create(NAME, timeout=120)
    try:
        r = sb.commands.run("jq --version && echo '{\"a\": 42}' | jq .a")
        check("templates (debian): the apt package runs in a sandbox",
              r.exit_code == 0 and r.stdout.startswith("jq-") and r.stdout.endswith("42\n"), r)
        r = sb.commands.run("python3 -c 'import tomli_w; print(tomli_w.dumps({\"k\": 1}), end=\"\")'")
        check("templates (debian): the pip package imports in a sandbox",
              r.exit_code == 0 and r.stdout == "k = 1\n", r)
        r = sb.commands.run("id -un")
        check("templates (debian): as the sandbox's user", r.stdout.strip() == "user", r)
    finally:
        sb.kill()


if __name__ == "__main__":
    main()
