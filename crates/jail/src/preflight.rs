//! Checks that the host can run the jail tier, each failure naming the missing feature and
//! what to do about it. Cheap enough (a few small reads) to run on every `ringfence run`.

use std::path::Path;

/// A host requirement the jail tier cannot do without.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Missing {
    #[error(
        "ringfence must run as root (it creates user namespaces with a dedicated uid range, \
         cgroups and mounts); run it with sudo or as root"
    )]
    Root,
    #[error(
        "user namespaces are disabled on this kernel (/proc/sys/user/max_user_namespaces is 0); \
         enable them with: sysctl -w user.max_user_namespaces=15000"
    )]
    UserNamespaces,
    #[error(
        "the kernel lacks overlayfs, needed for each sandbox's writable root; load it with: \
         modprobe overlay"
    )]
    Overlay,
    #[error(
        "the kernel lacks seccomp user notification (needs Linux 5.5+ with CONFIG_SECCOMP_FILTER); \
         upgrade the kernel"
    )]
    SeccompNotify,
    #[error(
        "the sandbox agent was not found at {0}; build it (cargo build --release) or set RINGFENCE_AGENT"
    )]
    Agent(String),
}

/// Runs every check; returns the first failure.
pub fn check(agent: &Path, notify: bool) -> Result<(), Missing> {
    if ringfence_sys::euid() != 0 {
        return Err(Missing::Root);
    }
    if let Ok(n) = ringfence_sys::read_text("/proc/sys/user/max_user_namespaces")
        && n.trim() == "0"
    {
        return Err(Missing::UserNamespaces);
    }
    let filesystems = ringfence_sys::read_text("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.split_whitespace().last() == Some("overlay")) {
        return Err(Missing::Overlay);
    }
    if notify {
        let actions =
            ringfence_sys::read_text("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
        if !actions.split_whitespace().any(|a| a == "user_notif") {
            return Err(Missing::SeccompNotify);
        }
    }
    if !agent.is_file() {
        return Err(Missing::Agent(agent.display().to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_agent_is_named() {
        if ringfence_sys::euid() != 0 {
            eprintln!("skipped: needs root to reach the agent check");
            return;
        }
        let e = check(Path::new("/nonexistent/ringfence-agent"), true).unwrap_err();
        assert_eq!(e, Missing::Agent("/nonexistent/ringfence-agent".into()));
        assert!(e.to_string().contains("RINGFENCE_AGENT"));
    }
}
