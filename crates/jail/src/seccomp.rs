//! The seccomp-bpf profile: compiled from `profiles/seccomp/default.json` (by [`crate::bpf`]) once
//! per process, and installed by the agent as the last step of sandbox setup: shipped to it as
//! BPF by the server, or its own copy ([`builtin`], compiled by its spawner before the fork) for
//! one-shot runs.

use ringfence_proto::BpfInsn;

use crate::bpf::{self, BpfError};

/// The default profile, as data (see `profiles/seccomp/README.md`).
pub const DEFAULT_PROFILE: &str = include_str!("../../../profiles/seccomp/default.json");

const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
const BPF_RET_K: u16 = 0x06;
const EPERM: u32 = 1;

/// Errors compiling a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile does not compile: {0}")]
    Compile(#[from] BpfError),
}

/// Both filters of a profile, ready to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// The allowlist; denials go to user space (or return EPERM when `notify` was false).
    pub sandbox: Vec<BpfInsn>,
    /// `clone3` and `io_setup` → ENOSYS (see `profiles/seccomp/README.md`).
    pub clone3: Vec<BpfInsn>,
}

/// Compiles a profile in seccompiler's JSON format. With `notify`, every `EPERM` return of the
/// `sandbox` filter becomes `SECCOMP_RET_USER_NOTIF`, so the host sees each denial and answers
/// EPERM itself.
pub fn compile(profile: &str, notify: bool) -> Result<Compiled, SeccompError> {
    let mut sandbox = bpf::compile(profile, "sandbox", syscall_nr)?;
    let clone3 = bpf::compile(profile, "clone3", syscall_nr)?;
    if notify {
        for insn in &mut sandbox {
            if insn.code == BPF_RET_K && insn.k == (SECCOMP_RET_ERRNO | EPERM) {
                insn.k = SECCOMP_RET_USER_NOTIF;
            }
        }
    }
    Ok(Compiled { sandbox, clone3 })
}

/// The x86_64 number of a syscall name.
pub fn syscall_nr(name: &str) -> Option<i32> {
    crate::syscall_names::X86_64.iter().find(|(_, n)| *n == name).map(|(nr, _)| *nr)
}

/// Compiles the built-in default profile.
pub fn default_profile(notify: bool) -> Result<Compiled, SeccompError> {
    compile(DEFAULT_PROFILE, notify)
}

/// The built-in default profile with denials notified, compiled once per process. A spawner
/// compiles it before its first fork, so every agent it forks has it already.
pub fn builtin() -> Result<&'static Compiled, SeccompError> {
    static BUILTIN: std::sync::OnceLock<Compiled> = std::sync::OnceLock::new();
    if let Some(c) = BUILTIN.get() {
        return Ok(c);
    }
    let compiled = default_profile(true)?;
    Ok(BUILTIN.get_or_init(|| compiled))
}

/// The name of an x86_64 syscall number, for security events.
pub fn syscall_name(nr: i32) -> String {
    crate::syscall_names::X86_64
        .iter()
        .find(|(n, _)| *n == nr)
        .map_or_else(|| format!("syscall_{nr}"), |(_, name)| (*name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed_names() -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(DEFAULT_PROFILE).unwrap();
        v["sandbox"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn default_profile_compiles_with_and_without_notification() {
        let plain = default_profile(false).unwrap();
        let notified = default_profile(true).unwrap();
        assert_eq!(plain.sandbox.len(), notified.sandbox.len());
        let rets =
            |p: &[BpfInsn], k: u32| p.iter().filter(|i| i.code == BPF_RET_K && i.k == k).count();
        assert!(rets(&plain.sandbox, SECCOMP_RET_ERRNO | EPERM) > 0);
        assert_eq!(rets(&notified.sandbox, SECCOMP_RET_ERRNO | EPERM), 0);
        assert!(rets(&notified.sandbox, SECCOMP_RET_USER_NOTIF) > 0);
        assert!(rets(&plain.clone3, SECCOMP_RET_ERRNO | 38) == 1);
    }

    #[test]
    fn dangerous_calls_are_not_allowlisted() {
        let allowed = allowed_names();
        for name in [
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "keyctl",
            "add_key",
            "request_key",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "open_by_handle_at",
            "name_to_handle_at",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kcmp",
            "pidfd_getfd",
            "fsopen",
            "fsmount",
            "fsconfig",
            "fspick",
            "open_tree",
            "move_mount",
            "mount_setattr",
            "clone3",
            "syslog",
            "reboot",
            "swapon",
            "swapoff",
            "settimeofday",
            "clock_settime",
            "adjtimex",
            "iopl",
            "ioperm",
            "modify_ldt",
            "quotactl",
            "fanotify_init",
            "move_pages",
            "migrate_pages",
            "acct",
            "lookup_dcookie",
            "uselib",
            "vhangup",
            "sethostname",
            "setdomainname",
        ] {
            assert!(!allowed.iter().any(|a| a == name), "{name} must not be allowlisted");
        }
    }

    #[test]
    fn io_setup_is_answered_enosys_not_allowed() {
        // aio-max-nr is a single host-wide pool; a sandbox must not be able to drain it.
        assert!(!allowed_names().iter().any(|a| a == "io_setup"));
        let v: serde_json::Value = serde_json::from_str(DEFAULT_PROFILE).unwrap();
        let enosys: Vec<&str> = v["clone3"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["syscall"].as_str().unwrap())
            .collect();
        assert_eq!(enosys, ["clone3", "io_setup"]);
        assert_eq!(v["clone3"]["filter_action"]["errno"], 38);
    }

    #[test]
    fn conditional_rules_are_present() {
        let v: serde_json::Value = serde_json::from_str(DEFAULT_PROFILE).unwrap();
        let rule = |name: &str| {
            v["sandbox"]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["syscall"] == name)
                .cloned()
        };
        assert!(rule("clone").unwrap()["args"].is_array());
        assert!(rule("ioctl").unwrap()["args"].is_array());
        assert!(rule("personality").unwrap()["args"].is_array());
    }

    #[test]
    fn no_syscall_is_listed_twice() {
        let mut names = allowed_names();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a duplicate entry would silently drop its conditions");
    }

    #[test]
    fn names_syscalls() {
        assert_eq!(syscall_name(165), "mount");
        assert_eq!(syscall_name(101), "ptrace");
        assert_eq!(syscall_name(9999), "syscall_9999");
    }
}
