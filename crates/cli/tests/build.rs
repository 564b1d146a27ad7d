//! `ringfence template build` end to end: a busybox image made here (Debian's static busybox),
//! imported, then a Dockerfile with RUN/COPY/ENV/WORKDIR/USER steps built FROM it; the
//! template runs and shows what the steps made; a rebuild is fully cached; a changed file
//! reruns its step and those after it only; a failing RUN and hostile inputs are refused with
//! clear errors, leaving no template.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../image/tests/common/mod.rs"]
mod img;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::*;
use img::{E, Tar, docker_archive, oci_layout};
use ringfence_test_support::start_registry;

const BUSYBOX: &str = "/bin/busybox";

fn ready(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let ok = std::fs::read(BUSYBOX).is_ok_and(|b| b.len() > 4 && &b[..4] == b"\x7fELF")
        && Command::new(BUSYBOX).arg("--list").output().is_ok_and(|o| o.status.success());
    if !ok {
        println!(
            "SKIPPED {test}: {BUSYBOX} missing (apt-get install busybox-static; scripts/setup.sh does)"
        );
    }
    ok
}

/// busybox with the tools the Dockerfiles use, a passwd and group with `user` (1000) and
/// `app` (1000 too, a second name), and `/bin` holding the links.
fn busybox_layer() -> Vec<u8> {
    let bb = std::fs::read(BUSYBOX).unwrap();
    let mut t = Tar::default();
    t.dir("bin").entry(E { path: b"bin/busybox", data: &bb, mode: 0o755, ..E::default() });
    for tool in [
        "sh", "ls", "cat", "echo", "id", "pwd", "env", "touch", "rm", "sleep", "mkdir", "stat",
        "false", "true", "cp", "wc", "sort",
    ] {
        t.symlink(&format!("bin/{tool}"), "busybox");
    }
    t.dir("etc")
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
            0o644,
        )
        .file("etc/group", b"root:x:0:\nstaff:x:50:\nuser:x:1000:\n", 0o644);
    t.finish()
}

struct Env {
    tmp: tempfile::TempDir,
    data: PathBuf,
    ctx: PathBuf,
}

impl Env {
    /// A data directory with the busybox image imported as `bb`, and an empty context.
    fn new() -> Env {
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let data = tmp.path().join("data");
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        let archive = tmp.path().join("bb.tar");
        docker_archive(&archive, &[busybox_layer()], &["PATH=/bin"], "/");
        let e = Env { tmp, data, ctx };
        let o = e.cmd(&["template", "import", archive.to_str().unwrap(), "--name", "bb"]);
        assert!(o.status.success(), "{}", text(&o));
        e
    }

    fn cmd(&self, args: &[&str]) -> Output {
        ringfence().args(args).arg("--data-dir").arg(&self.data).output().unwrap()
    }

    fn write(&self, rel: &str, body: &str) {
        let p = self.ctx.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }

    fn build(&self, name: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "template",
            "build",
            "-f",
            self.ctx.join("Dockerfile").to_str().unwrap().to_owned().leak(),
            "--name",
            name,
            "--disk-backend",
            "tmpfs",
            "--disk",
            "256M",
        ];
        args.extend_from_slice(extra);
        self.cmd(&args)
    }

    fn run(&self, template: &str, script: &str) -> Out {
        run(
            &[
                "--data-dir",
                self.data.to_str().unwrap(),
                "--disk-backend",
                "tmpfs",
                "--template",
                template,
            ],
            &["sh", "-c", script],
        )
    }

    fn layers(&self) -> usize {
        std::fs::read_dir(self.data.join("images/layers"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().is_dir())
            .count()
    }
}

fn text(o: &Output) -> String {
    format!(
        "code {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `[n/m] RESULT` lines of a build's (non-terminal) progress, in order.
fn results(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| l.starts_with('[') && (l.ends_with("CACHED") || l.contains("] DONE ")))
        .map(str::to_string)
        .collect()
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG GREETING=hello
FROM bb
ARG GREETING
ENV APP_HOME=/srv/app \
    MODE="built here"
RUN echo "$GREETING from RUN" > /etc/motd && mkdir -p /opt/tool
COPY conf/*.conf /etc/app/
USER user
WORKDIR $APP_HOME
COPY --chown=user:staff --chmod=0640 data.txt ./
COPY scripts/ ./scripts/
RUN id -u > whoami.txt && cat data.txt | wc -l > lines.txt
LABEL org.example.purpose=test
CMD ["sh", "-c", "cat /etc/motd"]
"#;

fn populate(e: &Env) {
    e.write("Dockerfile", DOCKERFILE);
    e.write("conf/a.conf", "a=1\n");
    e.write("conf/b.conf", "b=2\n");
    e.write("conf/ignored.txt", "not copied\n");
    e.write("data.txt", "one\ntwo\n");
    e.write("scripts/run.sh", "echo run\n");
    e.write("scripts/secret.key", "not for the image\n");
    e.write(".dockerignore", "# keys stay out\n**/*.key\n");
}

#[test]
fn a_dockerfile_builds_runs_and_rebuilds_from_the_cache() {
    if !ready("a_dockerfile_builds_runs_and_rebuilds_from_the_cache") {
        return;
    }
    let e = Env::new();
    populate(&e);
    let t = Instant::now();
    let o = e.build("app:v1", &["--build-arg", "GREETING=hi"]);
    let cold = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("note: line 1: parser directive `syntax="), "{stderr}");
    // Six steps make layers (2 RUN, 3 COPY, the WORKDIR that had to be created).
    let r = results(&o);
    assert_eq!(r.len(), 6, "{r:?}\n{}", text(&o));
    assert!(r.iter().all(|l| l.contains("DONE")), "{r:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("built app:v1 (7 layers"), "{}", text(&o));

    // The template runs with what every step made.
    let out = e.run(
        "app:v1",
        "pwd; id -u; echo \"$MODE\"; cat /etc/motd; ls /etc/app; stat -c '%u:%g %a' data.txt; \
         cat whoami.txt lines.txt; ls scripts; test -d /opt/tool && echo tool",
    );
    assert_eq!(
        out.stdout,
        "/srv/app\n1000\nbuilt here\nhi from RUN\na.conf\nb.conf\n1000:50 640\n1000\n2\nrun.sh\ntool\n",
        "{out:?}"
    );
    // The start command and labels are the template's config.
    let o = e.cmd(&["template", "inspect", "app:v1"]);
    let rec: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rec["config"]["Cmd"], serde_json::json!(["sh", "-c", "cat /etc/motd"]));
    assert_eq!(rec["config"]["User"], "user");
    assert_eq!(rec["config"]["Labels"]["org.example.purpose"], "test");
    // The build sandboxes' identity files are not part of the image.
    for l in std::fs::read_dir(e.data.join("images/layers")).unwrap() {
        let l = l.unwrap().path();
        assert!(!l.join("etc/hostname").exists() && !l.join("etc/hosts").exists(), "{l:?}");
    }

    // Unchanged: every layer step CACHED, nothing changes, in under a second.
    let layers_before = e.layers();
    let record_before = std::fs::read(e.data.join("images/templates/app:v1.json")).unwrap();
    let t = Instant::now();
    let o = e.build("app:v1", &["--build-arg", "GREETING=hi"]);
    let warm = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    let r = results(&o);
    assert_eq!(r.len(), 6, "{r:?}");
    assert!(r.iter().all(|l| l.ends_with("CACHED")), "{r:?}");
    assert_eq!(e.layers(), layers_before);
    assert_eq!(std::fs::read(e.data.join("images/templates/app:v1.json")).unwrap(), record_before);
    println!(
        "cold build {:.0} ms; cached rebuild {:.0} ms",
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3
    );
    assert!(warm.as_secs_f64() < 1.0, "cached rebuild took {warm:?}");

    // One COPY'd file changes: that step and the ones after it run again, the earlier ones
    // come from the cache.
    e.write("data.txt", "one\ntwo\nthree\n");
    let o = e.build("app:v1", &["--build-arg", "GREETING=hi"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = results(&o);
    let cached: Vec<bool> = r.iter().map(|l| l.ends_with("CACHED")).collect();
    // Layer steps in order: RUN, COPY conf, WORKDIR, COPY data.txt, COPY scripts, RUN.
    assert_eq!(cached, [true, true, true, false, false, false], "{r:?}");
    let out = e.run("app:v1", "cat lines.txt");
    assert_eq!(out.stdout, "3\n", "{out:?}");

    // A build arg is part of the RUN step's key.
    let o = e.build("app:v2", &["--build-arg", "GREETING=hey"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!results(&o)[0].ends_with("CACHED"), "{}", text(&o));
    assert_eq!(e.run("app:v2", "cat /etc/motd").stdout, "hey from RUN\n");
    assert_eq!(e.run("app:v1", "cat /etc/motd").stdout, "hi from RUN\n");

    // ls sees both; rm of one keeps the layers the other uses.
    let ls = String::from_utf8_lossy(&e.cmd(&["template", "ls"]).stdout).into_owned();
    assert!(ls.contains("app:v1") && ls.contains("app:v2"), "{ls}");
    let o = e.cmd(&["template", "rm", "app:v2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(e.run("app:v1", "cat /etc/motd").stdout, "hi from RUN\n");
}

#[test]
fn a_failing_step_shows_its_output_and_exit_code_and_registers_nothing() {
    if !ready("a_failing_step_shows_its_output_and_exit_code_and_registers_nothing") {
        return;
    }
    let e = Env::new();
    e.write("Dockerfile", "FROM bb\nRUN echo made > /made\nRUN echo about to fail; echo oops >&2; exit 3\nRUN echo never\n");
    let o = e.build("broken", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("about to fail") && err.contains("oops"), "{err}");
    assert!(
        err.contains("[3/4]") && err.contains("exit code 3") && err.contains("line 3"),
        "{err}"
    );
    assert!(!err.contains("never"), "{err}");
    assert!(!e.cmd(&["template", "ls"]).stdout.windows(6).any(|w| w == b"broken"));
    let o = e.cmd(&["template", "inspect", "broken"]);
    assert_eq!(o.status.code(), Some(1));
    // The successful step's layer stays as cache; nothing half-written remains.
    let o = e.build("broken", &[]);
    assert!(results(&o).first().is_some_and(|l| l.ends_with("CACHED")), "{}", text(&o));
    let leftovers: Vec<_> = std::fs::read_dir(e.data.join("images/layers"))
        .unwrap()
        .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let scratch = std::fs::read_dir(e.data.join("images/build")).unwrap().count();
    assert_eq!(scratch, 0);

    // A step past its time limit is killed and named.
    e.write("Dockerfile", "FROM bb\nRUN sleep 30\n");
    let t = Instant::now();
    let o = e.build("slow", &["--step-timeout", "1s"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(t.elapsed().as_secs() < 15);
    assert!(String::from_utf8_lossy(&o.stderr).contains("timed out after 1s"), "{}", text(&o));

    // A USER the jail cannot run is refused at its line.
    e.write("Dockerfile", "FROM bb\nUSER 4242\nRUN true\n");
    let o = e.build("nouser", &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2") && err.contains("uid 4242"), "{}", text(&o));
}

#[test]
fn hostile_inputs_are_refused_with_clear_errors() {
    if !ready("hostile_inputs_are_refused_with_clear_errors") {
        return;
    }
    let e = Env::new();
    let outside = e.tmp.path().join("outside");
    std::fs::write(&outside, "host secret\n").unwrap();
    std::os::unix::fs::symlink(&outside, e.ctx.join("link")).unwrap();
    std::fs::create_dir(e.ctx.join("dir")).unwrap();
    std::os::unix::fs::symlink(e.tmp.path(), e.ctx.join("dir/up")).unwrap();
    std::os::unix::fs::symlink("/etc", e.ctx.join("etclink")).unwrap();
    nix_mkfifo(&e.ctx.join("fifo"));
    let cases: &[(&str, &str)] = &[
        ("COPY ../outside /x", "leaves the build context"),
        ("COPY /etc/passwd /x", "absolute path"),
        ("COPY link /x", "symlink"),
        ("COPY dir/up/outside /x", "symlink"),
        ("COPY etclink/passwd /x", "symlink"),
        ("COPY fifo /x", "fifo"),
        ("ADD https://example.com/x /x", "remote"),
        ("COPY missing /x", "not found"),
        ("RUN <<EOF\necho hi\nEOF", "heredoc"),
        ("FROBNICATE", "unknown instruction"),
        ("COPY --chown=nobody x /x", "not in the image's /etc/passwd"),
    ];
    for (line, want) in cases {
        e.write("Dockerfile", &format!("FROM bb\n{line}\n"));
        e.write("x", "x");
        let o = e.build("evil", &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{line}: {}", text(&o));
        assert!(
            err.contains(want) && err.contains("line 2"),
            "{line}: want {want:?}\n{}",
            text(&o)
        );
    }
    // Nothing from outside reached a layer, no template was registered.
    let o = e.cmd(&["template", "ls"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("evil"), "{}", text(&o));
    let found = Command::new("grep")
        .args(["-r", "-l", "host secret"])
        .arg(e.data.join("images"))
        .output()
        .unwrap();
    assert!(found.stdout.is_empty(), "{}", text(&found));
    // A symlink inside a copied directory is copied as a link, never followed.
    e.write("Dockerfile", "FROM bb\nCOPY dir /dir\n");
    let o = e.build("links", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = e.run("links", "ls -l /dir");
    assert!(out.stdout.contains("up -> "), "{out:?}");
    // FROM host is refused with what to do instead.
    e.write("Dockerfile", "FROM host\nRUN true\n");
    let o = e.build("fromhost", &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("FROM scratch"), "{}", text(&o));
}

fn nix_mkfifo(p: &Path) {
    let o = Command::new("mkfifo").arg(p).output().unwrap();
    assert!(o.status.success());
}

#[test]
fn from_a_registry_reference_pulls_the_base() {
    if !ready("from_a_registry_reference_pulls_the_base") {
        return;
    }
    let Some(skopeo) = ["/usr/bin/skopeo"].into_iter().find(|p| Path::new(p).exists()) else {
        println!(
            "SKIPPED from_a_registry_reference_pulls_the_base: skopeo missing (apt-get install skopeo; scripts/setup.sh does)"
        );
        return;
    };
    let reg = match start_registry() {
        Ok(r) => r,
        Err(why) => {
            println!("SKIPPED from_a_registry_reference_pulls_the_base: {why}");
            return;
        }
    };
    let e = Env::new();
    let layout = e.tmp.path().join("layout");
    oci_layout(&layout, &[busybox_layer()], None);
    let o = Command::new(skopeo)
        .args(["copy", "--dest-tls-verify=false", "--insecure-policy"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{}/test/base:v1", reg.addr))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo push: {}", text(&o));
    e.write(
        "Dockerfile",
        &format!("FROM {}/test/base:v1\nRUN echo pulled > /from-registry\n", reg.addr),
    );
    let o = e.build("fromreg", &["--insecure-registry", &reg.addr]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pulling it"), "{}", text(&o));
    assert_eq!(e.run("fromreg", "cat /from-registry").stdout, "pulled\n");
    // Registered under its default name, prefixed where that is a built-in template's.
    let ls = String::from_utf8_lossy(&e.cmd(&["template", "ls"]).stdout).into_owned();
    assert!(ls.contains("from-base:v1"), "{ls}");
    // The base is now a template here (as `docker pull` leaves it): the next build finds it
    // without the registry.
    drop(reg);
    let o = e.build("fromreg", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(results(&o).iter().all(|l| l.ends_with("CACHED")), "{}", text(&o));
}
