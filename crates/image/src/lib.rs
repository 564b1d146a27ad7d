//! OCI images for Ringfence: import (`docker save` archives and OCI image layouts, as files
//! or directories), pull from registries (Docker Registry HTTP API v2), and unpack each layer,
//! as hostile input, into an overlayfs lower directory the jail mounts under a sandbox.
//!
//! - [`unpack`]: one layer's tar stream → a lower directory (whiteouts, opaque directories,
//!   canonical owners), refusing anything that would reach outside it.
//! - [`export`]: the one interface through which a tier asks for a template in its form
//!   (lower directories, a disk image), cached by content.
//! - [`shared`]: sandboxes' saved layers (snapshots, pauses, forks) in the same store, by
//!   content.
//! - [`archive`]: reading images on disk; [`registry`]: pulling them.
//! - [`store`]: content-addressed layers and the template records under
//!   `<data-dir>/images`.

pub mod archive;
pub mod build;
pub mod context;
pub mod dockerfile;
pub mod error;
pub mod export;
pub mod oci;
mod passwd;
pub mod registry;
pub mod sdk;
pub mod shared;
pub mod store;
pub mod transfer;
pub mod unpack;

pub use error::ImageError;
pub use export::{Artifact, DiskFs, Exported, TemplateForm};
pub use store::{
    LayerRecord, Progress, Quiet, Record, Removed, Runnable, StartCmd, Store, normalize_name,
};
pub use unpack::{LayerStats, Limits};

use std::path::Path;

/// Imports the image file or directory at `path` as template `name` (or the name the archive
/// carries, if `name` is `None`).
pub fn import(
    store: &Store,
    path: &Path,
    name: Option<&str>,
    limits: &Limits,
    progress: &mut dyn Progress,
) -> Result<Record, ImageError> {
    let mut blobs = archive::open(path)?;
    let plan = archive::plan(blobs.as_mut())?;
    let name = match (name, &plan.suggested_name) {
        (Some(n), _) => n.to_string(),
        (None, Some(s)) => suggested(s),
        (None, None) => {
            return Err(ImageError::Format(
                "the archive names no image: pass --name NAME[:TAG]".into(),
            ));
        }
    };
    store.install(
        &plan,
        blobs.as_mut(),
        &name,
        format!("import {}", path.display()),
        limits,
        progress,
    )
}

/// A template name from an image reference (`docker.io/library/busybox:1.36` → `busybox:1.36`).
pub fn suggested(reference: &str) -> String {
    let (path, tag) = match reference.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (reference, None),
    };
    let base = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    match tag {
        Some(t) => format!("{base}:{t}"),
        None => base,
    }
}
