//! Errors of importing, pulling, storing and unpacking images. Each names what it is about:
//! the file, the layer (by digest) and, for a refused tar entry, the entry's path.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// One tar entry of a layer was refused; the whole layer (and the import) fails.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Entry { layer: String, entry: String, reason: String },
    /// A layer as a whole was refused (a limit, a bad stream, an unsupported compression).
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    /// Content whose sha256 is not the one its manifest or config promised.
    #[error("{what} {name}: digest mismatch: expected {expected}, got {actual}")]
    Digest { what: &'static str, name: String, expected: String, actual: String },
    /// A malformed or unsupported archive, manifest, index or config.
    #[error("{0}")]
    Format(String),
    #[error("no image template {0:?} (see `ringfence template ls`)")]
    NotFound(String),
    #[error("invalid template name {name:?}: {reason}")]
    Name { name: String, reason: String },
    /// A Dockerfile refused while parsing (line 0: the file as a whole).
    #[error("Dockerfile{}: {message}", if *line > 0 { format!(" line {line}") } else { String::new() })]
    Dockerfile { line: usize, message: String },
    /// A build step that failed or was refused; `step` is `[n/m] INSTRUCTION` (line N), and
    /// `line` that line of the Dockerfile.
    #[error("{step}: {reason}")]
    Build { step: String, line: usize, reason: String },
    /// `template rm` of a template a sandbox runs from or a build uses as its base.
    #[error(
        "template {0:?} is in use (a sandbox runs from it, or a build uses it as its base); \
         try again when they have ended"
    )]
    InUse(String),
    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },
}

pub(crate) fn at(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { op, path, source }
}
