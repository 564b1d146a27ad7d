//! A Dockerfile parser, for `ringfence template build`. The file is hostile input: every
//! refusal is an [`ImageError::Dockerfile`] naming the line.
//!
//! Parsing produces the instructions with their arguments still raw: variables (`$NAME`,
//! `${NAME}`, `${NAME:-default}`, `${NAME:+alt}`) are substituted when the build reaches the
//! step, from the ENV and ARG values in force there ([`words`], [`word`]), as Docker does.
//! The syntax is checked here anyway (quotes, `${`), so a malformed line fails before any step
//! runs.
//!
//! Supported: FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, LABEL, CMD, ENTRYPOINT, SHELL;
//! EXPOSE, VOLUME, STOPSIGNAL, HEALTHCHECK, MAINTAINER and ONBUILD are accepted and ignored
//! with a note. Refused with a reason: heredocs, `RUN --mount`/`--network`/`--security`,
//! `COPY --from` (multi-stage builds), a second FROM, unknown instructions and flags.

use std::collections::BTreeMap;

use crate::error::ImageError;

/// The largest Dockerfile read.
pub const MAX_BYTES: usize = 1 << 20;
/// The most instructions one Dockerfile may have.
pub const MAX_STEPS: usize = 1000;

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub steps: Vec<Step>,
    /// What was accepted but ignored (directives, instructions without effect here).
    pub notes: Vec<String>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The line it starts on (1-based).
    pub line: usize,
    /// The instruction as written, continuations joined (for the progress display).
    pub text: String,
    pub op: Op,
}

/// A command: shell form (run by the SHELL, `/bin/sh -c` by default) or exec form (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Shell(String),
    Exec(Vec<String>),
}

/// What an instruction does. Strings are raw (substituted when the step runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    From {
        image: String,
    },
    Run(Command),
    Copy(CopySpec),
    /// `KEY=VALUE ...`, or the legacy `KEY VALUE` form (one pair).
    Env(String),
    Label(String),
    /// Names with their raw defaults.
    Arg(Vec<(String, Option<String>)>),
    Workdir(String),
    User(String),
    Cmd(Command),
    Entrypoint(Command),
    Shell(Vec<String>),
    /// Accepted, without effect here (the note says why).
    Ignored(String),
}

/// COPY or ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    pub add: bool,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    /// Sources then the destination, raw (JSON form already decoded).
    pub args: Vec<String>,
    /// Whether the JSON form was used (its strings are not split on spaces).
    pub json: bool,
}

fn err(line: usize, message: impl Into<String>) -> ImageError {
    ImageError::Dockerfile { line, message: message.into() }
}

/// Parses a Dockerfile's bytes.
pub fn parse(bytes: &[u8]) -> Result<Dockerfile, ImageError> {
    if bytes.len() > MAX_BYTES {
        return Err(err(0, format!("larger than {MAX_BYTES} bytes")));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
        err(line, "not UTF-8 text")
    })?;
    if let Some(pos) = text.find('\0') {
        return Err(err(text[..pos].matches('\n').count() + 1, "a NUL byte"));
    }
    let mut notes = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut directives_open = true;
    // The logical line being joined: (first line number, text).
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim();
        if directives_open {
            if let Some(d) = directive(trimmed) {
                match d {
                    ("escape", "\\") => {}
                    ("escape", other) => {
                        return Err(err(
                            n,
                            format!("escape character {other:?}: only the default '\\' is supported"),
                        ));
                    }
                    (key, value) => notes.push(format!(
                        "line {n}: parser directive `{key}={value}` ignored (this is Ringfence's own \
                         Dockerfile parser)"
                    )),
                }
                continue;
            }
            directives_open = false;
        }
        if pending.is_some() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            // Comment and empty lines inside a continuation are dropped, as Docker does.
            continue;
        }
        if pending.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        let body = raw.trim_end();
        let (part, continues) = match body.strip_suffix('\\') {
            Some(p) => (p, true),
            None => (body, false),
        };
        let (start, mut acc) = pending.take().unwrap_or((n, String::new()));
        acc.push_str(if acc.is_empty() { part.trim_start() } else { part });
        if continues {
            pending = Some((start, acc));
        } else {
            steps.push(instruction(start, &acc, &mut notes)?);
        }
        if steps.len() > MAX_STEPS {
            return Err(err(n, format!("more than {MAX_STEPS} instructions")));
        }
    }
    if let Some((start, acc)) = pending {
        steps.push(instruction(start, &acc, &mut notes)?);
    }
    let Some(first) = steps.iter().find(|s| !matches!(s.op, Op::Arg(_))) else {
        return Err(err(0, "no FROM instruction (the file has no instructions, or only ARG)"));
    };
    if !matches!(first.op, Op::From { .. }) {
        return Err(err(first.line, "the first instruction must be FROM (ARG may come before it)"));
    }
    if let Some(second) = steps.iter().filter(|s| matches!(s.op, Op::From { .. })).nth(1) {
        return Err(err(
            second.line,
            "a second FROM: multi-stage builds are not supported yet; build each stage as its \
             own template and start the next FROM it",
        ));
    }
    Ok(Dockerfile { steps, notes })
}

/// `# key=value` at the top of the file.
fn directive(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix('#')?.trim_start();
    let (key, value) = rest.split_once('=')?;
    let key = key.trim();
    let known = ["syntax", "escape", "check"];
    known.iter().find(|k| k.eq_ignore_ascii_case(key)).map(|k| (*k, value.trim()))
}

fn instruction(line: usize, text: &str, notes: &mut Vec<String>) -> Result<Step, ImageError> {
    let (word, rest) = match text.find(char::is_whitespace) {
        Some(i) => (&text[..i], text[i..].trim()),
        None => (text, ""),
    };
    let name = word.to_ascii_uppercase();
    let need = |what: &str| -> Result<(), ImageError> {
        if rest.is_empty() { Err(err(line, format!("{name} needs {what}"))) } else { Ok(()) }
    };
    if matches!(name.as_str(), "RUN" | "COPY" | "ADD") && has_heredoc(rest) {
        return Err(err(
            line,
            format!(
                "{name} with a heredoc (<<WORD): heredocs are not supported; put the script in a \
                 file, COPY it and RUN it, or join lines with `\\`"
            ),
        ));
    }
    let op = match name.as_str() {
        "FROM" => {
            let (flags, args) = flags(rest, line)?;
            for (k, v) in &flags {
                match (k.as_str(), v.as_str()) {
                    ("platform", "linux/amd64" | "$BUILDPLATFORM" | "$TARGETPLATFORM") => {}
                    ("platform", p) => {
                        return Err(err(
                            line,
                            format!("FROM --platform={p}: only linux/amd64 runs here"),
                        ));
                    }
                    (k, _) => return Err(err(line, format!("FROM: unknown flag --{k}"))),
                }
            }
            check_syntax(&args, line)?;
            let parts: Vec<&str> = args.split_whitespace().collect();
            match parts.as_slice() {
                [image] => Op::From { image: (*image).to_string() },
                [_, kw, _] if kw.eq_ignore_ascii_case("as") => {
                    return Err(err(
                        line,
                        "FROM ... AS NAME: multi-stage builds are not supported yet",
                    ));
                }
                [] => {
                    return Err(err(
                        line,
                        "FROM needs an image (a template name, a registry reference or `scratch`)",
                    ));
                }
                _ => return Err(err(line, "FROM takes one image (FROM IMAGE)")),
            }
        }
        "RUN" => {
            let (flags, args) = flags(rest, line)?;
            if let Some((k, _)) = flags.first() {
                let why = match k.as_str() {
                    "mount" => "cache, secret and bind mounts are not supported",
                    "network" => {
                        "a step cannot choose its network: RUN gets the operator's build egress \
                         (--build-egress)"
                    }
                    "security" => "RUN runs unprivileged, always",
                    _ => "unknown flag",
                };
                return Err(err(line, format!("RUN --{k}: {why}")));
            }
            if args.is_empty() {
                return Err(err(line, "RUN needs a command"));
            }
            Op::Run(command(&args, line)?)
        }
        "COPY" | "ADD" => {
            let (flags, args) = flags(rest, line)?;
            let mut spec = CopySpec {
                add: name == "ADD",
                chown: None,
                chmod: None,
                args: Vec::new(),
                json: false,
            };
            for (k, v) in flags {
                match k.as_str() {
                    "chown" => spec.chown = Some(v),
                    "chmod" => spec.chmod = Some(v),
                    "from" => {
                        return Err(err(
                            line,
                            format!("{name} --from: multi-stage builds are not supported yet"),
                        ));
                    }
                    "link" | "parents" | "exclude" | "checksum" | "keep-git-dir" => {
                        return Err(err(line, format!("{name} --{k} is not supported")));
                    }
                    _ => return Err(err(line, format!("{name}: unknown flag --{k}"))),
                }
            }
            if let Some(list) = json_array(&args) {
                spec.args = list;
                spec.json = true;
            } else {
                check_syntax(&args, line)?;
                spec.args = split_raw(&args);
            }
            if spec.args.len() < 2 {
                return Err(err(
                    line,
                    format!("{name} needs at least one source and a destination"),
                ));
            }
            Op::Copy(spec)
        }
        "ENV" | "LABEL" => {
            need("KEY=VALUE")?;
            check_syntax(rest, line)?;
            let pairs = pairs(rest, &BTreeMap::new(), name == "ENV").map_err(|m| err(line, m))?;
            if pairs.iter().any(|(k, _)| k.is_empty()) {
                return Err(err(line, format!("{name}: an empty name")));
            }
            if name == "ENV" { Op::Env(rest.to_string()) } else { Op::Label(rest.to_string()) }
        }
        "ARG" => {
            need("a NAME[=DEFAULT]")?;
            let mut out = Vec::new();
            for w in split_raw(rest) {
                let (k, v) = match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (w.clone(), None),
                };
                if !valid_name(&k) {
                    return Err(err(line, format!("ARG {k:?}: not a valid name")));
                }
                out.push((k, v));
            }
            check_syntax(rest, line)?;
            Op::Arg(out)
        }
        "WORKDIR" => {
            need("a directory")?;
            check_syntax(rest, line)?;
            Op::Workdir(rest.to_string())
        }
        "USER" => {
            need("a user (NAME or UID, optionally :GROUP)")?;
            check_syntax(rest, line)?;
            Op::User(rest.to_string())
        }
        "CMD" => {
            need("a command")?;
            Op::Cmd(command(rest, line)?)
        }
        "ENTRYPOINT" => {
            need("a command")?;
            Op::Entrypoint(command(rest, line)?)
        }
        "SHELL" => match json_array(rest) {
            Some(v) if !v.is_empty() => Op::Shell(v),
            _ => return Err(err(line, "SHELL takes a JSON array: SHELL [\"/bin/sh\", \"-c\"]")),
        },
        "EXPOSE" | "VOLUME" | "STOPSIGNAL" | "HEALTHCHECK" | "MAINTAINER" | "ONBUILD" => {
            let why = match name.as_str() {
                "EXPOSE" => "sandboxes reach ports through the API's host routing, not EXPOSE",
                "VOLUME" => "sandboxes have no volumes; the path stays part of the filesystem",
                "HEALTHCHECK" => "templates have no health checks yet",
                _ => "not used by sandboxes",
            };
            notes.push(format!("line {line}: {name} ignored: {why}"));
            Op::Ignored(name.clone())
        }
        _ => {
            let shown: String = word.chars().take(40).collect();
            return Err(err(line, format!("unknown instruction {shown:?}")));
        }
    };
    Ok(Step { line, text: text.to_string(), op })
}

/// Whether `<<WORD` (a heredoc) appears.
fn has_heredoc(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(3).enumerate().any(|(i, w)| {
        w[0] == b'<' && w[1] == b'<' && {
            let next = if w[2] == b'-' { b.get(i + 3).copied().unwrap_or(b' ') } else { w[2] };
            next.is_ascii_alphabetic() || next == b'_' || next == b'"' || next == b'\''
        }
    })
}

/// Leading `--name=value` flags, and the rest.
fn flags(rest: &str, line: usize) -> Result<(Vec<(String, String)>, String), ImageError> {
    let mut out = Vec::new();
    let mut s = rest.trim_start();
    while let Some(f) = s.strip_prefix("--") {
        let end = f.find(char::is_whitespace).unwrap_or(f.len());
        let (flag, after) = f.split_at(end);
        let (k, v) = match flag.split_once('=') {
            Some((k, v)) => (k, v),
            None => (flag, ""),
        };
        if k.is_empty() {
            return Err(err(line, "an empty flag `--`"));
        }
        out.push((k.to_ascii_lowercase(), v.to_string()));
        s = after.trim_start();
    }
    Ok((out, s.to_string()))
}

/// Exec form (a JSON array of strings) or shell form.
fn command(rest: &str, line: usize) -> Result<Command, ImageError> {
    if let Some(v) = json_array(rest) {
        if v.is_empty() {
            return Err(err(line, "an empty command []"));
        }
        return Ok(Command::Exec(v));
    }
    if rest.trim_start().starts_with('[') && rest.trim_end().ends_with(']') {
        // Docker would run this through the shell; say so rather than guess silently.
        return Err(err(
            line,
            "looks like the exec form but is not a JSON array of strings (use double quotes)",
        ));
    }
    Ok(Command::Shell(rest.to_string()))
}

fn json_array(s: &str) -> Option<Vec<String>> {
    let t = s.trim();
    if !t.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(t).ok()
}

pub(crate) fn valid_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Splits on unquoted whitespace, keeping quotes and `$` as written.
fn split_raw(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            (None, '\'' | '"') => {
                quote = Some(c);
                cur.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                cur.push(c);
            }
            (q, '\\') if q != Some('\'') => {
                cur.push('\\');
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (_, c) => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn check_syntax(s: &str, line: usize) -> Result<(), ImageError> {
    words(s, &BTreeMap::new()).map(|_| ()).map_err(|m| err(line, m))
}

/// Splits `s` into words as Docker does for COPY, ENV, LABEL...: whitespace separates,
/// quotes group (no substitution inside single quotes), backslash escapes, and variables are
/// substituted from `vars` (unset ones are empty).
pub fn words(s: &str, vars: &BTreeMap<String, String>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
                i += 1;
            }
            '\'' => {
                have = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("an unterminated single quote".into()),
                        Some('\'') => break,
                        Some(ch) => cur.push(*ch),
                    }
                    i += 1;
                }
                i += 1;
            }
            '"' => {
                have = true;
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err("an unterminated double quote".into()),
                        Some('"') => break,
                        Some('\\') if matches!(chars.get(i + 1), Some('"' | '\\' | '$')) => {
                            cur.push(chars[i + 1]);
                            i += 2;
                            continue;
                        }
                        Some('$') => {
                            i = expand(&chars, i, vars, &mut cur)?;
                            continue;
                        }
                        Some(ch) => cur.push(*ch),
                    }
                    i += 1;
                }
                i += 1;
            }
            '\\' => {
                have = true;
                if let Some(n) = chars.get(i + 1) {
                    cur.push(*n);
                }
                i += 2;
            }
            '$' => {
                have = true;
                i = expand(&chars, i, vars, &mut cur)?;
            }
            c => {
                have = true;
                cur.push(c);
                i += 1;
            }
        }
    }
    if have {
        out.push(cur);
    }
    Ok(out)
}

/// `s` as one word (quotes removed, variables substituted, whitespace kept).
pub fn word(s: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    // Whitespace between words is kept as written: split, then rejoin with the original gaps
    // would need positions; Docker's own rule for WORKDIR, USER, FROM is "one word", so a
    // space-separated value is joined with single spaces.
    Ok(words(s, vars)?.join(" "))
}

/// Substitutes the variable at `chars[i]` (a `$`) into `out`; returns the index after it.
fn expand(
    chars: &[char],
    i: usize,
    vars: &BTreeMap<String, String>,
    out: &mut String,
) -> Result<usize, String> {
    let name_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    match chars.get(i + 1) {
        Some('{') => {
            let close = chars[i + 2..]
                .iter()
                .position(|c| *c == '}')
                .map(|p| i + 2 + p)
                .ok_or("an unterminated ${")?;
            let inner: String = chars[i + 2..close].iter().collect();
            let (name, op, arg) = match inner.find(|c: char| !name_char(c)) {
                None => (inner.as_str(), "", ""),
                Some(p) => {
                    let (n, rest) = inner.split_at(p);
                    if let Some(a) = rest.strip_prefix(":-") {
                        (n, ":-", a)
                    } else if let Some(a) = rest.strip_prefix(":+") {
                        (n, ":+", a)
                    } else {
                        return Err(format!(
                            "${{{inner}}}: only ${{NAME}}, ${{NAME:-default}} and ${{NAME:+alt}} are supported"
                        ));
                    }
                }
            };
            if !valid_name(name) {
                return Err(format!("${{{inner}}}: not a variable name"));
            }
            let value = vars.get(name).filter(|v| !v.is_empty());
            match (op, value) {
                ("", v) => out.push_str(v.map_or("", |s| s)),
                (":-", Some(v)) => out.push_str(v),
                (":-", None) => out.push_str(&word(arg, vars)?),
                (":+", Some(_)) => out.push_str(&word(arg, vars)?),
                _ => {}
            }
            Ok(close + 1)
        }
        Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
            let end = chars[i + 1..]
                .iter()
                .position(|c| !name_char(*c))
                .map_or(chars.len(), |p| i + 1 + p);
            let name: String = chars[i + 1..end].iter().collect();
            out.push_str(vars.get(&name).map_or("", |s| s));
            Ok(end)
        }
        _ => {
            out.push('$');
            Ok(i + 1)
        }
    }
}

/// `KEY=VALUE ...` pairs (ENV, LABEL), or with `legacy` the `KEY VALUE...` form.
pub fn pairs(
    s: &str,
    vars: &BTreeMap<String, String>,
    legacy: bool,
) -> Result<Vec<(String, String)>, String> {
    let raw = split_raw(s);
    let first_has_eq = raw.first().is_some_and(|w| {
        let k = w.split('=').next().unwrap_or("");
        w.contains('=') && !k.contains(['"', '\''])
    });
    if !first_has_eq {
        if !legacy {
            return Err("expected KEY=VALUE".into());
        }
        let key = raw.first().cloned().unwrap_or_default();
        let rest = s.trim_start()[key.len()..].trim();
        if rest.is_empty() {
            return Err(format!("{key:?} has no value (KEY=VALUE or KEY VALUE)"));
        }
        return Ok(vec![(key, word(rest, vars)?)]);
    }
    let mut out = Vec::new();
    for w in raw {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!("{w:?}: expected KEY=VALUE"));
        };
        let key = word(k, vars)?;
        out.push((key, words(v, vars)?.join(" ")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
    }

    #[test]
    fn a_dockerfile_with_continuations_comments_and_both_command_forms() {
        let d = parse(
            b"# syntax=docker/dockerfile:1\n\
              ARG BASE=bb\n\
              FROM $BASE\n\
              # a comment\n\
              RUN echo a && \\\n\
              # dropped inside the continuation\n\
              \x20   echo b\n\
              RUN [\"/bin/echo\", \"x y\"]\n\
              COPY --chown=1000:1000 --chmod=0640 a.txt \"b c.txt\" /dst/\n\
              ENV A=1 B=\"two words\"\n\
              ENV LEGACY value with spaces\n\
              expose 80\n\
              CMD [\"sh\"]\n",
        )
        .unwrap();
        assert!(d.notes.iter().any(|n| n.contains("syntax")), "{:?}", d.notes);
        assert!(d.notes.iter().any(|n| n.contains("EXPOSE")), "{:?}", d.notes);
        let ops: Vec<&Op> = d.steps.iter().map(|s| &s.op).collect();
        assert_eq!(ops[0], &Op::Arg(vec![("BASE".into(), Some("bb".into()))]));
        assert_eq!(ops[1], &Op::From { image: "$BASE".into() });
        assert_eq!(ops[2], &Op::Run(Command::Shell("echo a &&     echo b".into())));
        assert_eq!(d.steps[2].line, 5);
        assert_eq!(ops[3], &Op::Run(Command::Exec(vec!["/bin/echo".into(), "x y".into()])));
        let Op::Copy(c) = ops[4] else { panic!("{:?}", ops[4]) };
        assert_eq!(c.chown.as_deref(), Some("1000:1000"));
        assert_eq!(c.chmod.as_deref(), Some("0640"));
        assert_eq!(d.steps[7].line, 12);
        let Op::Env(env) = ops[5] else { panic!() };
        assert_eq!(
            pairs(env, &vars(&[]), true).unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "two words".into())]
        );
        let Op::Env(env) = ops[6] else { panic!() };
        assert_eq!(
            pairs(env, &vars(&[]), true).unwrap(),
            vec![("LEGACY".into(), "value with spaces".into())]
        );
    }

    #[test]
    fn variables_are_substituted_with_defaults_and_quotes() {
        let v = vars(&[("A", "x"), ("E", "")]);
        assert_eq!(
            words("$A ${A}y '$A' \"$A z\" \\$A", &v).unwrap(),
            ["x", "xy", "$A", "x z", "$A"]
        );
        assert_eq!(word("${B:-def} ${A:+alt} ${E:-e}", &v).unwrap(), "def alt e");
        assert!(words("${A", &v).unwrap_err().contains("unterminated"));
        assert!(words("${A/x/y}", &v).unwrap_err().contains("supported"));
        assert!(words("'open", &v).unwrap_err().contains("single quote"));
    }

    #[test]
    fn bad_dockerfiles_name_the_line_and_the_problem() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"FROM a\nRUN <<EOF\necho\nEOF\n", 2, "heredoc"),
            (b"FROM a\nFROBNICATE x\n", 2, "unknown instruction"),
            (b"RUN x\n", 1, "first instruction must be FROM"),
            (b"", 0, "no FROM"),
            (b"FROM a\nFROM b\n", 2, "multi-stage"),
            (b"FROM a AS b\n", 1, "multi-stage"),
            (b"FROM a\nCOPY --from=x a b\n", 2, "multi-stage"),
            (b"FROM a\nCOPY onlyone\n", 2, "source and a destination"),
            (b"FROM a\nRUN --mount=type=cache,target=/x true\n", 2, "mount"),
            (b"FROM a\nENV A=\"open\n", 2, "double quote"),
            (b"FROM a\nCMD ['sh']\n", 2, "JSON"),
            (b"# escape=`\nFROM a\n", 1, "escape"),
            (b"FROM a\nRUN \xff\n", 2, "UTF-8"),
            (b"FROM a\nARG 1x\n", 2, "valid name"),
            (b"FROM a\nUSER\n", 2, "USER needs"),
            (b"FROM --platform=linux/arm64 a\n", 1, "amd64"),
        ];
        for (text, line, what) in cases {
            let e = parse(text).unwrap_err();
            let ImageError::Dockerfile { line: l, message } = &e else { panic!("{e}") };
            assert_eq!(*l, *line, "{e}");
            assert!(e.to_string().contains(what), "{e} (expected {what:?}, {message})");
        }
        let big = vec![b'#'; MAX_BYTES + 1];
        assert!(parse(&big).unwrap_err().to_string().contains("larger than"));
    }
}
