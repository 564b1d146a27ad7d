//! The export interface: a template asked for in each tier's form, disk images built once per
//! content (also when asked for concurrently), shared by templates with the same layers,
//! removed with the last of them, and `rm` refused while an export is held. Needs root
//! (whiteout device nodes, the overlay mount the disk image is copied from) and mkfs.ext4 and
//! debugfs (e2fsprogs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use common::{Tar, docker_archive};
use ringfence_image::{Artifact, DiskFs, ImageError, Limits, Quiet, Store, TemplateForm, import};

fn ready(test: &str) -> bool {
    if !fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        println!("SKIPPED {test}: needs root (whiteouts, the overlay the image is copied from)");
        return false;
    }
    for tool in ["mkfs.ext4", "debugfs"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool} || test -x /sbin/{tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            println!("SKIPPED {test}: no {tool} (package e2fsprogs)");
            return false;
        }
    }
    true
}

/// `debugfs -R "ls -p DIR"` of `image`: the names in DIR.
fn ls(image: &Path, dir: &str) -> Vec<String> {
    let out = Command::new("debugfs").args(["-R", &format!("ls -p {dir}")]).arg(image).output();
    let out = out.unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

fn cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs").args(["-R", &format!("cat {file}")]).arg(image).output();
    String::from_utf8_lossy(&out.unwrap().stdout).into_owned()
}

fn exports(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(store.root().join("exports"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ext4"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn templates_export_as_trees_and_as_disk_images_built_once_shared_and_removed_with_them() {
    let test =
        "templates_export_as_trees_and_as_disk_images_built_once_shared_and_removed_with_them";
    if !ready(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let base = Tar::default()
        .dir("./")
        .dir("etc")
        .file("etc/greeting", b"from the image\n", 0o644)
        .file("etc/gone", b"deleted above", 0o644)
        .dir("opq")
        .file("opq/a", b"a", 0o644)
        .finish();
    let upper = Tar::default()
        .file("etc/.wh.gone", b"", 0o644)
        .file("opq/.wh..wh..opq", b"", 0o644)
        .file("opq/b", b"b", 0o644)
        .finish();
    let archive = tmp.path().join("img.tar");
    docker_archive(&archive, &[base, upper], &["PATH=/bin"], "/");
    import(&store, &archive, Some("one"), &Limits::default(), &mut Quiet).unwrap();
    import(&store, &archive, Some("two"), &Limits::default(), &mut Quiet).unwrap();

    // The jail's and gVisor's form: the skeleton and the layers, topmost first.
    let tree = store.export("one", TemplateForm::Tree).unwrap();
    let Artifact::Tree { skeleton, layers } = &tree.artifact else { panic!("not a tree") };
    assert_eq!(layers.len(), 2);
    assert!(skeleton.join("proc").is_dir() && layers[1].join("etc/greeting").is_file());
    assert_eq!(tree.env().get("PATH").map(String::as_str), Some("/bin"));
    drop(tree);

    // The microVM's: asked for by two at once, built once.
    let form = TemplateForm::DiskImage { fs: DiskFs::Ext4 };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| store.export("one", form).unwrap());
        let b = s.spawn(|| store.export("one", form).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let (Artifact::DiskImage(pa), Artifact::DiskImage(pb)) = (&a.artifact, &b.artifact) else {
        panic!("not disk images")
    };
    assert_eq!(pa, pb);
    assert_eq!(exports(&store).len(), 1, "one image: {:?}", exports(&store));
    let ino = fs::metadata(pa).unwrap().ino();
    // The merged tree: the skeleton's mount points, the lower layer's file, the whiteout and
    // the opaque directory applied.
    let root = ls(pa, "/");
    for d in ["proc", "dev", "sys", "tmp", "etc", "home", "opq"] {
        assert!(root.contains(&d.to_string()), "{d} missing from {root:?}");
    }
    assert_eq!(cat(pa, "/etc/greeting"), "from the image\n");
    let etc = ls(pa, "/etc");
    assert!(!etc.contains(&"gone".to_string()), "the whiteout hides etc/gone: {etc:?}");
    assert_eq!(ls(pa, "/opq"), vec!["b".to_string()], "the opaque directory hides opq/a");

    // Held: removing the template is refused, and its image stays.
    let err = store.remove("one").unwrap_err();
    assert!(matches!(err, ImageError::InUse(_)), "{err}");
    drop((a, b));

    // Another template of the same layers gets the same image, not a second build.
    let two = store.export("two", form).unwrap();
    let Artifact::DiskImage(p2) = &two.artifact else { panic!("not a disk image") };
    assert_eq!(fs::metadata(p2).unwrap().ino(), ino);
    drop(two);

    // Removing one keeps it (the other has those layers); removing the other removes it.
    store.remove("one").unwrap();
    assert_eq!(exports(&store).len(), 1);
    store.remove("two").unwrap();
    assert!(exports(&store).is_empty(), "{:?}", exports(&store));
    let left: Vec<String> = fs::read_dir(store.root().join("exports"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|n| !n.ends_with(".partial") && !n.ends_with(".mnt")), "{left:?}");
    // Nothing stays mounted.
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&tmp.path().to_string_lossy().into_owned()), "{mounts}");
}
