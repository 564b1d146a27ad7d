//! Where volumes live on the host, as the core needs it to start a sandbox with volumes
//! attached. The `/volumes` and `/volumecontent` APIs are the server's
//! (`ringfence_server::volumes`).

use std::path::{Path, PathBuf};

/// The host directories of `mounts`, with where each shows inside the sandbox.
pub fn host_mounts(
    data_dir: &Path,
    mounts: &[crate::store::VolumeMount],
) -> Vec<(PathBuf, String)> {
    mounts.iter().map(|m| (data_dir.join("volumes").join(&m.id), m.path.clone())).collect()
}
