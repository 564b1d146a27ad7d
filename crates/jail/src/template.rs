//! Templates: the read-only lower layers of a sandbox's root.
//!
//! The built-in template, `host`, reuses the host's own `/usr` (bound read-only) under a small
//! skeleton root (the lower layer of each sandbox's writable overlay `/`) built once into the data directory: the top-level
//! directories, merged-`/usr` symlinks and a minimal `/etc` copied from an allowlist, so
//! Python, sh and coreutils work with no download and no host secret (shadow files, keys, the
//! machine id) ever enters a sandbox.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

/// Errors building or loading a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {name:?}: {op} {path}: {source}")]
    Io {
        name: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unknown template {0:?} (available: host)")]
    Unknown(String),
    #[error(
        "template {name:?} needs {path} (the interpreter environment), which is missing: run \
         scripts/setup.sh (or scripts/interp-env.sh) on this host"
    )]
    MissingLayer { name: String, path: String },
}

/// Bump when the skeleton's contents change, so old builds are replaced.
const FORMAT: u32 = 7;

/// Entries of the host's `/etc` that a sandbox gets, copied (symlinks kept as symlinks).
/// Everything else, notably `shadow`, `gshadow`, `sudoers`, `ssh/` and `machine-id`, stays out.
const ETC_ALLOWLIST: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates.conf",
    "debian_version",
    "host.conf",
    "inputrc",
    // Configuration of the JDK and of R (Debian keeps them in /etc and links them from /usr),
    // for the interpreter's `java` and `r` kernels; no secrets.
    "java-17-openjdk",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "os-release",
    "profile",
    "protocols",
    "python3",
    "python3.11",
    "R",
    "services",
    "shells",
    "ssl",
    "timezone",
];

/// The template's `/etc/profile` (see `build_host`).
const PROFILE: &str = r#"# /etc/profile: sandbox-wide profile for sh-compatible login shells (Ringfence template).
if [ "${EUID:-$(id -u)}" -eq 0 ]; then
  PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
else
  PATH="/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games"
fi
export PATH

if [ "${PS1-}" ]; then
  if [ "${BASH-}" ] && [ "$BASH" != "/bin/sh" ]; then
    if [ -f /etc/bash.bashrc ]; then
      . /etc/bash.bashrc
    fi
  elif [ "${EUID:-$(id -u)}" -eq 0 ]; then
    PS1='# '
  else
    PS1='$ '
  fi
fi
"#;

/// Top-level host paths that may be merged-`/usr` symlinks or real directories.
const USR_MERGE: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// What a built template records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// Host directories bound read-only at the same path.
    pub host_layers: Vec<String>,
}

/// A built template, ready to be a sandbox's lower layer.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub rootfs: PathBuf,
    pub meta: Meta,
}

/// Loads the `host` template from `data_dir/templates/host`, building it first if it is
/// missing or stale. Concurrent callers serialise on a lock; readers of a finished template
/// never see a half-built one (it is built aside and renamed into place).
pub fn ensure_host(data_dir: &Path) -> Result<Template, TemplateError> {
    ensure_layered(data_dir, "host", &[])
}

/// The template for the code interpreter: `host` plus the interpreter environment (a Python
/// venv with the data libraries, built by `scripts/interp-env.sh`), bound read-only at the
/// same path inside so the fork server's imports resolve identically in every sandbox.
pub const INTERP_TEMPLATE: &str = "code-interpreter-v1";

/// Loads (building if needed) a template named `name`: the host skeleton plus `extra` host
/// directories bound read-only at the same paths.
pub fn ensure_layered(
    data_dir: &Path,
    name: &str,
    extra: &[String],
) -> Result<Template, TemplateError> {
    for layer in extra {
        if !Path::new(layer).is_dir() {
            return Err(TemplateError::MissingLayer { name: name.into(), path: layer.into() });
        }
    }
    ensure_built(data_dir, name, extra)
}

fn ensure_built(data_dir: &Path, name: &str, extra: &[String]) -> Result<Template, TemplateError> {
    let dir = data_dir.join("templates");
    let target = dir.join(name);
    let err = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| TemplateError::Io { name: name.into(), op, path, source }
    };
    if let Some(t) = load(&target, name, extra) {
        return Ok(t);
    }
    fs::create_dir_all(&dir).map_err(err("mkdir", &dir))?;
    // Templates hold canonical ids (host root's, and 1000 for the home directory) and are
    // reached only by the host, which mounts them into sandboxes through each one's id
    // mapping: no host user may walk in, whatever uid it has.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(err("chmod", &dir))?;
    let lock_path = dir.join(".lock");
    let lock_file = fs::File::create(&lock_path).map_err(err("create", &lock_path))?;
    let _lock =
        Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| TemplateError::Io {
            name: name.into(),
            op: "flock",
            path: lock_path.clone(),
            source: e.into(),
        })?;
    // Someone else may have built it while we waited.
    if let Some(t) = load(&target, name, extra) {
        return Ok(t);
    }
    let staging = dir.join(format!(".{name}.building"));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(err("remove", &staging))?;
    }
    let meta = build_host(&staging, extra).map_err(|(op, path, source)| TemplateError::Io {
        name: name.into(),
        op,
        path,
        source,
    })?;
    if target.exists() {
        let old = dir.join(format!(".{name}.old"));
        let _ = fs::remove_dir_all(&old);
        fs::rename(&target, &old).map_err(err("rename", &target))?;
        let _ = fs::remove_dir_all(&old);
    }
    fs::rename(&staging, &target).map_err(err("rename", &staging))?;
    Ok(Template { name: name.into(), rootfs: target.join("rootfs"), meta })
}

fn load(target: &Path, name: &str, extra: &[String]) -> Option<Template> {
    let meta: Meta = serde_json::from_slice(&fs::read(target.join("meta.json")).ok()?).ok()?;
    let layers_match = meta.host_layers.ends_with(extra);
    (meta.format == FORMAT && layers_match).then(|| Template {
        name: name.into(),
        rootfs: target.join("rootfs"),
        meta,
    })
}

type BuildError = (&'static str, PathBuf, io::Error);

fn at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuildError + 'a {
    move |e| (op, path.to_path_buf(), e)
}

fn build_host(staging: &Path, extra: &[String]) -> Result<Meta, BuildError> {
    let root = staging.join("rootfs");
    fs::create_dir_all(&root).map_err(at("mkdir", &root))?;
    let mut host_layers = vec!["/usr".to_string()];
    let mkdir = |rel: &str, mode: u32| -> Result<PathBuf, BuildError> {
        let p = root.join(rel);
        fs::create_dir_all(&p).map_err(at("mkdir", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).map_err(at("chmod", &p))?;
        Ok(p)
    };
    for d in ["usr", "proc", "sys", "dev", "etc", "var", "run", "opt", "mnt", "srv", "home"] {
        mkdir(d, 0o755)?;
    }
    mkdir("tmp", 0o1777)?;
    mkdir("var/tmp", 0o1777)?;
    mkdir("root", 0o700)?;
    mkdir("home/user", 0o755)?;
    for name in USR_MERGE {
        let host = Path::new("/").join(name);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let dest = fs::read_link(&host).map_err(at("readlink", &host))?;
                let link = root.join(name);
                symlink(&dest, &link).map_err(at("symlink", &link))?;
            }
            Ok(m) if m.is_dir() => {
                mkdir(name, 0o755)?;
                host_layers.push(host.to_string_lossy().into_owned());
            }
            _ => {}
        }
    }
    for layer in extra {
        // The mount point for a read-only bind of the host directory.
        mkdir(layer.trim_start_matches('/'), 0o755)?;
        host_layers.push(layer.clone());
    }
    let etc = root.join("etc");
    for name in ETC_ALLOWLIST {
        let src = Path::new("/etc").join(name);
        if fs::symlink_metadata(&src).is_ok() {
            copy_tree(&src, &etc.join(name))?;
        }
    }
    let write = |rel: &str, text: &str| -> Result<(), BuildError> {
        let p = root.join(rel);
        fs::write(&p, text).map_err(at("write", &p))
    };
    write(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\n\
         user:x:1000:1000:user:/home/user:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    )?;
    write(
        "etc/group",
        "root:x:0:\ntty:x:5:user\nusers:x:100:user\nuser:x:1000:\nnogroup:x:65534:\n",
    )?;
    write("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")?;
    // E2B runs every command as `bash -l -c ...`, so /etc/profile runs before each one. The
    // host's Debian profile forks `id -u` to choose PATH; bash knows its uid already (EUID),
    // which saves a fork and exec (~2 ms) on every command. Same result otherwise; no
    // /etc/profile.d (nothing in the template puts files there).
    write("etc/profile", PROFILE)?;
    // The server's sandboxes resolve through their gateway (ringfence_net::tun::GATEWAY_IP,
    // which answers every DNS query). Without a network (`ringfence run`) the address has no
    // route, so lookups fail at once instead of timing out.
    write("etc/resolv.conf", "nameserver 100.96.0.1\noptions timeout:2 attempts:2\n")?;
    // Canonical owners: root's, and `user`'s (1000) for its home. Each sandbox sees them as
    // its own root and user through its id mapping, so copy-up works inside.
    chown_tree(&root, 0, 0)?;
    let home = root.join("home/user");
    chown(&home, 1000, 1000)?;
    let meta = Meta { format: FORMAT, host_layers };
    let meta_path = staging.join("meta.json");
    let text =
        serde_json::to_vec_pretty(&meta).map_err(|e| ("encode", meta_path.clone(), e.into()))?;
    fs::write(&meta_path, text).map_err(at("write", &meta_path))?;
    Ok(meta)
}

fn copy_tree(src: &Path, dst: &Path) -> Result<(), BuildError> {
    let m = fs::symlink_metadata(src).map_err(at("stat", src))?;
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(src).map_err(at("readlink", src))?;
        symlink(&target, dst).map_err(at("symlink", dst))?;
    } else if ft.is_dir() {
        fs::create_dir_all(dst).map_err(at("mkdir", dst))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(m.permissions().mode() & 0o7777))
            .map_err(at("chmod", dst))?;
        for entry in fs::read_dir(src).map_err(at("readdir", src))? {
            let entry = entry.map_err(at("readdir", src))?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
    } else if ft.is_file() {
        fs::copy(src, dst).map_err(at("copy", src))?;
        // With the source's times: caches keyed by a file's modification time must still
        // match the copy. Python's compiled `sitecustomize` in the host's /usr (which the
        // template binds) records /etc/python3.*/sitecustomize.py's; a copy with a new time
        // made every Python start in a sandbox compile the file again (0.7 ms).
        let times = fs::FileTimes::new()
            .set_accessed(m.accessed().map_err(at("stat", src))?)
            .set_modified(m.modified().map_err(at("stat", src))?);
        fs::File::options()
            .write(true)
            .open(dst)
            .and_then(|f| f.set_times(times))
            .map_err(at("set times of", dst))?;
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), BuildError> {
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ("chown", path.to_path_buf(), e.into()))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<(), BuildError> {
    chown(path, uid, gid)?;
    let m = fs::symlink_metadata(path).map_err(at("stat", path))?;
    if m.is_dir() {
        for entry in fs::read_dir(path).map_err(at("readdir", path))? {
            let entry = entry.map_err(at("readdir", path))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Where `scripts/interp-env.sh` builds the interpreter environment by default.
pub const DEFAULT_INTERP_ENV: &str = "/opt/ringfence/python";

/// Resolves a template by name.
pub fn resolve(name: &str, data_dir: &Path) -> Result<Template, TemplateError> {
    match name {
        "host" | "base" => ensure_host(data_dir),
        INTERP_TEMPLATE => ensure_layered(data_dir, name, &[DEFAULT_INTERP_ENV.into()]),
        other => Err(TemplateError::Unknown(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn host_template_has_no_secrets_and_canonical_owners() {
        let dir = tempfile::tempdir().unwrap();
        let t = ensure_host(dir.path()).unwrap();
        let etc = t.rootfs.join("etc");
        for secret in ["shadow", "gshadow", "sudoers", "ssh", "machine-id", "hostname"] {
            assert!(!etc.join(secret).exists(), "{secret} must not be in the template");
        }
        let passwd = fs::read_to_string(etc.join("passwd")).unwrap();
        assert!(passwd.contains("user:x:1000:1000"));
        assert_eq!(fs::metadata(&t.rootfs).unwrap().uid(), 0);
        assert_eq!(fs::metadata(t.rootfs.join("home/user")).unwrap().uid(), 1000);
        // Closed to every host user: a host account with uid 1000 must not edit every
        // sandbox's home directory.
        let templates = dir.path().join("templates");
        assert_eq!(fs::metadata(&templates).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(t.rootfs.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
        assert!(t.meta.host_layers.contains(&"/usr".to_string()));
        // A second call reuses the build.
        let again = ensure_host(dir.path()).unwrap();
        assert_eq!(again.rootfs, t.rootfs);
    }

    #[test]
    fn a_template_of_an_older_format_is_rebuilt_with_canonical_owners() {
        let dir = tempfile::tempdir().unwrap();
        let t = ensure_host(dir.path()).unwrap();
        // What format 4 left: owners in the one range every sandbox used to share.
        let meta = t.rootfs.parent().unwrap().join("meta.json");
        fs::write(&meta, br#"{"format":4,"uid_base":100000000,"host_layers":["/usr"]}"#).unwrap();
        std::os::unix::fs::chown(&t.rootfs, Some(100_000_000), Some(100_000_000)).unwrap();
        let t = ensure_host(dir.path()).unwrap();
        assert_eq!(fs::metadata(&t.rootfs).unwrap().uid(), 0);
    }

    #[test]
    fn files_copied_from_the_hosts_etc_keep_their_modification_times() {
        let dir = tempfile::tempdir().unwrap();
        let t = ensure_host(dir.path()).unwrap();
        let mut compared = 0;
        // `profile` is the template's own (written after the copy).
        let copied = ETC_ALLOWLIST.iter().filter(|n| **n != "profile");
        for name in copied.chain(&["python3.11/sitecustomize.py"]) {
            let host = Path::new("/etc").join(name);
            let Ok(m) = fs::symlink_metadata(&host) else { continue };
            if !m.is_file() {
                continue;
            }
            let copy = fs::metadata(t.rootfs.join("etc").join(name)).unwrap();
            assert_eq!(copy.modified().unwrap(), m.modified().unwrap(), "{name}");
            compared += 1;
        }
        assert!(compared > 0, "no regular file of the allowlist on this host");
    }

    #[test]
    fn unknown_template_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve("nope", dir.path()).unwrap_err();
        assert!(e.to_string().contains("\"nope\""));
    }
}
