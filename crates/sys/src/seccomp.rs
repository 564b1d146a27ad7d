//! Seccomp: installing a filter and answering its user notifications.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{Result, SysError, check};

/// One classic-BPF instruction, laid out as the kernel's `struct sock_filter`.
pub type SockFilter = libc::sock_filter;

/// Installs a seccomp filter on the calling thread. With `listener`, the kernel returns a user
/// notification descriptor for the filter's `SECCOMP_RET_USER_NOTIF` results.
pub fn install_seccomp(prog: &[SockFilter], listener: bool) -> Result<Option<OwnedFd>> {
    let len = u16::try_from(prog.len()).map_err(|_| SysError {
        call: "seccomp",
        source: io::Error::other("filter longer than 65535 instructions"),
    })?;
    let fprog = libc::sock_fprog { len, filter: prog.as_ptr().cast_mut() };
    let flags = if listener { libc::SECCOMP_FILTER_FLAG_NEW_LISTENER } else { 0 };
    // SAFETY: fprog points at `len` valid instructions that outlive the call; the kernel copies
    // the program before returning.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    let ret = check("seccomp(SECCOMP_SET_MODE_FILTER)", ret)?;
    if listener {
        let fd = RawFd::try_from(ret).map_err(|_| SysError {
            call: "seccomp",
            source: io::Error::other("listener fd out of range"),
        })?;
        // SAFETY: with NEW_LISTENER the kernel returns a fresh descriptor owned by us.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    } else {
        Ok(None)
    }
}

/// One syscall that a filter sent to user space.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    pub id: u64,
    /// Host pid of the calling thread.
    pub pid: u32,
    pub nr: i32,
    pub args: [u64; 6],
}

/// Outcome of waiting on a notification descriptor.
#[derive(Debug)]
pub enum NotifWait {
    Notification(Notification),
    /// Nothing arrived within the timeout.
    Timeout,
    /// Every process using the filter is gone.
    Closed,
}

/// Waits up to `timeout_ms` for the next notification on a seccomp listener.
pub fn seccomp_notif_recv(fd: &OwnedFd, timeout_ms: i32) -> Result<NotifWait> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: pfd is one valid pollfd.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            return Ok(NotifWait::Timeout);
        }
        return Err(SysError { call: "poll", source: err });
    }
    if ret == 0 {
        return Ok(NotifWait::Timeout);
    }
    if pfd.revents & libc::POLLIN == 0 {
        return Ok(NotifWait::Closed);
    }
    // SAFETY: seccomp_notif is plain old data and must be zeroed before the ioctl.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: notif is a valid, writable seccomp_notif of the size the ioctl encodes.
    let ret =
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV as _, &mut notif) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            // The caller died or was interrupted between poll and recv.
            Some(libc::ENOENT) | Some(libc::EINTR) => Ok(NotifWait::Timeout),
            _ => Err(SysError { call: "ioctl(SECCOMP_IOCTL_NOTIF_RECV)", source: err }),
        };
    }
    Ok(NotifWait::Notification(Notification {
        id: notif.id,
        pid: notif.pid,
        nr: notif.data.nr,
        args: notif.data.args,
    }))
}

/// Answers a notification: the syscall fails with `errno` in the caller.
pub fn seccomp_notif_deny(fd: &OwnedFd, id: u64, errno: i32) -> Result<()> {
    let resp = libc::seccomp_notif_resp { id, val: 0, error: -errno, flags: 0 };
    // SAFETY: resp is a valid seccomp_notif_resp that outlives the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND as _, &resp) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        // ENOENT: the caller is already gone (killed while blocked); nothing to answer.
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(());
        }
        return Err(SysError { call: "ioctl(SECCOMP_IOCTL_NOTIF_SEND)", source: err });
    }
    Ok(())
}
