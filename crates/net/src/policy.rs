//! The egress policy: what a sandbox may connect to, and why (not).
//!
//! Two layers, evaluated in this order:
//!
//! 1. the operator's **ceiling** (`ringfence serve` flags), which no request can widen:
//!    built-in blocked ranges (private, loopback, link-local and metadata, CGNAT, multicast,
//!    reserved, the host's own addresses) unless explicitly exempted, the operator's deny
//!    rules, and, when set, the operator's allowlist;
//! 2. the sandbox's own **policy** (E2B's `allow_internet_access`, `network.allowOut`,
//!    `network.denyOut`): when both an `allowOut` and a `denyOut` rule match, the more
//!    specific one decides (an exact name over a `*.` wildcard over an address block, longer
//!    suffixes and prefixes over shorter, a rule with a port over one without) and **deny wins
//!    a tie**; with no match, internet access decides. E2B's documented allowlist idiom
//!    (`allowOut: [host], denyOut: [0.0.0.0/0]`) works because a name beats the whole address
//!    space, and `allowOut: [0.0.0.0/0], denyOut: [evil.test]` denies `evil.test` (under E2B's
//!    "allow always wins" it would not).
//!
//! A request can therefore only narrow what the operator allows: its allows are evaluated
//! only after the ceiling has let the destination through.
//!
//! Domain rules never match on an address alone. A connection's name is the one the client
//! itself presented (TLS SNI, HTTP `Host`), and it counts only if the sandbox's own resolver
//! returned the connection's address for that name ("pinned"); a TLS or HTTP client that names
//! nothing (or an IP literal) is a direct-IP connection and matches only address rules. For
//! protocols we cannot read, the names our resolver returned for the address stand in.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A rule that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network rule {rule:?}: {why}")]
pub struct RuleError {
    pub rule: String,
    pub why: &'static str,
}

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr { addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix }
    }

    /// One address.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    /// Every address of its family (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Cidr, &'static str> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| "not an IP address or CIDR block")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or("bad prefix length")?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address it carries, so `::ffff:10.0.0.1` cannot
/// slip past a rule about `10.0.0.0/8`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// What a rule names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Exactly this name (lower case, no trailing dot).
    Domain(String),
    /// Any name strictly below this one (`*.example.com`: not `example.com` itself).
    Below(String),
    /// Any address in this block.
    Net(Cidr),
}

/// One allow or deny entry: a domain, a `*.` wildcard, an address or a CIDR block, optionally
/// with `:port` (our extension; E2B's entries have no port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    pub port: Option<u16>,
    /// As written, for reasons and for the API.
    pub text: String,
}

impl Rule {
    /// How narrowly the rule picks its targets, for settling an allow/deny conflict.
    pub fn specificity(&self) -> u32 {
        let base = match &self.target {
            Target::Domain(d) => 2000 + d.len() as u32,
            Target::Below(d) => 1000 + d.len() as u32,
            Target::Net(c) => u32::from(c.prefix),
        };
        base * 2 + u32::from(self.port.is_some())
    }

    /// The rule matches the whole address space on every port (E2B's `ALL_TRAFFIC`).
    pub fn is_everything(&self) -> bool {
        self.port.is_none() && matches!(self.target, Target::Net(c) if c.is_everything())
    }

    fn port_ok(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }

    /// Matches by address (network rules only).
    pub fn matches_addr(&self, ip: IpAddr, port: u16) -> bool {
        matches!(&self.target, Target::Net(c) if c.contains(ip)) && self.port_ok(port)
    }

    /// Matches by name (domain rules only). `port` is `None` for DNS lookups, where any port
    /// rule on the name counts.
    pub fn matches_name(&self, name: &str, port: Option<u16>) -> bool {
        let name_ok = match &self.target {
            Target::Domain(d) => name == d,
            Target::Below(d) => {
                name.len() > d.len() + 1
                    && name.ends_with(d.as_str())
                    && name.as_bytes()[name.len() - d.len() - 1] == b'.'
            }
            Target::Net(_) => false,
        };
        name_ok && port.is_none_or(|p| self.port_ok(p))
    }

    pub fn is_domain(&self) -> bool {
        !matches!(self.target, Target::Net(_))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Lower-cases a DNS name and drops a trailing dot; `None` if it is not a valid host name.
pub fn normalize_name(name: &str) -> Option<String> {
    let n = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let valid = !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // No top-level domain is all digits: `1.2.3.999` is a bad address, not a name.
        && !n.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
    valid.then_some(n)
}

impl FromStr for Rule {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Rule, RuleError> {
        let err = |why| RuleError { rule: s.to_string(), why };
        let text = s.trim();
        if text.is_empty() {
            return Err(err("empty"));
        }
        // Split off a port: `[v6]:p`, `host:p`, `cidr:p`; a bare IPv6 address has several
        // colons and no port.
        let (body, port) = if let Some(rest) = text.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(|| err("unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(p) => (inner, Some(p)),
                None if after.is_empty() => (inner, None),
                None => return Err(err("unexpected text after ']'")),
            }
        } else if text.matches(':').count() == 1 {
            let (b, p) = text.split_once(':').ok_or_else(|| err("bad port"))?;
            (b, Some(p))
        } else {
            (text, None)
        };
        let port = match port {
            Some(p) => {
                Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| err("bad port"))?)
            }
            None => None,
        };
        let target = if let Ok(c) = body.parse::<Cidr>() {
            Target::Net(c)
        } else if let Some(suffix) = body.strip_prefix("*.") {
            Target::Below(normalize_name(suffix).ok_or_else(|| err("bad domain after '*.'"))?)
        } else if body.contains('*') {
            return Err(err("a wildcard is only allowed as a leading '*.'"));
        } else if body.contains('/') || body.parse::<IpAddr>().is_ok() {
            return Err(err("not an IP address or CIDR block"));
        } else {
            Target::Domain(
                normalize_name(body).ok_or_else(|| err("not a domain, address or CIDR block"))?,
            )
        };
        Ok(Rule { target, port, text: text.to_string() })
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a list of rules, failing on the first bad one.
pub fn parse_rules<S: AsRef<str>>(items: &[S]) -> Result<Vec<Rule>, RuleError> {
    items.iter().map(|s| s.as_ref().parse()).collect()
}

/// Ranges no sandbox reaches unless the operator exempts them, with what they are.
pub const BLOCKED: &[(Cidr, &str)] = &[
    (Cidr::v4(0, 0, 0, 0, 8), "a 'this network' address"),
    (Cidr::v4(10, 0, 0, 0, 8), "a private address"),
    (Cidr::v4(100, 64, 0, 0, 10), "a carrier-grade NAT address"),
    (Cidr::v4(127, 0, 0, 0, 8), "a loopback address"),
    (Cidr::v4(169, 254, 169, 254, 32), "the cloud metadata address"),
    (Cidr::v4(169, 254, 0, 0, 16), "a link-local address"),
    (Cidr::v4(172, 16, 0, 0, 12), "a private address"),
    (Cidr::v4(192, 0, 0, 0, 24), "an IETF protocol address"),
    (Cidr::v4(192, 168, 0, 0, 16), "a private address"),
    (Cidr::v4(198, 18, 0, 0, 15), "a benchmarking address"),
    (Cidr::v4(224, 0, 0, 0, 4), "a multicast address"),
    (Cidr::v4(240, 0, 0, 0, 4), "a reserved address"),
    (Cidr { addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED), prefix: 128 }, "the unspecified address"),
    (Cidr { addr: IpAddr::V6(Ipv6Addr::LOCALHOST), prefix: 128 }, "a loopback address"),
    (
        Cidr { addr: IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)), prefix: 7 },
        "a private (ULA) address",
    ),
    (
        Cidr { addr: IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), prefix: 10 },
        "a link-local address",
    ),
    (
        Cidr { addr: IpAddr::V6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0)), prefix: 8 },
        "a multicast address",
    ),
    (
        Cidr { addr: IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), prefix: 128 },
        "the cloud metadata address",
    ),
];

/// The operator's ceiling: what sandboxes on this server may reach at most.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ceiling {
    /// `None`: anything outside the blocked ranges (the internet). `Some`: only these.
    pub allow: Option<Vec<Rule>>,
    /// Always denied, whatever a sandbox asks.
    pub deny: Vec<Rule>,
    /// Exceptions to the built-in blocked ranges (and to the host's own addresses).
    pub exempt: Vec<Cidr>,
}

/// A sandbox's own policy, in E2B's terms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPolicy {
    /// E2B's `allow_internet_access` (default true).
    pub allow_internet_access: bool,
    pub allow_out: Vec<Rule>,
    pub deny_out: Vec<Rule>,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy { allow_internet_access: true, allow_out: Vec::new(), deny_out: Vec::new() }
    }
}

impl SandboxPolicy {
    /// Nothing can ever be allowed (`allow_internet_access: false` and no `allowOut`).
    pub fn is_none(&self) -> bool {
        self.allow_out.is_empty() && (!self.allow_internet_access || self.denies_everything())
    }

    fn denies_everything(&self) -> bool {
        self.deny_out
            .iter()
            .any(|r| r.is_everything() && matches!(r.target, Target::Net(c) if c.addr.is_ipv4()))
    }

    /// Everything not allowed by `allowOut` is denied: resolving other names would only open a
    /// channel out (names carry data to whoever serves their zone), so they are refused.
    fn allowlist_only(&self) -> bool {
        !self.allow_internet_access || self.denies_everything()
    }
}

/// How a connection named its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Naming {
    /// The client presented this name (TLS SNI or HTTP `Host`); `pinned` when the sandbox's
    /// resolver returned the connection's address for it.
    Claimed { name: String, pinned: bool },
    /// A TLS or HTTP client that named no host (or an IP literal): a direct-IP connection.
    Unnamed,
    /// A protocol we cannot read: the names the sandbox's resolver returned for the address.
    Resolved(Vec<String>),
}

/// A connection attempt to judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    pub ip: IpAddr,
    pub port: u16,
    pub naming: Naming,
}

impl Dest {
    /// Names that may satisfy an allow rule.
    fn allow_names(&self) -> &[String] {
        match &self.naming {
            Naming::Claimed { name, pinned: true } => std::slice::from_ref(name),
            Naming::Resolved(names) => names,
            _ => &[],
        }
    }

    /// Names that trigger a deny rule: a claimed name counts even when it is not pinned.
    fn deny_names(&self) -> &[String] {
        match &self.naming {
            Naming::Claimed { name, .. } => std::slice::from_ref(name),
            Naming::Resolved(names) => names,
            Naming::Unnamed => &[],
        }
    }

    /// The name to show: the claimed one, else the first resolved one.
    pub fn name(&self) -> Option<&str> {
        match &self.naming {
            Naming::Claimed { name, .. } => Some(name),
            Naming::Resolved(names) => names.first().map(String::as_str),
            Naming::Unnamed => None,
        }
    }

    fn describe(&self) -> String {
        let addr = match self.ip {
            IpAddr::V6(v6) => format!("[{v6}]:{}", self.port),
            v4 => format!("{v4}:{}", self.port),
        };
        match self.name() {
            Some(n) => format!("{n} ({addr})"),
            None => addr,
        }
    }

    fn matches(&self, r: &Rule, names: &[String]) -> bool {
        r.matches_addr(self.ip, self.port)
            || names.iter().any(|n| r.matches_name(n, Some(self.port)))
    }
}

/// A decision and the sentence that explains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: String,
}

impl Verdict {
    fn allow(reason: String) -> Verdict {
        Verdict { allowed: true, reason: format!("allowed: {reason}") }
    }
    fn deny(reason: String) -> Verdict {
        Verdict { allowed: false, reason: format!("denied: {reason}") }
    }
}

impl Ceiling {
    /// Why `ip` is never reachable (a blocked range or one of `own` addresses, not exempted).
    pub fn blocked(&self, ip: IpAddr, own: &[IpAddr]) -> Option<String> {
        let ip = canonical(ip);
        if self.exempt.iter().any(|c| c.contains(ip)) {
            return None;
        }
        if own.iter().any(|o| canonical(*o) == ip) {
            return Some(format!("{ip} is an address of this host"));
        }
        BLOCKED
            .iter()
            .find(|(c, _)| c.contains(ip))
            .map(|(c, what)| format!("{ip} is {what} ({c})"))
    }
}

/// The most specific of `rules` that matches `dest`.
fn most_specific<'a>(dest: &Dest, rules: &'a [Rule], names: &[String]) -> Option<&'a Rule> {
    rules.iter().filter(|r| dest.matches(r, names)).max_by_key(|r| r.specificity())
}

/// Judges a connection. `own` are the host's (and the sandbox gateway's) addresses.
pub fn decide(ceiling: &Ceiling, own: &[IpAddr], policy: &SandboxPolicy, dest: &Dest) -> Verdict {
    let what = dest.describe();
    if let Some(why) = ceiling.blocked(dest.ip, own) {
        return Verdict::deny(format!(
            "{what}: {why}, which this server never lets sandboxes reach"
        ));
    }
    if let Some(r) = ceiling.deny.iter().find(|r| dest.matches(r, dest.deny_names())) {
        return Verdict::deny(format!("{what} matches the server's deny rule {r}"));
    }
    if let Some(allow) = &ceiling.allow
        && !allow.iter().any(|r| dest.matches(r, dest.allow_names()))
    {
        return Verdict::deny(format!("{what} is not in the server's allowlist"));
    }
    let allow = most_specific(dest, &policy.allow_out, dest.allow_names());
    let deny = most_specific(dest, &policy.deny_out, dest.deny_names());
    match (allow, deny) {
        (Some(a), Some(d)) if d.specificity() >= a.specificity() => {
            return Verdict::deny(format!(
                "{what} matches denyOut {d}, which is at least as specific as allowOut {a}"
            ));
        }
        (Some(a), _) => return Verdict::allow(format!("{what} matches allowOut {a}")),
        _ => {}
    }
    // A claimed name that an allow rule names, at an address the resolver never gave for it:
    // say so, it is the one case where the rule looks like it should have matched.
    let unpinned = match &dest.naming {
        Naming::Claimed { name, pinned: false } => {
            policy.allow_out.iter().find(|r| r.matches_name(name, Some(dest.port)))
        }
        _ => None,
    };
    let deny = policy.deny_out.iter().find(|r| dest.matches(r, dest.deny_names()));
    let refused = match (unpinned, deny) {
        (Some(r), _) => Some(format!(
            "{what}: {} is in allowOut ({r}), but the sandbox's resolver never returned {} for it",
            dest.name().unwrap_or_default(),
            dest.ip
        )),
        (None, Some(r)) => Some(format!("{what} is not in allowOut and matches denyOut {r}")),
        (None, None) if !policy.allow_internet_access => {
            Some(format!("{what} is not in allowOut (internet access is off)"))
        }
        (None, None) => None,
    };
    match refused {
        Some(why) => Verdict::deny(why),
        None => Verdict::allow(format!("{what}: internet access")),
    }
}

/// Judges a DNS lookup of `name` (normalized). Lookups are refused when no connection to the
/// name could be allowed by name: in allowlist mode that is any name no domain rule allows.
pub fn decide_lookup(ceiling: &Ceiling, policy: &SandboxPolicy, name: &str) -> Verdict {
    if let Some(r) = ceiling.deny.iter().find(|r| r.matches_name(name, None)) {
        return Verdict::deny(format!("lookup of {name} matches the server's deny rule {r}"));
    }
    if let Some(allow) = &ceiling.allow
        && !allow.iter().any(|r| r.matches_name(name, None))
    {
        return Verdict::deny(format!(
            "lookup of {name}: the name is not in the server's allowlist"
        ));
    }
    let allow = policy
        .allow_out
        .iter()
        .filter(|r| r.matches_name(name, None))
        .max_by_key(|r| r.specificity());
    let deny = policy
        .deny_out
        .iter()
        .filter(|r| r.matches_name(name, None))
        .max_by_key(|r| r.specificity());
    match (allow, deny) {
        (Some(a), Some(d)) if d.specificity() >= a.specificity() => {
            return Verdict::deny(format!(
                "lookup of {name} matches denyOut {d} (over allowOut {a})"
            ));
        }
        (Some(a), _) => return Verdict::allow(format!("lookup of {name} matches allowOut {a}")),
        (None, Some(d)) => return Verdict::deny(format!("lookup of {name} matches denyOut {d}")),
        (None, None) => {}
    }
    if policy.allowlist_only() {
        return Verdict::deny(format!("lookup of {name}: the name is not in allowOut"));
    }
    Verdict::allow(format!("lookup of {name}: internet access"))
}

/// True when no connection to `ip:port` can be allowed whatever name it carries, so it can
/// be refused at the SYN (before any byte is read). `Some(verdict)` then.
pub fn refuse_early(
    ceiling: &Ceiling,
    own: &[IpAddr],
    policy: &SandboxPolicy,
    ip: IpAddr,
    port: u16,
) -> Option<Verdict> {
    let dest = Dest { ip, port, naming: Naming::Unnamed };
    if ceiling.blocked(ip, own).is_some() || policy.is_none() {
        return Some(decide(ceiling, own, policy, &dest));
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rules(r: &[&str]) -> Vec<Rule> {
        parse_rules(r).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn claimed(name: &str, pinned: bool) -> Naming {
        Naming::Claimed { name: name.into(), pinned }
    }

    #[test]
    fn rules_parse() {
        let r: Rule = "*.Example.COM:443".parse().unwrap();
        assert_eq!(r.target, Target::Below("example.com".into()));
        assert_eq!(r.port, Some(443));
        let r: Rule = "10.0.0.0/8".parse().unwrap();
        assert_eq!(r.target, Target::Net(Cidr::v4(10, 0, 0, 0, 8)));
        let r: Rule = "[2001:db8::1]:22".parse().unwrap();
        assert_eq!(r.port, Some(22));
        let r: Rule = "2001:db8::/32".parse().unwrap();
        assert!(matches!(r.target, Target::Net(_)) && r.port.is_none());
        let r: Rule = "8.8.8.8".parse().unwrap();
        assert!(r.matches_addr(ip("8.8.8.8"), 53));
        assert!("0.0.0.0/0".parse::<Rule>().unwrap().is_everything());
        for bad in ["", "*", "a*.b", "1.2.3.4/40", "x:0", "x:99999", "-/-", "1.2.3.999"] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_match_below_only() {
        let r: Rule = "*.example.com".parse().unwrap();
        assert!(r.matches_name("a.example.com", Some(1)));
        assert!(r.matches_name("a.b.example.com", None));
        assert!(!r.matches_name("example.com", None));
        assert!(!r.matches_name("badexample.com", None));
    }

    #[test]
    fn mapped_addresses_are_their_ipv4() {
        let c = Ceiling::default();
        assert!(c.blocked(ip("::ffff:10.1.2.3"), &[]).is_some());
        assert!(c.blocked(ip("169.254.169.254"), &[]).unwrap().contains("metadata"));
        assert!(c.blocked(ip("203.0.113.9"), &[]).is_none());
        assert!(c.blocked(ip("203.0.113.9"), &[ip("203.0.113.9")]).unwrap().contains("this host"));
        let exempt = Ceiling { exempt: vec!["10.1.0.0/16".parse().unwrap()], ..Ceiling::default() };
        assert!(exempt.blocked(ip("10.1.2.3"), &[]).is_none());
        assert!(exempt.blocked(ip("10.2.0.1"), &[]).is_some());
    }

    #[test]
    fn the_more_specific_rule_decides_and_deny_wins_ties() {
        let c = Ceiling::default();
        let at = |naming| Dest { ip: ip("203.0.113.10"), port: 443, naming };
        // Allow everything but one name: the name is more specific than the whole space.
        let p = SandboxPolicy {
            allow_internet_access: true,
            allow_out: rules(&["0.0.0.0/0"]),
            deny_out: rules(&["evil.test"]),
        };
        let v = decide(&c, &[], &p, &at(claimed("evil.test", true)));
        assert!(!v.allowed && v.reason.contains("denyOut evil.test"), "{}", v.reason);
        assert!(decide(&c, &[], &p, &at(claimed("good.test", true))).allowed);
        assert!(!decide_lookup(&c, &p, "evil.test").allowed);
        // The same rule on both sides: deny takes precedence.
        let p = SandboxPolicy {
            allow_internet_access: true,
            allow_out: rules(&["*.corp.test"]),
            deny_out: rules(&["*.corp.test"]),
        };
        let v = decide(&c, &[], &p, &at(claimed("a.corp.test", true)));
        assert!(!v.allowed && v.reason.contains("at least as specific"), "{}", v.reason);
        assert!(!decide_lookup(&c, &p, "a.corp.test").allowed);
        // A narrower deny inside a broader allow.
        let p = SandboxPolicy {
            allow_internet_access: false,
            allow_out: rules(&["203.0.113.0/24"]),
            deny_out: rules(&["203.0.113.10/32"]),
        };
        assert!(!decide(&c, &[], &p, &at(Naming::Unnamed)).allowed);
        let other = Dest { ip: ip("203.0.113.11"), port: 443, naming: Naming::Unnamed };
        assert!(decide(&c, &[], &p, &other).allowed);
    }

    #[test]
    fn e2b_allowlist_idiom() {
        let c = Ceiling::default();
        let p = SandboxPolicy {
            allow_internet_access: true,
            allow_out: rules(&["www.allowed.test"]),
            deny_out: rules(&["0.0.0.0/0"]),
        };
        let at = |naming| Dest { ip: ip("203.0.113.10"), port: 443, naming };
        let v = decide(&c, &[], &p, &at(claimed("www.allowed.test", true)));
        assert!(v.allowed, "{}", v.reason);
        let v = decide(&c, &[], &p, &at(claimed("www.allowed.test", false)));
        assert!(!v.allowed && v.reason.contains("never returned"), "{}", v.reason);
        let v = decide(&c, &[], &p, &at(claimed("other.test", true)));
        assert!(!v.allowed && v.reason.contains("other.test"), "{}", v.reason);
        let v = decide(&c, &[], &p, &at(Naming::Unnamed));
        assert!(!v.allowed && v.reason.contains("denyOut 0.0.0.0/0"), "{}", v.reason);
        let v = decide(&c, &[], &p, &at(Naming::Resolved(vec!["www.allowed.test".into()])));
        assert!(v.allowed);
        assert!(decide_lookup(&c, &p, "www.allowed.test").allowed);
        assert!(!decide_lookup(&c, &p, "exfil.attacker.test").allowed);
    }

    #[test]
    fn ceiling_beats_allow_out() {
        let c = Ceiling::default();
        let p =
            SandboxPolicy { allow_out: rules(&["10.0.0.0/8", "0.0.0.0/0"]), ..Default::default() };
        let d = Dest { ip: ip("10.1.1.1"), port: 80, naming: Naming::Unnamed };
        let v = decide(&c, &[], &p, &d);
        assert!(!v.allowed && v.reason.contains("private"), "{}", v.reason);
        let c = Ceiling { deny: rules(&["*.bad.test"]), ..Ceiling::default() };
        let d = Dest { ip: ip("203.0.113.1"), port: 80, naming: claimed("x.bad.test", false) };
        assert!(!decide(&c, &[], &p, &d).allowed);
        let c = Ceiling { allow: Some(rules(&["pypi.test:443"])), ..Ceiling::default() };
        let d = Dest { ip: ip("203.0.113.1"), port: 443, naming: claimed("pypi.test", true) };
        assert!(decide(&c, &[], &SandboxPolicy::default(), &d).allowed);
        let d = Dest { port: 80, ..d };
        assert!(!decide(&c, &[], &SandboxPolicy::default(), &d).allowed);
        assert!(!decide_lookup(&c, &SandboxPolicy::default(), "other.test").allowed);
    }

    #[test]
    fn internet_off_and_ports() {
        let c = Ceiling::default();
        let none = SandboxPolicy { allow_internet_access: false, ..Default::default() };
        assert!(none.is_none());
        assert!(refuse_early(&c, &[], &none, ip("203.0.113.1"), 80).is_some());
        assert!(!decide_lookup(&c, &none, "a.test").allowed);
        let p = SandboxPolicy {
            allow_internet_access: false,
            allow_out: rules(&["203.0.113.0/24:443"]),
            deny_out: vec![],
        };
        assert!(refuse_early(&c, &[], &p, ip("203.0.113.1"), 80).is_none());
        let d = |port| Dest { ip: ip("203.0.113.1"), port, naming: Naming::Unnamed };
        assert!(decide(&c, &[], &p, &d(443)).allowed);
        let v = decide(&c, &[], &p, &d(80));
        assert!(!v.allowed && v.reason.contains("internet access is off"), "{}", v.reason);
        let open = SandboxPolicy::default();
        assert!(decide(&c, &[], &open, &d(80)).allowed);
        let deny_name =
            SandboxPolicy { deny_out: rules(&["*.tracker.test"]), ..Default::default() };
        let d = Dest { ip: ip("203.0.113.1"), port: 443, naming: claimed("a.tracker.test", true) };
        assert!(!decide(&c, &[], &deny_name, &d).allowed);
        assert!(!decide_lookup(&c, &deny_name, "a.tracker.test").allowed);
        assert!(decide_lookup(&c, &deny_name, "ok.test").allowed);
    }
}
