//! COPY and ADD for builds: reading the build context as hostile input, hashing what a step
//! copies (its cache key), and writing it into a new layer directory on the host.
//!
//! The context: every source is opened beneath the context directory with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so no source path (`../x`, an absolute path, a
//! symlink anywhere on the way) reaches outside it; a symlink named as a source is refused;
//! symlinks inside a copied directory are copied as symlinks, never followed; fifos, sockets
//! and devices are refused.
//!
//! The layer: the destination is resolved through the image's lower layers as overlayfs will
//! show them (whiteouts, opaque directories, symlinks followed within the image, never on the
//! host), so `COPY x /bin/` in an image whose `/bin` is a link to `usr/bin` lands in
//! `/usr/bin`, and a directory the copy must create keeps the owner and mode the image gives
//! it. Every write into the new layer is relative to a directory opened without following any
//! symlink, so a symlink the copy itself placed is never written through. Owners are
//! canonical (root 0, the sandbox's user 1000) like every stored layer.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use sha2::{Digest as _, Sha256};

use crate::unpack::OPAQUE_XATTR;

/// Why a COPY failed; the build wraps it with the step.
pub type CopyError = String;

const NOFOLLOW_BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS);

/// One source entry found in the context: its path relative to the context, and whether it
/// was named directly (a file or directory given on the COPY line or matched by a glob).
#[derive(Debug, Clone)]
pub struct Source {
    /// Relative to the context, normalised (no `.`, `..`, empty components).
    pub rel: String,
    pub is_dir: bool,
}

/// The build context: a directory, opened once.
#[derive(Debug)]
pub struct Context {
    root: OwnedFd,
    path: PathBuf,
    ignore: Ignore,
}

/// The context's `.dockerignore`: patterns (`*`, `?` within a component, `**` across
/// components) with `!` exceptions, the last matching line deciding; a pattern that matches a
/// directory excludes everything beneath it.
#[derive(Debug, Default)]
pub struct Ignore {
    rules: Vec<(bool, Vec<String>)>,
}

impl Ignore {
    pub fn parse(text: &str) -> Ignore {
        let mut rules = Vec::new();
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let (keep, pat) = match l.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, l),
            };
            let c = comps(pat);
            if !c.is_empty() {
                rules.push((keep, c));
            }
        }
        Ignore { rules }
    }

    /// Whether `rel` (relative to the context) is excluded.
    pub fn excluded(&self, rel: &str) -> bool {
        let path = comps(rel);
        let mut out = false;
        for (keep, pat) in &self.rules {
            let hit = (1..=path.len()).any(|n| pattern_match(pat, &path[..n]));
            if hit {
                out = !keep;
            }
        }
        out
    }

    fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(keep, _)| *keep)
    }
}

fn pattern_match(pat: &[String], path: &[String]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => {
            (0..=path.len()).any(|skip| pattern_match(rest, &path[skip..]))
        }
        Some((p, rest)) => match path.split_first() {
            Some((c, more)) => glob_match(p, c) && pattern_match(rest, more),
            None => false,
        },
    }
}

fn open_beneath(dir: impl AsFd, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(dir, rel, flags | OFlags::CLOEXEC, Mode::empty(), NOFOLLOW_BENEATH)
}

impl Context {
    pub fn open(path: &Path) -> Result<Context, CopyError> {
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("build context {}: {e}", path.display()))?;
        let ignore = match open_beneath(&root, ".dockerignore", OFlags::RDONLY) {
            Ok(fd) => {
                let mut text = String::new();
                File::from(fd)
                    .take(1 << 20)
                    .read_to_string(&mut text)
                    .map_err(|e| format!("read .dockerignore: {e}"))?;
                Ignore::parse(&text)
            }
            Err(_) => Ignore::default(),
        };
        Ok(Context { root, path: path.to_path_buf(), ignore })
    }

    /// Whether the context has a `.dockerignore` with any pattern.
    pub fn ignores_anything(&self) -> bool {
        !self.ignore.rules.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Expands one COPY source (after substitution) into the entries it names.
    pub fn sources(&self, src: &str) -> Result<Vec<Source>, CopyError> {
        if src.contains("://") || src.starts_with("git@") {
            return Err(format!(
                "{src:?}: remote sources (URLs, git) are not supported; download in a RUN step (through the build egress, --build-egress) or put the file in the context"
            ));
        }
        if src.starts_with('/') {
            return Err(format!(
                "{src:?}: an absolute path; sources are relative to the build context {}",
                self.path.display()
            ));
        }
        let mut parts: Vec<&str> = Vec::new();
        for c in src.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err(format!(
                            "{src:?} leaves the build context {} (`..`)",
                            self.path.display()
                        ));
                    }
                }
                c => parts.push(c),
            }
        }
        // Expand globs component by component.
        let mut found: Vec<String> = vec![String::new()];
        for part in &parts {
            let mut next = Vec::new();
            for base in &found {
                if is_glob(part) {
                    let dir = open_beneath(&self.root, base, OFlags::RDONLY | OFlags::DIRECTORY);
                    let Ok(dir) = dir else { continue };
                    let mut names: Vec<String> = Vec::new();
                    let entries = rustix::fs::Dir::read_from(&dir)
                        .map_err(|e| format!("{src:?}: read {base:?}: {e}"))?;
                    for e in entries {
                        let e = e.map_err(|e| format!("{src:?}: read {base:?}: {e}"))?;
                        let name = String::from_utf8_lossy(e.file_name().to_bytes()).into_owned();
                        if name != "."
                            && name != ".."
                            && glob_match(part, &name)
                            && !self.ignore.excluded(&join(base, &name))
                        {
                            names.push(name);
                        }
                    }
                    names.sort();
                    next.extend(names.into_iter().map(|n| join(base, &n)));
                } else {
                    next.push(join(base, part));
                }
            }
            found = next;
        }
        if found.is_empty() {
            return Err(format!("{src:?}: no file in the build context matches"));
        }
        let mut out = Vec::new();
        for rel in found {
            if !rel.is_empty() && self.ignore.excluded(&rel) {
                return Err(format!("{rel:?} is excluded by the context's .dockerignore"));
            }
            let st = rustix::fs::statat(
                &self.root,
                if rel.is_empty() { "." } else { rel.as_str() },
                AtFlags::SYMLINK_NOFOLLOW,
            );
            // The parents were opened through no symlink only if this open succeeds.
            let opened = open_beneath(&self.root, &rel, OFlags::PATH | OFlags::NOFOLLOW);
            match (st, opened) {
                (_, Err(rustix::io::Errno::LOOP)) | (_, Err(rustix::io::Errno::XDEV)) => {
                    return Err(format!(
                        "{rel:?}: reached through a symlink; symlinks in the context are not followed"
                    ));
                }
                (Err(rustix::io::Errno::NOENT), _) | (_, Err(rustix::io::Errno::NOENT)) => {
                    return Err(format!(
                        "{src:?}: not found in the build context {}",
                        self.path.display()
                    ));
                }
                (Err(e), _) | (_, Err(e)) => return Err(format!("{rel:?}: {e}")),
                (Ok(st), Ok(_)) => match FileType::from_raw_mode(st.st_mode) {
                    FileType::RegularFile => out.push(Source { rel, is_dir: false }),
                    FileType::Directory => out.push(Source { rel, is_dir: true }),
                    FileType::Symlink => {
                        return Err(format!(
                            "{rel:?} is a symlink; symlinks named as sources are not followed \
                             (copy what it points to, or the directory holding it)"
                        ));
                    }
                    other => {
                        return Err(format!(
                            "{rel:?} is a {}; only files, directories and symlinks within directories can be copied",
                            kind_name(other)
                        ));
                    }
                },
            }
        }
        Ok(out)
    }

    /// Hashes what `sources` hold (paths, types, modes, sizes, contents, link targets), in a
    /// fixed order: the cache key's input. Owners and times of context files are not part of
    /// it: the copy sets its own owners, and a touched file with the same bytes is the same.
    pub fn hash(&self, sources: &[Source]) -> Result<String, CopyError> {
        let mut h = Sha256::new();
        for s in sources {
            h.update(b"source\0");
            h.update(s.rel.as_bytes());
            h.update(b"\0");
            self.walk(&s.rel, &mut |rel, entry| {
                h.update(rel.as_bytes());
                h.update(b"\0");
                match entry {
                    Entry::Dir { mode } => h.update(format!("d {mode:o}\0")),
                    Entry::Symlink { target } => {
                        h.update(b"l ");
                        h.update(target.as_bytes());
                        h.update(b"\0");
                    }
                    Entry::File { mode, file, .. } => {
                        h.update(format!("f {mode:o}\0"));
                        let mut f =
                            File::from(file.try_clone().map_err(|e| format!("{rel:?}: {e}"))?);
                        let mut fh = Sha256::new();
                        let n = std::io::copy(&mut f, &mut fh)
                            .map_err(|e| format!("read {rel:?}: {e}"))?;
                        h.update(format!("{n}\0"));
                        h.update(fh.finalize());
                    }
                }
                Ok(())
            })?;
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Calls `f` for `rel` and (a directory) everything beneath it, parents first, names in
    /// byte order, with paths relative to `rel` (`""` is `rel` itself).
    fn walk(
        &self,
        rel: &str,
        f: &mut dyn FnMut(&str, Entry) -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        let fd =
            open_beneath(&self.root, rel, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK)
                .map_err(|e| format!("open {rel:?} in the context: {e}"))?;
        walk_fd(fd, "", rel, &self.ignore, f)
    }
}

/// An entry of a copied tree.
#[derive(Debug)]
pub enum Entry {
    Dir {
        mode: u32,
    },
    /// The file, open for reading.
    File {
        mode: u32,
        file: OwnedFd,
        mtime: (i64, i64),
    },
    Symlink {
        target: String,
    },
}

/// `prefix`: where `rel` starts in the context (for `.dockerignore`).
fn walk_fd(
    fd: OwnedFd,
    rel: &str,
    prefix: &str,
    ignore: &Ignore,
    f: &mut dyn FnMut(&str, Entry) -> Result<(), CopyError>,
) -> Result<(), CopyError> {
    let st = rustix::fs::fstat(&fd).map_err(|e| format!("stat {rel:?}: {e}"))?;
    let mode = st.st_mode & 0o7777;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => f(
            rel,
            Entry::File {
                mode,
                file: fd,
                mtime: (st.st_mtime, i64::try_from(st.st_mtime_nsec).unwrap_or(0)),
            },
        ),
        FileType::Directory => {
            // An excluded directory reached only for an exception beneath it (`!dir/keep`)
            // is not copied itself; the copy creates it as a parent if anything is kept.
            if rel.is_empty() || !ignore.excluded(&join(prefix, rel)) {
                f(rel, Entry::Dir { mode })?;
            }
            let mut names: Vec<Vec<u8>> = Vec::new();
            for e in rustix::fs::Dir::read_from(&fd).map_err(|e| format!("read {rel:?}: {e}"))? {
                let e = e.map_err(|e| format!("read {rel:?}: {e}"))?;
                let n = e.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.push(n.to_vec());
                }
            }
            names.sort();
            for name in names {
                let child_rel = join(rel, &String::from_utf8_lossy(&name));
                let in_ctx = join(prefix, &child_rel);
                let skipped = ignore.excluded(&in_ctx);
                let cst =
                    rustix::fs::statat(&fd, OsStr::from_bytes(&name), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| format!("stat {child_rel:?}: {e}"))?;
                let kind = FileType::from_raw_mode(cst.st_mode);
                if skipped && !(kind == FileType::Directory && ignore.has_exceptions()) {
                    continue;
                }
                match kind {
                    FileType::Symlink => {
                        let t = rustix::fs::readlinkat(&fd, OsStr::from_bytes(&name), Vec::new())
                            .map_err(|e| format!("readlink {child_rel:?}: {e}"))?;
                        let target = String::from_utf8_lossy(t.as_bytes()).into_owned();
                        f(&child_rel, Entry::Symlink { target })?;
                    }
                    FileType::RegularFile | FileType::Directory => {
                        // O_NOFOLLOW: if the entry was swapped for a symlink since the stat,
                        // the open fails rather than follows it.
                        let child = rustix::fs::openat(
                            &fd,
                            OsStr::from_bytes(&name),
                            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                            Mode::empty(),
                        )
                        .map_err(|e| format!("open {child_rel:?}: {e}"))?;
                        walk_fd(child, &child_rel, prefix, ignore, f)?;
                    }
                    other => {
                        return Err(format!(
                            "{child_rel:?} is a {}; only files, directories and symlinks can be copied",
                            kind_name(other)
                        ));
                    }
                }
            }
            Ok(())
        }
        other => Err(format!("{rel:?} is a {}; it cannot be copied", kind_name(other))),
    }
}

fn kind_name(t: FileType) -> &'static str {
    match t {
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Symlink => "symlink",
        FileType::Directory => "directory",
        FileType::RegularFile => "file",
        _ => "special file",
    }
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() { name.to_string() } else { format!("{base}/{name}") }
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// `*` (any run of characters) and `?` (one character) within one path component.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// What a path is in the image's lower layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub kind: FileType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub target: Option<String>,
}

/// The lower layers of an image, read as overlayfs merges them (topmost first).
#[derive(Debug)]
pub struct Layered {
    roots: Vec<OwnedFd>,
}

impl Layered {
    pub fn open(layers: &[PathBuf]) -> Result<Layered, CopyError> {
        let mut roots = Vec::new();
        for l in layers {
            let fd = rustix::fs::open(
                l,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| format!("open layer {}: {e}", l.display()))?;
            roots.push(fd);
        }
        Ok(Layered { roots })
    }

    /// Looks `comps` up without following a symlink at any component (the caller resolves).
    pub fn lookup(&self, comps: &[String]) -> Option<Found> {
        let mut dirs: Vec<OwnedFd> = Vec::new();
        for r in &self.roots {
            dirs.push(r.try_clone().ok()?);
        }
        let mut found = None;
        for (i, name) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            let mut next = Vec::new();
            found = None;
            for d in &dirs {
                let Ok(st) = rustix::fs::statat(d, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                let kind = FileType::from_raw_mode(st.st_mode);
                if kind == FileType::CharacterDevice && st.st_rdev == 0 {
                    break; // a whiteout hides this name in every layer below
                }
                let is_dir = kind == FileType::Directory;
                match &found {
                    None => {
                        let target = (kind == FileType::Symlink)
                            .then(|| rustix::fs::readlinkat(d, name.as_str(), Vec::new()).ok())
                            .flatten()
                            .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned());
                        found = Some(Found {
                            kind,
                            mode: st.st_mode & 0o7777,
                            uid: st.st_uid,
                            gid: st.st_gid,
                            target,
                        });
                    }
                    Some(f) if f.kind != FileType::Directory || !is_dir => break,
                    Some(_) => {}
                }
                if !is_dir {
                    break;
                }
                if !last {
                    let Ok(sub) = rustix::fs::openat(
                        d,
                        name.as_str(),
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) else {
                        break;
                    };
                    let mut v = [0u8; 1];
                    let opaque = rustix::fs::fgetxattr(&sub, OPAQUE_XATTR, &mut v)
                        .is_ok_and(|n| n == 1 && v[0] == b'y');
                    next.push(sub);
                    if opaque {
                        break;
                    }
                }
            }
            if !last && found.as_ref().is_none_or(|f| f.kind != FileType::Directory) {
                return None;
            }
            dirs = next;
        }
        found
    }

    /// Resolves `path` (absolute, in the image) following symlinks within the image, as the
    /// kernel would inside the sandbox; `..` stops at the root. Returns the components.
    pub fn resolve(&self, path: &str) -> Result<Vec<String>, CopyError> {
        let mut todo: std::collections::VecDeque<String> = comps(path).into();
        let mut done: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop_front() {
            if c == ".." {
                done.pop();
                continue;
            }
            let mut cand = done.clone();
            cand.push(c);
            match self.lookup(&cand) {
                Some(Found { target: Some(t), .. }) => {
                    hops += 1;
                    if hops > 40 {
                        return Err(format!("{path}: too many levels of symlinks in the image"));
                    }
                    if t.starts_with('/') {
                        done.clear();
                    }
                    for (i, c) in comps(&t).into_iter().enumerate() {
                        todo.insert(i, c);
                    }
                }
                _ => done = cand,
            }
        }
        Ok(done)
    }
}

/// Path components, without empty and `.` ones (`..` kept for the resolver).
pub fn comps(path: &str) -> Vec<String> {
    path.split('/').filter(|c| !c.is_empty() && *c != ".").map(str::to_string).collect()
}

/// The new layer being written.
#[derive(Debug)]
pub struct NewLayer<'a> {
    root: OwnedFd,
    lowers: &'a Layered,
    /// Owner for directories the copy creates that the image does not have.
    pub dir_owner: (u32, u32),
    pub entries: u64,
    pub bytes: u64,
}

impl<'a> NewLayer<'a> {
    pub fn open(dir: &Path, lowers: &'a Layered) -> Result<NewLayer<'a>, CopyError> {
        let root = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("open {}: {e}", dir.display()))?;
        Ok(NewLayer { root, lowers, dir_owner: (0, 0), entries: 0, bytes: 0 })
    }

    /// Makes sure directory `comps` exists in the new layer, each missing component created
    /// with the owner and mode the image gives it (or `dir_owner`, 0755 where it has none).
    /// Returns the directory, opened.
    pub fn ensure_dir(&mut self, comps: &[String]) -> Result<OwnedFd, CopyError> {
        let mut cur = self.root.try_clone().map_err(|e| e.to_string())?;
        for i in 0..comps.len() {
            let name = comps[i].as_str();
            let shown = format!("/{}", comps[..=i].join("/"));
            match rustix::fs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                Ok(_) => return Err(format!("{shown} exists and is not a directory")),
                Err(_) => {
                    let (mode, uid, gid) = match self.lowers.lookup(&comps[..=i]) {
                        Some(f) if f.kind == FileType::Directory => (f.mode, f.uid, f.gid),
                        Some(f) => {
                            return Err(format!(
                                "{shown} is a {} in the image, not a directory",
                                kind_name(f.kind)
                            ));
                        }
                        None => (0o755, self.dir_owner.0, self.dir_owner.1),
                    };
                    rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| format!("mkdir {shown}: {e}"))?;
                    set_meta(&cur, name, uid, gid, Some(mode))
                        .map_err(|e| format!("{shown}: {e}"))?;
                    self.entries += 1;
                }
            }
            cur = rustix::fs::openat(
                &cur,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| format!("open {shown}: {e}"))?;
        }
        Ok(cur)
    }
}

fn set_meta(
    dir: &OwnedFd,
    name: &str,
    uid: u32,
    gid: u32,
    mode: Option<u32>,
) -> rustix::io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if let Some(m) = mode {
        // After the chown, which clears set-id bits.
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(m), AtFlags::empty())?;
    }
    Ok(())
}

/// How a COPY writes: owners, mode override.
#[derive(Debug, Clone, Copy)]
pub struct CopyOpts {
    pub uid: u32,
    pub gid: u32,
    pub chmod: Option<u32>,
}

/// Copies `sources` to `dest` (absolute in the image, after WORKDIR) into `layer`, following
/// Docker's rules: a directory's contents go into `dest`; a file goes to `dest` itself unless
/// `dest` ends with `/` or is a directory in the image; several sources need a directory.
/// Returns the hash of what was written (the same form as [`Context::hash`]), so the caller
/// can tell whether the context changed since it computed the cache key.
pub fn copy(
    ctx: &Context,
    sources: &[Source],
    dest: &str,
    opts: CopyOpts,
    layer: &mut NewLayer<'_>,
) -> Result<String, CopyError> {
    let dir_dest = dest.ends_with('/') || sources.len() > 1 || sources.iter().any(|s| s.is_dir);
    let target = layer.lowers.resolve(dest)?;
    let into_dir =
        dir_dest || layer.lowers.lookup(&target).is_some_and(|f| f.kind == FileType::Directory);
    let mut h = Sha256::new();
    for s in sources {
        h.update(b"source\0");
        h.update(s.rel.as_bytes());
        h.update(b"\0");
        let base = if s.is_dir {
            target.clone()
        } else if into_dir {
            let mut t = target.clone();
            t.push(s.rel.rsplit('/').next().unwrap_or(&s.rel).to_string());
            t
        } else {
            target.clone()
        };
        if base.is_empty() && !s.is_dir {
            return Err(format!("cannot copy file {:?} over the image's root directory", s.rel));
        }
        ctx.walk(&s.rel, &mut |rel, entry| {
            h.update(rel.as_bytes());
            h.update(b"\0");
            let mut path = base.clone();
            path.extend(comps(rel));
            // Intermediate directories of the tree resolve through the image too (a link
            // `lib -> usr/lib` in the image receives `lib/x` in `usr/lib`).
            let (parent, name) = match path.split_last() {
                Some((name, parent)) => {
                    (layer.lowers.resolve(&format!("/{}", parent.join("/")))?, name.clone())
                }
                None => (Vec::new(), String::new()),
            };
            match entry {
                Entry::Dir { mode } => {
                    h.update(format!("d {mode:o}\0"));
                    let mut full = parent;
                    if !name.is_empty() {
                        full.push(name);
                    }
                    let full = layer.lowers.resolve(&format!("/{}", full.join("/")))?;
                    let existed = layer.lowers.lookup(&full).is_some();
                    let saved = layer.dir_owner;
                    layer.dir_owner = (opts.uid, opts.gid);
                    let made = layer.ensure_dir(&full);
                    layer.dir_owner = saved;
                    let fd = made?;
                    // A directory the copy brings gets the source's mode (or --chmod) and the
                    // copy's owner; one the image already has keeps its own.
                    if !existed && !full.is_empty() {
                        rustix::fs::fchown(
                            &fd,
                            Some(rustix::fs::Uid::from_raw(opts.uid)),
                            Some(rustix::fs::Gid::from_raw(opts.gid)),
                        )
                        .map_err(|e| format!("chown {rel:?}: {e}"))?;
                        rustix::fs::fchmod(&fd, Mode::from_raw_mode(opts.chmod.unwrap_or(mode)))
                            .map_err(|e| format!("chmod {rel:?}: {e}"))?;
                    }
                }
                Entry::Symlink { target: t } => {
                    h.update(b"l ");
                    h.update(t.as_bytes());
                    h.update(b"\0");
                    let dir = layer.ensure_dir(&parent)?;
                    let _ = rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty());
                    rustix::fs::symlinkat(t.as_str(), &dir, name.as_str())
                        .map_err(|e| format!("symlink {rel:?}: {e}"))?;
                    set_meta(&dir, &name, opts.uid, opts.gid, None)
                        .map_err(|e| format!("{rel:?}: {e}"))?;
                    layer.entries += 1;
                }
                Entry::File { mode, file, mtime } => {
                    h.update(format!("f {mode:o}\0"));
                    let dir = layer.ensure_dir(&parent)?;
                    match rustix::fs::statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                            return Err(format!(
                                "cannot copy file {rel:?} over directory /{}",
                                path.join("/")
                            ));
                        }
                        Ok(_) => {
                            let _ = rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty());
                        }
                        Err(_) => {}
                    }
                    let out = rustix::fs::openat(
                        &dir,
                        name.as_str(),
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(|e| format!("create /{}: {e}", path.join("/")))?;
                    let mut out = File::from(out);
                    let mut src = File::from(file);
                    let mut fh = Sha256::new();
                    let mut buf = vec![0u8; 128 << 10];
                    let mut n = 0u64;
                    loop {
                        let k = src.read(&mut buf).map_err(|e| format!("read {rel:?}: {e}"))?;
                        if k == 0 {
                            break;
                        }
                        fh.update(&buf[..k]);
                        out.write_all(&buf[..k])
                            .map_err(|e| format!("write /{}: {e}", path.join("/")))?;
                        n += k as u64;
                    }
                    h.update(format!("{n}\0"));
                    h.update(fh.finalize());
                    rustix::fs::fchown(
                        &out,
                        Some(rustix::fs::Uid::from_raw(opts.uid)),
                        Some(rustix::fs::Gid::from_raw(opts.gid)),
                    )
                    .map_err(|e| format!("chown {rel:?}: {e}"))?;
                    rustix::fs::fchmod(&out, Mode::from_raw_mode(opts.chmod.unwrap_or(mode)))
                        .map_err(|e| format!("chmod {rel:?}: {e}"))?;
                    let ts = rustix::fs::Timestamps {
                        last_access: rustix::fs::Timespec {
                            tv_sec: mtime.0,
                            tv_nsec: mtime.1 as _,
                        },
                        last_modification: rustix::fs::Timespec {
                            tv_sec: mtime.0,
                            tv_nsec: mtime.1 as _,
                        },
                    };
                    let _ = rustix::fs::futimens(&out, &ts);
                    layer.entries += 1;
                    layer.bytes += n;
                }
            }
            Ok(())
        })?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Parses `--chmod` (octal only).
pub fn parse_chmod(s: &str) -> Result<u32, CopyError> {
    u32::from_str_radix(s, 8).ok().filter(|m| *m <= 0o7777).ok_or_else(|| {
        format!(
            "--chmod={s}: expected an octal mode such as 0644 (symbolic modes are not supported)"
        )
    })
}

/// The ids a `--chown`/USER spec names: numbers, or names looked up in the image's
/// `/etc/passwd` and `/etc/group` (read through the layers, nothing followed out of them).
pub fn resolve_ids(
    spec: &str,
    lowers: &Layered,
    layer_dirs: &[PathBuf],
) -> Result<(u32, u32), CopyError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_image_file(lowers, layer_dirs, "/etc/passwd");
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => lookup_name(&passwd, user, 2)
            .ok_or_else(|| format!("user {user:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => match user.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup_name(&passwd, user, 3).unwrap_or(uid),
        },
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => {
                let groups = read_image_file(lowers, layer_dirs, "/etc/group");
                lookup_name(&groups, g, 2)
                    .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?
            }
        },
    };
    if uid >= 65536 || gid >= 65536 {
        return Err(format!("{spec:?}: ids above 65535 are outside every sandbox's range"));
    }
    Ok((uid, gid))
}

fn lookup_name(text: &str, name: &str, field: usize) -> Option<u32> {
    text.lines()
        .find(|l| l.split(':').next() == Some(name))
        .and_then(|l| l.split(':').nth(field))
        .and_then(|v| v.parse().ok())
}

/// A file of the image (at most 1 MiB), found as overlayfs would, through no symlink.
pub fn read_image_file(lowers: &Layered, layer_dirs: &[PathBuf], path: &str) -> String {
    let c = comps(path);
    if lowers.lookup(&c).is_none_or(|f| f.kind != FileType::RegularFile) {
        return String::new();
    }
    let rel = c.join("/");
    for dir in layer_dirs {
        let Ok(root) = rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            continue;
        };
        if let Ok(fd) = open_beneath(&root, &rel, OFlags::RDONLY) {
            let mut s = String::new();
            let _ = File::from(fd).take(1 << 20).read_to_string(&mut s);
            return s;
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_patterns_exclude_with_exceptions() {
        let i = Ignore::parse("# comment\n.git\n*.log\n**/tmp\nbuild/*\n!build/keep.txt\n");
        assert!(i.excluded(".git") && i.excluded(".git/config"));
        assert!(i.excluded("a.log") && !i.excluded("dir/a.log"));
        assert!(i.excluded("tmp/x") && i.excluded("a/b/tmp") && i.excluded("a/b/tmp/c"));
        assert!(i.excluded("build/out.o") && !i.excluded("build/keep.txt"));
        assert!(!i.excluded("src/main.rs") && !i.excluded("build"));
    }

    #[test]
    fn globs_match_within_a_component() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*", ".hidden"));
        assert!(!glob_match("*.txt", "a.txt.bak"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXbY"));
    }
}
