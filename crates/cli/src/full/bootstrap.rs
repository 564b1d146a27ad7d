//! `ringfence template bootstrap`: a Debian base template made from Debian's archive with
//! `debootstrap`, with user `user` (uid 1000) and passwordless `sudo` to the sandbox's own root.
//!
//! Everything happens on the host, as host root, in a scratch directory of the image store,
//! inside a private mount namespace (`unshare --mount`) so the `/proc` and `/dev` mounts the
//! package scripts need vanish with it, whatever happens. Only the finished tree becomes a
//! layer, and the template record names it last: an interrupted or failed bootstrap leaves
//! nothing registered (its scratch directory is swept by the next build or bootstrap).

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use ringfence_image::build::{BuildProgress, StepResult};
use ringfence_image::oci::{Digest, RunConfig};
use ringfence_image::{LayerRecord, Record, Store};

use crate::build::Display;
use ringfence::Common;

/// What the base holds beyond debootstrap's minimal base: what E2B's base template offers.
pub const DEFAULT_PACKAGES: &[&str] =
    &["sudo", "python3", "python-is-python3", "nodejs", "git", "curl", "ca-certificates"];

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    /// Template name (NAME or NAME:TAG; the tag defaults to `latest`).
    #[arg(long, default_value = "debian")]
    name: String,
    /// Debian release to bootstrap.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Debian archive to fetch from. Default: the one the host's apt uses
    /// (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list), else
    /// http://deb.debian.org/debian.
    #[arg(long)]
    mirror: Option<String>,
    /// Packages to install (comma-separated or repeated), replacing the default set
    /// (sudo, python3, python-is-python3, nodejs, git, curl, ca-certificates); `sudo` is
    /// always added.
    #[arg(long, value_delimiter = ',')]
    packages: Vec<String>,
    #[command(flatten)]
    common: Common,
}

/// The sandbox's DNS, as in the built-in templates (see `ringfence_jail::template`).
const RESOLV_CONF: &str = "nameserver 100.96.0.1\noptions timeout:2 attempts:2\n";

/// Run inside the new root (`chroot`, as host root, network from the host): packages, the
/// user, sudo, and apt's caches gone. Packages arrive as "$@", never as shell text.
const SETUP_SCRIPT: &str = r#"set -eu
apt-get update
apt-get install -y --no-install-recommends "$@"
useradd --uid 1000 --user-group --create-home --home-dir /home/user --shell /bin/bash user
printf 'user ALL=(ALL:ALL) NOPASSWD: ALL\n' > /etc/sudoers.d/user
chmod 0440 /etc/sudoers.d/user
visudo -c -f /etc/sudoers.d/user
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log \
  /var/log/alternatives.log /var/cache/debconf/*-old /var/lib/dpkg/*-old
"#;

pub fn bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    if ringfence_sys::euid() != 0 {
        bail!("template bootstrap needs root (debootstrap, chroot, and files owned by root)");
    }
    let name = ringfence_image::normalize_name(&args.name)?;
    let bare = name.split(':').next().unwrap_or(&name);
    if ringfence_image::store::RESERVED.contains(&bare) {
        bail!("{bare:?} is a built-in template's name; choose another --name");
    }
    check_word("--suite", &args.suite)?;
    let mirror = match args.mirror {
        Some(m) => m,
        None => host_mirror(&args.suite),
    };
    if !(mirror.starts_with("http://") || mirror.starts_with("https://"))
        || mirror.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        bail!("--mirror {mirror:?}: expected an http:// or https:// URL of a Debian archive");
    }
    let mut packages: Vec<String> = if args.packages.is_empty() {
        DEFAULT_PACKAGES.iter().map(|s| (*s).to_string()).collect()
    } else {
        args.packages.iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
    };
    if !packages.iter().any(|p| p == "sudo") {
        packages.push("sudo".into());
    }
    for p in &packages {
        check_package(p)?;
    }
    let debootstrap = find_tool("debootstrap")?;
    let unshare = find_tool("unshare")?;

    let store = Store::open(&args.common.data_dir)?;
    let scratch = store.build_scratch()?;
    let rootfs = scratch.dir.join("rootfs");
    let mut display = Display::new();
    let total = 3;

    // 1. The minimal base, from the archive (signatures checked against the host's keyring).
    let text = format!("debootstrap --variant=minbase {} {mirror}", args.suite);
    display.step(1, total, &text);
    let t = Instant::now();
    let mut cmd = Command::new(&unshare);
    cmd.args(["--mount", "--propagation", "private", "--fork", "--kill-child", "--"])
        .arg(&debootstrap)
        .args(["--variant=minbase", "--components=main"])
        .arg(&args.suite)
        .arg(&rootfs)
        .arg(&mirror);
    stream(cmd, "debootstrap", &mut display).inspect_err(|_| display.failed())?;
    display.step_done(1, total, StepResult::Built, t.elapsed());

    // 2. Packages, the user and sudo, inside the new root.
    display.step(2, total, &format!("apt-get install {}", packages.join(" ")));
    let t = Instant::now();
    let root = rootfs.to_str().context("the scratch path is not UTF-8")?;
    // /proc and /dev for the package scripts, in this private mount namespace only.
    let outer = r#"set -eu
mount -t proc proc "$1/proc"
mount --rbind /dev "$1/dev"
root=$1; shift
exec chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 HOME=/root /bin/sh -c "$0" bootstrap "$@"
"#;
    let mut cmd = Command::new(&unshare);
    cmd.args(["--mount", "--propagation", "private", "--fork", "--kill-child", "--"])
        .args(["/bin/sh", "-c", outer, SETUP_SCRIPT, root])
        .args(&packages);
    stream(cmd, "installing packages in the new root", &mut display)
        .inspect_err(|_| display.failed())?;
    display.step_done(2, total, StepResult::Built, t.elapsed());

    // 3. Host-specific files out, the layer and the template in.
    display.step(3, total, "register the template");
    let t = Instant::now();
    scrub(&rootfs).inspect_err(|_| display.failed())?;
    let (entries, bytes) = measure(&rootfs)?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Not reproducible (the archive moves on): each bootstrap is a layer of its own.
    let key = format!(
        "bootstrap\n{}\n{mirror}\n{}\n{nanos}\n{}",
        args.suite,
        packages.join(","),
        std::process::id()
    );
    let id = Digest::of(key.as_bytes());
    let created_by = format!(
        "ringfence template bootstrap --suite {} --mirror {mirror} --packages {}",
        args.suite,
        packages.join(",")
    );
    let rec = LayerRecord {
        diff_id: id.to_string(),
        entries,
        bytes,
        stream_bytes: 0,
        created_by: Some(created_by.clone()),
    };
    let record = Record {
        name: name.clone(),
        source: created_by,
        manifest_digest: None,
        config_digest: id.to_string(),
        layers: vec![rec.clone()],
        config: RunConfig {
            user: Some("user".into()),
            working_dir: Some("/home/user".into()),
            ..RunConfig::default()
        },
        image_created: None,
        imported_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        size: bytes,
        allow_setuid: true,
        start: None,
        owner: None,
    };
    // From here to the record, ctrl-c waits: the layer and the record that names it arrive
    // together, or neither does.
    let mut quiet = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        quiet.add(s);
    }
    let mut before = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&quiet), Some(&mut before)).context("block signals")?;
    let done = store.commit_layer(&rootfs, &id, rec).and_then(|_| store.register(&record));
    if done.is_err() {
        let dir = store.layer_dir(&id);
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_file(dir.with_extension("json"));
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&before), None).context("restore signals")?;
    if let Err(e) = done {
        display.failed();
        return Err(e.into());
    }
    display.step_done(3, total, StepResult::Built, t.elapsed());
    display.finish();
    drop(scratch);
    println!(
        "bootstrapped {name} (Debian {}, {} entries, {}) in {:.1}s",
        args.suite,
        entries,
        crate::template::human(bytes),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `cmd` with stdout and stderr merged into the progress display; fails with its exit
/// status and (through the display) its last lines of output.
fn stream(mut cmd: Command, what: &str, display: &mut Display) -> anyhow::Result<()> {
    let (rx, tx) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe for the output")?;
    cmd.stdin(Stdio::null()).stdout(tx.try_clone().context("dup")?).stderr(tx);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd.spawn().with_context(|| format!("{what}: run {program}"))?;
    // The command holds the pipe's write end: dropped, so the read below ends with the child.
    drop(cmd);
    let mut out = fs::File::from(rx);
    let mut buf = [0u8; 8192];
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => display.output(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read the output"),
        }
    }
    let status = child.wait().context("wait")?;
    if !status.success() {
        bail!("{what} failed ({status}); its last lines of output are above");
    }
    Ok(())
}

/// Removes what belongs to the host rather than the template, and what the jail provides
/// itself: device nodes debootstrap made in `/dev` (a sandbox gets its own `/dev`), the host's
/// resolver and hostname (each sandbox writes its own identity files), machine-id.
fn scrub(root: &Path) -> anyhow::Result<()> {
    for dir in ["dev", "proc", "sys", "tmp"] {
        let d = root.join(dir);
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                let p = e.path();
                let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                r.with_context(|| format!("remove {}", p.display()))?;
            }
        }
    }
    for f in ["etc/hostname", "etc/resolv.conf", "etc/machine-id", "var/lib/dbus/machine-id"] {
        let p = root.join(f);
        if fs::symlink_metadata(&p).is_ok() {
            fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    fs::write(root.join("etc/resolv.conf"), RESOLV_CONF).context("write etc/resolv.conf")?;
    // Empty, not absent: systemd-less programs read it, and each sandbox may fill its own.
    fs::write(root.join("etc/machine-id"), "").context("write etc/machine-id")?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
        .context("chmod tmp")?;
    // The layer must hold no device node anywhere (the store's rule for every layer).
    let (_, _) = walk(root, &mut |p, m| {
        let t = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        if t.is_block_device() || t.is_char_device() {
            fs::remove_file(p).with_context(|| format!("remove device node {}", p.display()))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Entries and bytes of file content under `root`.
fn measure(root: &Path) -> anyhow::Result<(u64, u64)> {
    walk(root, &mut |_, _| Ok(()))
}

fn walk(
    root: &Path,
    f: &mut dyn FnMut(&Path, &fs::Metadata) -> anyhow::Result<()>,
) -> anyhow::Result<(u64, u64)> {
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let e = e.with_context(|| format!("read {}", dir.display()))?;
            let p = e.path();
            let m = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
            entries += 1;
            if m.is_file() {
                bytes += m.size();
            }
            f(&p, &m)?;
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok((entries, bytes))
}

/// The Debian archive the host's apt uses for `suite`'s family, or Debian's CDN.
fn host_mirror(suite: &str) -> String {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let legacy = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    mirror_from(&deb822, &legacy, suite).unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// The first archive URI listed for `suite` (deb822 stanzas first, then one-line entries),
/// else the first that serves a plain (not `-security`) Debian suite.
pub(crate) fn mirror_from(deb822: &str, legacy: &str, suite: &str) -> Option<String> {
    let mut found: Vec<(String, Vec<String>)> = Vec::new();
    for stanza in deb822.split("\n\n") {
        let mut uris = Vec::new();
        let mut suites = Vec::new();
        let mut is_deb = true;
        for line in stanza.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("URIs:") {
                uris = v.split_whitespace().map(str::to_string).collect();
            } else if let Some(v) = line.strip_prefix("Suites:") {
                suites = v.split_whitespace().map(str::to_string).collect();
            } else if let Some(v) = line.strip_prefix("Types:") {
                is_deb = v.split_whitespace().any(|t| t == "deb");
            }
        }
        if is_deb {
            for u in uris {
                found.push((u, suites.clone()));
            }
        }
    }
    for line in legacy.lines() {
        let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
        if words.next() != Some("deb") {
            continue;
        }
        if let (Some(u), Some(s)) = (words.next(), words.next()) {
            found.push((u.to_string(), vec![s.to_string()]));
        }
    }
    let usable = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    found
        .iter()
        .find(|(u, s)| usable(u) && s.iter().any(|x| x == suite))
        .or_else(|| found.iter().find(|(u, s)| usable(u) && s.iter().any(|x| !x.contains('-'))))
        .map(|(u, _)| u.trim_end_matches('/').to_string())
}

fn check_word(flag: &str, v: &str) -> anyhow::Result<()> {
    let ok = !v.is_empty()
        && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !ok {
        bail!("{flag} {v:?}: expected a Debian suite name such as bookworm");
    }
    Ok(())
}

/// Debian policy's package names: lowercase letters, digits, `+ - .`, at least two, starting
/// alphanumeric (an optional `:arch` is not offered).
fn check_package(p: &str) -> anyhow::Result<()> {
    let mut chars = p.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = p
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '+' || c == '-' || c == '.');
    if !(first_ok && rest_ok && p.len() >= 2) {
        bail!("--packages: {p:?} is not a Debian package name");
    }
    Ok(())
}

fn find_tool(name: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed (apt-get install {name}, or run scripts/setup.sh)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_picks_the_suite() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm \
                      bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: \
                      http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from(deb822, "", "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        // Another suite: the plain archive, never the security one.
        assert_eq!(
            mirror_from(deb822, "", "trixie").as_deref(),
            Some("http://deb.debian.org/debian")
        );
    }

    #[test]
    fn mirror_from_one_line_entries() {
        let legacy = "# comment\ndeb [arch=amd64] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_from("", legacy, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(mirror_from("", "", "bookworm"), None);
    }

    #[test]
    fn package_names_are_checked() {
        assert!(check_package("python3").is_ok());
        assert!(check_package("g++").is_ok());
        assert!(check_package("x; rm -rf /").is_err());
        assert!(check_package("-oDebug").is_err());
        assert!(check_word("--suite", "bookworm").is_ok());
        assert!(check_word("--suite", "../etc").is_err());
    }
}
