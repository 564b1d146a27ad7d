//! Link settings of the `ringfence` and `ringfence-agent` executables.

fn main() {
    // Relative relocations packed as a bitmap (DT_RELR) instead of one 24-byte entry each: the
    // static-pie `ringfence-full` has about 55,000 of them (1.3 MB in a release build, 5.5 MB
    // in a debug build), all read and applied before `main` on every start (the `ringfence`
    // front, which a one-shot `ringfence run` starts, has far fewer: src/lib.rs). Needs
    // binutils 2.38 and glibc 2.36 (Debian 12 has 2.40 and 2.36); applies to this package's
    // binaries only, so no other crate is rebuilt for it.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
