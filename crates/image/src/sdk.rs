//! E2B's Template SDK builds (`Template().from_template(...).run_cmd(...)...`): the build
//! request the SDK sends (`POST /v2/templates/{id}/builds/{buildID}`), mapped onto the
//! Dockerfile builder ([`crate::build`]) so both share one set of step semantics and one layer
//! cache; and the file archives its COPY steps upload, checked against the hash the SDK
//! computed of them and unpacked as hostile input.
//!
//! The request is translated into Dockerfile text and parsed by [`crate::dockerfile`] like a
//! user's Dockerfile: every refusal there (a bad USER, a path the context cannot serve) holds
//! here too. RUN goes in exec form (`["/bin/sh", "-c", CMD]`) so the command reaches the shell
//! byte for byte, newlines and quotes included; values that a Dockerfile line cannot carry
//! (a newline in an ENV value, `$` in a COPY path) are refused with the step named.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The build request (`TemplateBuildStartV2`). Unknown fields are ignored: newer SDKs add some.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildSpec {
    #[serde(default)]
    pub steps: Vec<SdkStep>,
    #[serde(default)]
    pub force: Option<bool>,
    pub from_image: Option<String>,
    pub from_template: Option<String>,
    pub from_image_registry: Option<serde_json::Value>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

/// One step (`TemplateStep`): `type` is the instruction (RUN, COPY, ENV, WORKDIR, USER).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SdkStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub force: Option<bool>,
    pub files_hash: Option<String>,
    pub force_upload: Option<bool>,
}

/// What the builder gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub dockerfile: String,
    /// For each Dockerfile line (index = line - 1), the SDK's name of the step it came from:
    /// `base` for FROM, the step's index counted from 1 otherwise (what the SDK's
    /// `get_build_step_index` maps back to the caller's line).
    pub step_of_line: Vec<String>,
    /// The build's `skip_cache` (`force` on the build): every step runs uncached.
    pub no_cache: bool,
    /// The Dockerfile line of the first step marked `force` (the SDK's `skip_cache()` before
    /// it): that step and every later one run uncached, those before it come from the cache.
    pub no_cache_from_line: Option<usize>,
    /// The files hashes the COPY steps read, each with the step's source and destination.
    pub copies: Vec<(String, String, String)>,
}

/// The SDK's name of a step that failed, from the Dockerfile line the builder names.
pub fn step_name(t: &Translated, line: usize) -> Option<String> {
    line.checked_sub(1).and_then(|i| t.step_of_line.get(i)).cloned()
}

/// A files hash: 64 lower-case hex digits (sha256, as the SDK computes it).
pub fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `s` as a JSON string (for exec-form RUN and COPY).
fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// `s` in double quotes for a Dockerfile word (ENV values, WORKDIR): `"`, `\` and `$`
/// escaped, so nothing is substituted.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A USER value as the jail runs it. E2B's two sandbox users are `root` and `user`, and they
/// are the only ones a jail sandbox has (0 and 1000): they are given as ids, so an image
/// without an `/etc/passwd` (busybox, distroless) still builds, as it does on E2B.
fn user_id(u: &str) -> String {
    match u {
        "root" => "0".into(),
        "user" => "1000:1000".into(),
        other => other.to_string(),
    }
}

/// A relative path inside the uploaded files: no `..`, not absolute, not empty.
fn inside(src: &str) -> bool {
    let p = Path::new(src);
    !src.is_empty()
        && !p.is_absolute()
        && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// The SDK's request → Dockerfile text. `from` is the FROM to use (the server resolved
/// `fromTemplate`/`fromImage` to a template here); `base_user` is that template's USER, which
/// a RUN with its own user returns to.
pub fn translate(spec: &BuildSpec, from: &str, base_user: &str) -> Result<Translated, String> {
    let mut lines: Vec<(String, String)> = Vec::new();
    lines.push((format!("FROM {from}"), "base".into()));
    let no_cache = spec.force == Some(true);
    let mut no_cache_from_line = None;
    let mut user = if base_user.is_empty() { "0".to_string() } else { user_id(base_user) };
    let mut copies = Vec::new();
    let single_line = |what: &str, v: &str, n: usize| {
        if v.contains(['\n', '\r', '\0']) {
            Err(format!("step {n} ({what}): a newline or NUL byte cannot be carried here"))
        } else {
            Ok(())
        }
    };
    for (i, step) in spec.steps.iter().enumerate() {
        let n = i + 1;
        let name = n.to_string();
        if step.force == Some(true) && no_cache_from_line.is_none() {
            // Lines are counted from 1; this step's first one is the next pushed.
            no_cache_from_line = Some(lines.len() + 1);
        }
        let a = &step.args;
        match step.kind.as_str() {
            "RUN" => {
                let cmd = a.first().ok_or(format!("step {n} (RUN): no command"))?;
                if cmd.contains('\0') {
                    return Err(format!("step {n} (RUN): a NUL byte in the command"));
                }
                let as_user = a.get(1).filter(|u| !u.is_empty());
                if let Some(u) = as_user {
                    single_line("RUN user", u, n)?;
                    lines.push((format!("USER {}", quoted(&user_id(u))), name.clone()));
                }
                lines.push((format!("RUN [\"/bin/sh\", \"-c\", {}]", json(cmd)), name.clone()));
                if as_user.is_some() {
                    lines.push((format!("USER {}", quoted(&user)), name));
                }
            }
            "COPY" => {
                let (src, dest) = match (a.first(), a.get(1)) {
                    (Some(s), Some(d)) if !s.is_empty() && !d.is_empty() => (s, d),
                    _ => return Err(format!("step {n} (COPY): needs a source and a destination")),
                };
                if !inside(src) {
                    return Err(format!(
                        "step {n} (COPY): source {src:?} leaves the build context (absolute or \
                         `..`)"
                    ));
                }
                for v in [src, dest] {
                    single_line("COPY", v, n)?;
                    if v.contains('$') {
                        return Err(format!("step {n} (COPY): `$` in path {v:?} is not supported"));
                    }
                }
                let hash = step
                    .files_hash
                    .as_deref()
                    .ok_or(format!("step {n} (COPY): no filesHash (upload the files first)"))?;
                if !valid_hash(hash) {
                    return Err(format!("step {n} (COPY): filesHash {hash:?} is not a sha256"));
                }
                let mut flags = String::new();
                if let Some(u) = a.get(2).filter(|u| !u.is_empty()) {
                    single_line("COPY user", u, n)?;
                    if u.contains(char::is_whitespace) {
                        return Err(format!("step {n} (COPY): user {u:?} has whitespace"));
                    }
                    flags.push_str(&format!("--chown={u} "));
                }
                if let Some(m) = a.get(3).filter(|m| !m.is_empty()) {
                    if !m.bytes().all(|b| (b'0'..=b'7').contains(&b)) || m.len() > 4 {
                        return Err(format!("step {n} (COPY): mode {m:?} is not octal"));
                    }
                    flags.push_str(&format!("--chmod={m} "));
                }
                let from = format!("{hash}/{}", src.trim_start_matches("./"));
                lines.push((format!("COPY {flags}[{}, {}]", json(&from), json(dest)), name));
                copies.push((hash.to_string(), src.clone(), dest.clone()));
            }
            "ENV" => {
                if a.is_empty() || a.len() % 2 != 0 {
                    return Err(format!("step {n} (ENV): expects KEY, VALUE pairs"));
                }
                let mut parts = Vec::new();
                for kv in a.chunks(2) {
                    let (k, v) = (&kv[0], &kv[1]);
                    let ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !ok {
                        return Err(format!("step {n} (ENV): {k:?} is not a variable name"));
                    }
                    single_line("ENV value", v, n)?;
                    parts.push(format!("{k}={}", quoted(v)));
                }
                lines.push((format!("ENV {}", parts.join(" ")), name));
            }
            "WORKDIR" => {
                let w = a.first().filter(|w| !w.is_empty());
                let w = w.ok_or(format!("step {n} (WORKDIR): no directory"))?;
                single_line("WORKDIR", w, n)?;
                lines.push((format!("WORKDIR {}", quoted(w)), name));
            }
            "USER" => {
                let u = a.first().filter(|u| !u.is_empty());
                let u = u.ok_or(format!("step {n} (USER): no user"))?;
                single_line("USER", u, n)?;
                user = user_id(u);
                lines.push((format!("USER {}", quoted(&user)), name));
            }
            other => {
                return Err(format!(
                    "step {n}: unknown step type {other:?} (known: RUN, COPY, ENV, WORKDIR, USER)"
                ));
            }
        }
    }
    let mut dockerfile = String::new();
    let mut step_of_line = Vec::new();
    for (l, s) in lines {
        dockerfile.push_str(&l);
        dockerfile.push('\n');
        step_of_line.push(s);
    }
    Ok(Translated { dockerfile, step_of_line, no_cache, no_cache_from_line, copies })
}

/// Most bytes one upload may unpack to.
pub const MAX_UNPACKED: u64 = 4 << 30;
/// Most entries in one upload.
pub const MAX_ENTRIES: u64 = 200_000;

/// Unpacks the archive `upload` (a tar, gzip-compressed or not, as the SDK's `copy` makes
/// it) into `dest` (which must not exist), and checks it is what the SDK hashed for
/// `COPY src dest_path`: the same sha256 over each entry's relative path, mode, size and
/// content (or link target), in archive order. Anything but regular files, directories and
/// symbolic links is refused; so is a path leaving `dest`, a hard link to something not
/// unpacked before it, and a path through a symbolic link. On any error `dest` is removed.
pub fn unpack_upload(
    upload: &Path,
    dest: &Path,
    src: &str,
    dest_path: &str,
    expected: &str,
) -> Result<(), String> {
    let r = unpack_inner(upload, dest, src, dest_path, expected);
    if r.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    r
}

fn unpack_inner(
    upload: &Path,
    dest: &Path,
    src: &str,
    dest_path: &str,
    expected: &str,
) -> Result<(), String> {
    let mut file = fs::File::open(upload).map_err(|e| format!("the upload: {e}"))?;
    let mut magic = [0u8; 2];
    let gz = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    drop(file);
    let file = fs::File::open(upload).map_err(|e| format!("the upload: {e}"))?;
    let reader: Box<dyn Read> =
        if gz { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    fs::create_dir(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    let mut h = Sha256::new();
    h.update(format!("COPY {src} {dest_path}").as_bytes());
    let mut archive = tar::Archive::new(reader);
    let (mut total, mut count) = (0u64, 0u64);
    let mut unpacked: BTreeMap<PathBuf, ()> = BTreeMap::new();
    let entries = archive.entries().map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("a bad tar entry: {e}"))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let raw = entry.path().map_err(|e| format!("a bad entry path: {e}"))?.into_owned();
        let shown = raw.to_string_lossy().trim_end_matches('/').to_string();
        let rel: PathBuf = raw.components().filter(|c| !matches!(c, Component::CurDir)).collect();
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(format!("entry {shown:?}: leaves the upload (absolute or `..`)"));
        }
        // Every directory on the way is one this upload made, not a symbolic link.
        let mut at = dest.to_path_buf();
        for c in rel.parent().into_iter().flat_map(|p| p.components()) {
            at.push(c);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("entry {shown:?}: its path goes through a link")),
                Err(_) => fs::create_dir(&at).map_err(|e| format!("entry {shown:?}: {e}"))?,
            }
        }
        let target = dest.join(&rel);
        let perm = entry.header().mode().map_err(|e| format!("entry {shown:?}: {e}"))? & 0o7777;
        let kind = entry.header().entry_type();
        h.update(shown.as_bytes());
        if kind.is_dir() {
            h.update((0o040000 | perm).to_string().as_bytes());
            match fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("entry {shown:?}: exists and is not a directory")),
                Err(_) => fs::create_dir(&target).map_err(|e| format!("entry {shown:?}: {e}"))?,
            }
            fs::set_permissions(&target, fs::Permissions::from_mode(perm & 0o777))
                .map_err(|e| format!("entry {shown:?}: {e}"))?;
        } else if kind.is_symlink() {
            let link = entry
                .link_name()
                .map_err(|e| format!("entry {shown:?}: {e}"))?
                .ok_or(format!("entry {shown:?}: a link without a target"))?;
            let link = link.to_string_lossy().into_owned();
            h.update((0o120000 | perm).to_string().as_bytes());
            h.update(link.len().to_string().as_bytes());
            h.update(link.as_bytes());
            let _ = fs::remove_file(&target);
            // Kept as written: COPY in the builder decides what a link may point at.
            symlink(&link, &target).map_err(|e| format!("entry {shown:?}: {e}"))?;
        } else if kind.is_file() || kind.is_hard_link() {
            let mut out_bytes = Vec::new();
            if kind.is_hard_link() {
                let to = entry
                    .link_name()
                    .map_err(|e| format!("entry {shown:?}: {e}"))?
                    .ok_or(format!("entry {shown:?}: a hard link without a target"))?;
                let to: PathBuf =
                    to.components().filter(|c| !matches!(c, Component::CurDir)).collect();
                if !unpacked.contains_key(&to) {
                    return Err(format!(
                        "entry {shown:?}: a hard link to {:?}, which is not a file before it",
                        to.display()
                    ));
                }
                out_bytes =
                    fs::read(dest.join(&to)).map_err(|e| format!("entry {shown:?}: {e}"))?;
            } else {
                let size = entry.header().size().map_err(|e| format!("entry {shown:?}: {e}"))?;
                if total.saturating_add(size) > MAX_UNPACKED {
                    return Err(format!("more than {MAX_UNPACKED} bytes unpacked"));
                }
                entry
                    .by_ref()
                    .take(size)
                    .read_to_end(&mut out_bytes)
                    .map_err(|e| format!("entry {shown:?}: {e}"))?;
            }
            total = total.saturating_add(out_bytes.len() as u64);
            if total > MAX_UNPACKED {
                return Err(format!("more than {MAX_UNPACKED} bytes unpacked"));
            }
            h.update((0o100000 | perm).to_string().as_bytes());
            h.update(out_bytes.len().to_string().as_bytes());
            h.update(&out_bytes);
            let _ = fs::remove_file(&target);
            fs::write(&target, &out_bytes).map_err(|e| format!("entry {shown:?}: {e}"))?;
            // Setuid and setgid bits stay behind: COPY --chmod is how a step sets modes.
            fs::set_permissions(&target, fs::Permissions::from_mode(perm & 0o777))
                .map_err(|e| format!("entry {shown:?}: {e}"))?;
            unpacked.insert(rel, ());
        } else {
            return Err(format!(
                "entry {shown:?}: only files, directories and symbolic links can be copied"
            ));
        }
    }
    if count == 0 {
        return Err("the upload is empty".into());
    }
    let actual = hex::encode(h.finalize());
    if actual != expected {
        return Err(format!(
            "the uploaded files do not match their hash: the step says {expected}, the upload \
             hashes to {actual}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(json: serde_json::Value) -> BuildSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_forced_step_skips_the_cache_from_its_first_line_on() {
        let s = spec(serde_json::json!({
            "fromTemplate": "bb",
            "steps": [
                {"type": "RUN", "args": ["echo one"]},
                {"type": "RUN", "args": ["echo two", "root"], "force": true},
                {"type": "RUN", "args": ["echo three"], "force": true},
            ],
        }));
        let t = translate(&s, "bb", "").unwrap();
        // FROM, RUN one, then step 2's USER line (its first), RUN two, USER back.
        assert_eq!(t.no_cache_from_line, Some(3));
        assert_eq!(t.step_of_line[2], "2");
        assert!(!t.no_cache);
        let whole = spec(serde_json::json!({"fromTemplate": "bb", "force": true, "steps": []}));
        let t = translate(&whole, "bb", "").unwrap();
        assert!(t.no_cache);
        assert_eq!(t.no_cache_from_line, None);
    }

    #[test]
    fn steps_become_a_dockerfile() {
        let h = "a".repeat(64);
        let s = spec(serde_json::json!({
            "fromTemplate": "bb",
            "steps": [
                {"type": "RUN", "args": ["echo \"$HOME\"\necho two", "root"], "force": false},
                {"type": "COPY", "args": ["app/x.txt", "/opt/", "user", "0644"], "filesHash": h},
                {"type": "ENV", "args": ["A", "1 $B \"q\"", "C", ""]},
                {"type": "WORKDIR", "args": ["/opt"]},
                {"type": "USER", "args": ["user"]},
            ],
        }));
        let t = translate(&s, "bb", "").unwrap();
        let want = format!(
            "FROM bb\nUSER \"0\"\nRUN [\"/bin/sh\", \"-c\", \"echo \\\"$HOME\\\"\\necho two\"]\n\
             USER \"0\"\nCOPY --chown=user --chmod=0644 [\"{h}/app/x.txt\", \"/opt/\"]\n\
             ENV A=\"1 \\$B \\\"q\\\"\" C=\"\"\nWORKDIR \"/opt\"\nUSER \"1000:1000\"\n"
        );
        assert_eq!(t.dockerfile, want);
        assert_eq!(t.step_of_line, ["base", "1", "1", "1", "2", "3", "4", "5"]);
        // The Dockerfile parser takes it, and ENV's value comes back unchanged.
        let parsed = crate::dockerfile::parse(t.dockerfile.as_bytes()).unwrap();
        let env = parsed.steps.iter().find_map(|s| match &s.op {
            crate::dockerfile::Op::Env(e) => Some(e.clone()),
            _ => None,
        });
        let pairs = crate::dockerfile::pairs(&env.unwrap(), &BTreeMap::new(), false).unwrap();
        assert_eq!(pairs[0], ("A".into(), "1 $B \"q\"".into()));
    }

    #[test]
    fn bad_steps_are_refused_by_name() {
        let bad = [
            (serde_json::json!({"type": "FROB", "args": []}), "unknown step type \"FROB\""),
            (serde_json::json!({"type": "RUN", "args": []}), "no command"),
            (
                serde_json::json!({"type": "COPY", "args": ["../etc", "/x"], "filesHash": "a".repeat(64)}),
                "leaves the build context",
            ),
            (
                serde_json::json!({"type": "COPY", "args": ["/etc/passwd", "/x"], "filesHash": "a".repeat(64)}),
                "leaves the build context",
            ),
            (serde_json::json!({"type": "COPY", "args": ["a", "/x"]}), "no filesHash"),
            (serde_json::json!({"type": "ENV", "args": ["A"]}), "KEY, VALUE pairs"),
            (serde_json::json!({"type": "ENV", "args": ["A-B", "1"]}), "not a variable name"),
            (serde_json::json!({"type": "ENV", "args": ["A", "x\ny"]}), "newline"),
        ];
        for (step, want) in bad {
            let s = spec(serde_json::json!({"steps": [step]}));
            let e = translate(&s, "bb", "").unwrap_err();
            assert!(e.contains(want) && e.starts_with("step 1"), "{e} (wanted {want})");
        }
    }

    /// An archive like the SDK's, hashed like the SDK hashes it.
    fn sdk_archive(dir: &Path, gz: bool) -> (PathBuf, String) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = Sha256::new();
        h.update(b"COPY app /dst");
        let mut dirh = tar::Header::new_ustar();
        dirh.set_entry_type(tar::EntryType::Directory);
        dirh.set_mode(0o755);
        dirh.set_size(0);
        b.append_data(&mut dirh, "app/", std::io::empty()).unwrap();
        h.update(b"app");
        h.update((0o040755u32).to_string().as_bytes());
        let data = b"hello\n";
        let mut fh = tar::Header::new_ustar();
        fh.set_mode(0o644);
        fh.set_size(data.len() as u64);
        b.append_data(&mut fh, "app/a.txt", &data[..]).unwrap();
        h.update(b"app/a.txt");
        h.update((0o100644u32).to_string().as_bytes());
        h.update(b"6");
        h.update(data);
        let bytes = b.into_inner().unwrap();
        let path = dir.join(if gz { "up.tar.gz" } else { "up.tar" });
        if gz {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&bytes).unwrap();
            fs::write(&path, e.finish().unwrap()).unwrap();
        } else {
            fs::write(&path, bytes).unwrap();
        }
        (path, hex::encode(h.finalize()))
    }

    #[test]
    fn uploads_unpack_when_their_hash_matches() {
        let tmp = tempfile::tempdir().unwrap();
        for gz in [false, true] {
            let (up, hash) = sdk_archive(tmp.path(), gz);
            let out = tmp.path().join(format!("out-{gz}"));
            unpack_upload(&up, &out, "app", "/dst", &hash).unwrap();
            assert_eq!(fs::read(out.join("app/a.txt")).unwrap(), b"hello\n");
            // Another destination is another hash: refused, nothing left.
            let out2 = tmp.path().join(format!("out2-{gz}"));
            let e = unpack_upload(&up, &out2, "app", "/elsewhere", &hash).unwrap_err();
            assert!(e.contains("do not match their hash"), "{e}");
            assert!(!out2.exists());
        }
    }

    #[test]
    fn hostile_uploads_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        type Add = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
        let cases: Vec<(&str, Add, &str)> = vec![
            (
                "dotdot",
                Box::new(|b| {
                    let mut hd = tar::Header::new_gnu();
                    hd.set_mode(0o644);
                    hd.set_size(1);
                    // `append_data` refuses `..` itself; the raw name is what an attacker sends.
                    hd.as_gnu_mut().unwrap().name[..8].copy_from_slice(b"../evil\0");
                    hd.set_cksum();
                    b.append(&hd, &b"x"[..]).unwrap();
                }),
                "leaves the upload",
            ),
            (
                "through-link",
                Box::new(|b| {
                    let mut l = tar::Header::new_ustar();
                    l.set_entry_type(tar::EntryType::Symlink);
                    l.set_size(0);
                    l.set_mode(0o777);
                    b.append_link(&mut l, "d", "/etc").unwrap();
                    let mut f = tar::Header::new_ustar();
                    f.set_mode(0o644);
                    f.set_size(1);
                    b.append_data(&mut f, "d/passwd", &b"x"[..]).unwrap();
                }),
                "goes through a link",
            ),
            (
                "device",
                Box::new(|b| {
                    let mut d = tar::Header::new_ustar();
                    d.set_entry_type(tar::EntryType::Char);
                    d.set_size(0);
                    d.set_mode(0o644);
                    b.append_data(&mut d, "null", std::io::empty()).unwrap();
                }),
                "only files, directories and symbolic links",
            ),
            (
                "hardlink-out",
                Box::new(|b| {
                    let mut l = tar::Header::new_ustar();
                    l.set_entry_type(tar::EntryType::Link);
                    l.set_size(0);
                    l.set_mode(0o644);
                    b.append_link(&mut l, "p", "etc/shadow").unwrap();
                }),
                "not a file before it",
            ),
        ];
        for (name, add, want) in cases {
            let mut b = tar::Builder::new(Vec::new());
            add(&mut b);
            let up = tmp.path().join(format!("{name}.tar"));
            fs::write(&up, b.into_inner().unwrap()).unwrap();
            let out = tmp.path().join(name);
            let e = unpack_upload(&up, &out, "x", "/x", &"0".repeat(64)).unwrap_err();
            assert!(e.contains(want), "{name}: {e}");
            assert!(!out.exists(), "{name}: left {out:?}");
        }
        assert!(fs::symlink_metadata("/etc/passwd").is_ok_and(|m| m.len() > 1));
    }
}
