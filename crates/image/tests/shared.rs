//! Saved sandbox layers in the content-addressed layer store: two with the same content are
//! stored once, each id a link to it; the content stays while any link (or a template) uses
//! it and goes with the last; a crash between the move and the link is completed on the next
//! start; a reopened store keeps all of it. Needs root (owners and xattrs as saved layers
//! have them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ringfence_image::Store;
use ringfence_image::shared::tree_digest;

fn root(test: &str) -> bool {
    if fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    println!("SKIPPED {test}: needs root");
    false
}

/// A saved layer as a sandbox's upper directory looks: a file, an opaque directory, fixed times.
fn saved(dir: &Path, content: &str) {
    fs::create_dir_all(dir.join("home/user")).unwrap();
    fs::write(dir.join("home/user/notes.txt"), content).unwrap();
    fs::create_dir_all(dir.join("opq")).unwrap();
    rustix::fs::setxattr(
        dir.join("opq").as_path(),
        "user.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for p in ["home/user/notes.txt", "home/user", "home", "opq", ""] {
        let f = fs::File::open(dir.join(p)).unwrap();
        f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t)).unwrap();
    }
}

#[test]
fn saved_layers_are_stored_once_by_content_and_go_with_their_last_link() {
    let test = "saved_layers_are_stored_once_by_content_and_go_with_their_last_link";
    if !root(test) {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path()).unwrap();
    let layers = data.path().join("layers");
    fs::create_dir_all(&layers).unwrap();
    for id in ["la", "lb", "lc"] {
        saved(&layers.join(id), if id == "lc" { "other" } else { "same" });
    }
    assert_eq!(tree_digest(&layers.join("la")).unwrap(), tree_digest(&layers.join("lb")).unwrap());
    assert_ne!(tree_digest(&layers.join("la")).unwrap(), tree_digest(&layers.join("lc")).unwrap());
    // The opaque marker is part of the content.
    let before = tree_digest(&layers.join("lc")).unwrap();
    rustix::fs::removexattr(layers.join("lc/opq").as_path(), "user.overlay.opaque").unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    fs::File::open(layers.join("lc/opq"))
        .unwrap()
        .set_times(fs::FileTimes::new().set_modified(t))
        .unwrap();
    assert_ne!(before, tree_digest(&layers.join("lc")).unwrap());

    let da = store.adopt_saved_layer(&layers.join("la")).unwrap();
    let db = store.adopt_saved_layer(&layers.join("lb")).unwrap();
    let dc = store.adopt_saved_layer(&layers.join("lc")).unwrap();
    assert_eq!(da, db);
    assert_ne!(da, dc);
    // Each id is a link to the one stored copy, which reads as the layer did.
    for id in ["la", "lb", "lc"] {
        assert!(fs::symlink_metadata(layers.join(id)).unwrap().file_type().is_symlink(), "{id}");
    }
    assert_eq!(
        fs::canonicalize(layers.join("la")).unwrap(),
        fs::canonicalize(layers.join("lb")).unwrap()
    );
    assert_eq!(fs::read_to_string(layers.join("la/home/user/notes.txt")).unwrap(), "same");
    let stored = || store.all_layers().len();
    assert_eq!(stored(), 2, "two contents, three ids");

    // Reopened (a restart): the same.
    let store = Store::open(data.path()).unwrap();
    assert_eq!(store.collect_unlinked().unwrap(), 0);
    assert_eq!(stored(), 2);

    // One of two links gone: the content stays for the other.
    fs::remove_file(layers.join("la")).unwrap();
    assert_eq!(store.collect_unlinked().unwrap(), 0);
    assert_eq!(fs::read_to_string(layers.join("lb/home/user/notes.txt")).unwrap(), "same");
    // The last one gone: so is the content.
    fs::remove_file(layers.join("lb")).unwrap();
    assert_eq!(store.collect_unlinked().unwrap(), 1);
    assert_eq!(stored(), 1);
    assert!(!store.layer_dir(&da).exists());

    // A crash after the move, before the link took the id's place: the next start finishes it.
    saved(&layers.join("ld"), "same");
    let d = store.adopt_saved_layer(&layers.join("ld")).unwrap();
    fs::rename(layers.join("ld"), layers.join(".ld.cas")).unwrap();
    fs::create_dir(layers.join("ld")).unwrap(); // what a half-done removal could leave
    assert_eq!(store.finish_adoptions(), 1);
    assert_eq!(fs::canonicalize(layers.join("ld")).unwrap(), store.layer_dir(&d));
    assert_eq!(fs::read_to_string(layers.join("ld/home/user/notes.txt")).unwrap(), "same");
    // One whose move never happened is dropped, and the directory stays.
    saved(&layers.join("le"), "again");
    std::os::unix::fs::symlink(store.root().join("layers/sha256-00"), layers.join(".le.cas"))
        .unwrap();
    assert_eq!(store.finish_adoptions(), 0);
    assert!(!layers.join(".le.cas").exists() && layers.join("le").is_dir());
}

/// The processes holding a template's claim are found by the claim file's inode in the
/// kernel's lock table: this process while it holds one, none once it is dropped, and none
/// for another template.
#[test]
fn a_templates_claim_holders_are_the_processes_that_hold_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let me = std::process::id() as i32;
    let claim = store.in_use("held:v1").unwrap();
    let _other = store.in_use("other:v1").unwrap();
    let holders = store.claim_holders("held:v1");
    assert_eq!(holders.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [me], "{holders:?}");
    assert!(!holders[0].1.is_empty(), "the holder's command name: {holders:?}");
    drop(claim);
    assert!(store.claim_holders("held:v1").is_empty());
    assert!(store.claim_holders("never-claimed:v1").is_empty());
}
