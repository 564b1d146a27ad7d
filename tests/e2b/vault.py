# Named vault.py, not secrets.py: that would shadow the standard library module the SDK imports.
"""Secrets through the unmodified SDK: `Secret.create/get_info/list/exists/update/destroy`
(values write-only, per API key), and `network.rules` naming them on `Sandbox.create` and
`update_network`: the sandbox gets its egress CA in its trust store and only ever sees the
placeholder.

What the proxy does with the value on the wire (substitution for the rule's host only, the
hostile cases) needs a stand-in for the internet, which this suite's server has not: that is
tests/e2b/vault_hostile.py (its own server and stand-in, through this SDK), and the Rust tests
crates/net/tests/egress.rs (`secrets_reach_only_their_hosts`) and
crates/server/tests/network.rs (`secrets_at_egress_in_a_sandbox`).
"""

import os

from checks import check
from e2b import Sandbox, Secret
from e2b.exceptions import SecretNotFoundException

VALUE = "sk-conformance-0123456789abcdef"


def raises(fn, exc=Exception):
    try:
        fn()
    except exc as e:
        return e
    return None


def main():
    for s in Secret.list().next_items():
        if s.name.startswith("conf-"):
            Secret.destroy(s.secret_id)
    info = Secret.create("Conf-Token", VALUE, metadata={"team": "qa"})
    check("secrets: create returns metadata, version 1, a lower-cased name",
          info.secret_id.startswith("sec_") and info.name == "conf-token" and info.version == 1
          and info.metadata == {"team": "qa"}, info)
    check("secrets: a second secret of the same name is refused",
          raises(lambda: Secret.create("conf-token", "x")) is not None)
    check("secrets: a name that would break the placeholder is refused (by the SDK or us)",
          raises(lambda: Secret.create("a}b", "x")) is not None)
    check("secrets: a value with a line break (header injection) is refused",
          raises(lambda: Secret.create("conf-crlf", "a\r\nX-Evil: 1")) is not None)
    got = Secret.get_info("conf-token")
    check("secrets: get_info by name", got.secret_id == info.secret_id, got)
    check("secrets: get_info by id", Secret.get_info(info.secret_id).name == "conf-token")
    check("secrets: the value is in no read", VALUE not in repr(got) and VALUE not in repr(Secret.list().next_items()))
    check("secrets: exists", Secret.exists("conf-token") and not Secret.exists("conf-nope"))
    other = raises(lambda: Secret.get_info("conf-token", api_key=os.environ["E2B_API_KEY_2"]),
                   SecretNotFoundException)
    check("secrets: another key cannot see it", other is not None)
    check("secrets: another key cannot destroy it",
          Secret.destroy("conf-token", api_key=os.environ["E2B_API_KEY_2"]) is False
          and Secret.exists("conf-token"))
    up = Secret.update("conf-token", VALUE + "-v2", metadata={"team": "ops"})
    check("secrets: update makes version 2 and replaces metadata",
          up.version == 2 and up.metadata == {"team": "ops"}, up)
    for i in range(3):
        Secret.create(f"conf-page-{i}", "v")
    pager = Secret.list(limit=2)
    names = []
    while pager.has_next:
        names += [s.name for s in pager.next_items()]
    check("secrets: list pages through every secret",
          {"conf-token", "conf-page-0", "conf-page-1", "conf-page-2"} <= set(names), names)

    placeholder = Secret.fill("conf-token")
    rules = {"api.example.com": [{"transform": {"headers": {"Authorization": f"Bearer {placeholder}"}}}]}
    sbx = Sandbox.create(envs={"TOKEN": placeholder}, network={"rules": rules})
    try:
        net = Sandbox.get_info(sbx.sandbox_id)
        r = sbx.commands.run("echo $TOKEN; echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS; "
                             "grep -c 'BEGIN CERTIFICATE' /var/lib/ringfence/egress-ca.pem; "
                             "openssl x509 -noout -subject -in /var/lib/ringfence/egress-ca.pem 2>/dev/null || true")
        out = r.stdout
        check("secrets: the sandbox's env holds the placeholder, not the value",
              placeholder in out and VALUE not in out, out)
        check("secrets: its TLS clients point at its own trust store",
              "/var/lib/ringfence/ca-bundle.pem /var/lib/ringfence/ca-bundle.pem /var/lib/ringfence/egress-ca.pem" in out, out)
        check("secrets: its egress CA is installed", "\n1\n" in out, out)
        r = sbx.commands.run("grep -rl 'sk-conformance' /etc /home /tmp 2>/dev/null; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c sk-conformance; true")
        check("secrets: the value is in no file or process environment", VALUE not in r.stdout and r.stdout.strip().endswith("0"), r.stdout)
        sbx.update_network({"rules": {"*.example.org": [{"transform": {"headers": {"X-Team": "qa"}}}]}})
        check("secrets: update_network replaces the rules", True)
        bad = raises(lambda: sbx.update_network({"rules": {"*": [{"transform": {"headers": {"a": "b"}}}]}}))
        check("secrets: a bare '*' rule is refused with the reason", bad is not None and "rules" in str(bad), bad)
        proxy = raises(lambda: Sandbox.create(network={"egress_proxy": {"address": "127.0.0.1:1080"}}))
        check("secrets: an egressProxy on the host's loopback is refused with 400 naming it",
              proxy is not None and "egressProxy" in str(proxy) and "127.0.0.1" in str(proxy), proxy)
    finally:
        sbx.kill()
    check("secrets: destroy", Secret.destroy("conf-token") is True and not Secret.exists("conf-token"))
    check("secrets: destroy again is False", Secret.destroy("conf-token") is False)
    for i in range(3):
        Secret.destroy(f"conf-page-{i}")


if __name__ == "__main__":
    main()
