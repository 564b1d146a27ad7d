//! Loading a module Wasmtime compiled ahead of time (`.cwasm`): native code, so Wasmtime marks
//! it `unsafe` (it cannot check that the bytes are code it produced).

use std::path::Path;

/// Maps the precompiled module at `path` (copy-on-write: every instance of every sandbox shares
/// its pages, the linear memory's initial image included).
///
/// The caller must pass only a file Wasmtime itself wrote with `Engine::precompile_module`,
/// in a directory no sandbox can write, and not modify it while it is mapped.
pub fn deserialize_module(
    engine: &wasmtime::Engine,
    path: &Path,
) -> wasmtime::Result<wasmtime::Module> {
    // SAFETY: the caller's contract above: the file is one our own engine's `precompile_module`
    // wrote into a directory only the server writes (the tier's cache, mode 0700), and it is
    // never modified in place (replaced by rename only), so the mapping stays what Wasmtime
    // produced. Wasmtime still checks its header (version, target, settings) before use.
    unsafe { wasmtime::Module::deserialize_file(engine, path) }
}
