//! Small reads from the kernel: its files (procfs, sysfs, cgroupfs) and its random pool.

use std::io;

use crate::{Result, SysError};

/// Reads a small file of the kernel's (procfs, sysfs, cgroupfs) whole, as text: one read into
/// an 8 KiB buffer (more only for a longer file) and the read that finds its end. Not
/// `std::fs::read_to_string`: it first asks the file's size, which such files answer with 0,
/// then reads in doubling steps from 32 bytes (six reads for `/proc/filesystems`, eight for
/// `/proc/self/status`); a sandbox's start reads a dozen of these.
pub fn read_text(path: impl AsRef<std::path::Path>) -> io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Fills `buf` from the kernel's random pool (`getrandom(2)`, blocking only before the pool
/// is first initialised). Not `rand`'s thread-local generator where a process needs a few
/// random bytes once: its first use seeds a ChaCha state and probes the CPU's features
/// (CPUID, which a hypervisor traps: 0.09 ms of a one-shot run on a nested VM), and in a
/// static binary its entropy source falls back to opening `/dev/random` and `/dev/urandom`.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is writable for its length; getrandom writes at most that much.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SysError { call: "getrandom", source: err });
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_text_reads_kernel_files_and_long_ones_whole() {
        for path in ["/proc/filesystems", "/proc/self/status", "/proc/self/stat"] {
            let ours = read_text(path).unwrap();
            let std = std::fs::read_to_string(path).unwrap();
            // /proc/self/* describe the reader: the same lines, not necessarily the same values.
            assert_eq!(ours.lines().count(), std.lines().count(), "{path}");
            assert!(!ours.is_empty(), "{path}");
        }
        assert_eq!(
            read_text("/proc/filesystems").unwrap(),
            std::fs::read_to_string("/proc/filesystems").unwrap()
        );
        let dir = std::env::temp_dir().join(format!("ringfence-read-text-{}", std::process::id()));
        let long: String = (0..3000).map(|i| format!("{i}\n")).collect();
        std::fs::write(&dir, &long).unwrap();
        assert!(long.len() > 8192);
        assert_eq!(read_text(&dir).unwrap(), long);
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(read_text("/nonexistent/x").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn random_bytes_fill_the_buffer() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        assert_ne!(a, b);
        assert!(a.iter().any(|x| *x != 0));
    }
}
