//! The host side of the agent's channel, kept across QEMU processes: the server holds one end
//! of a socket pair for the sandbox's life, and two threads copy between its other end and
//! whichever QEMU is connected now. Pausing a guest to a file ends its QEMU; the restored one
//! connects anew ([`Relay::attach`]) and the server's end never notices. The guest does not
//! notice either: it was stopped before its QEMU went and runs again only once the new one is
//! connected, so its port never saw the host leave.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

#[derive(Debug, Default)]
struct State {
    /// The connected QEMU's end (writes go here), `None` while detached.
    qemu: Option<UnixStream>,
    /// Bumped at each attach, so the reading thread knows its connection was replaced.
    generation: u64,
    /// Between [`Relay::detach`] and the next attach: end-of-file from QEMU is expected.
    detached: bool,
    closed: bool,
}

/// The relay of one sandbox.
#[derive(Debug)]
pub(crate) struct Relay {
    shared: Arc<(Mutex<State>, Condvar)>,
    ours: UnixStream,
}

impl Relay {
    /// Starts relaying between `qemu` and a new socket pair; returns the relay and the
    /// server's end.
    pub(crate) fn start(qemu: UnixStream) -> std::io::Result<(Relay, UnixStream)> {
        let (server, ours) = UnixStream::pair()?;
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let relay = Relay { shared, ours: ours.try_clone()? };
        relay.attach(qemu)?;
        // Server -> guest: whatever is written waits while detached (the guest cannot take it
        // then), and goes to the QEMU connected at the time it is written.
        let shared = relay.shared.clone();
        let mut from_server = ours.try_clone()?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from_server.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let (lock, cond) = &*shared;
                let Ok(mut st) = lock.lock() else { break };
                while st.detached && !st.closed {
                    let Ok(g) = cond.wait(st) else { return };
                    st = g;
                }
                if st.closed {
                    break;
                }
                let Some(q) = st.qemu.as_mut() else { break };
                if q.write_all(&buf[..n]).is_err() && !st.detached {
                    break;
                }
            }
        });
        Ok((relay, server))
    }

    /// Connects a (new) QEMU: the guest's bytes from it go to the server's end.
    pub(crate) fn attach(&self, qemu: UnixStream) -> std::io::Result<()> {
        let mut from_qemu = qemu.try_clone()?;
        let mut to_server = self.ours.try_clone()?;
        let generation = {
            let (lock, cond) = &*self.shared;
            let mut st = lock.lock().map_err(|_| std::io::Error::other("relay lock poisoned"))?;
            st.qemu = Some(qemu);
            st.generation += 1;
            st.detached = false;
            cond.notify_all();
            st.generation
        };
        let shared = self.shared.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from_qemu.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_server.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            // This QEMU is gone. Paused to a file (detached, or already replaced): the next
            // one carries on. Otherwise the guest ended: the server's end sees end-of-file.
            let (lock, _) = &*shared;
            let expected = lock.lock().is_ok_and(|st| st.detached || st.generation != generation);
            if !expected {
                let _ = to_server.shutdown(std::net::Shutdown::Both);
            }
        });
        Ok(())
    }

    /// Holds the server's writes back and expects the QEMU to go: call before ending it.
    pub(crate) fn detach(&self) {
        let (lock, _) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.detached = true;
        }
    }

    /// Undoes [`Relay::detach`] when the QEMU did not go after all.
    pub(crate) fn undo_detach(&self) {
        let (lock, cond) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.detached = false;
            cond.notify_all();
        }
    }

    /// Ends the relay: both threads stop, the server's end sees end-of-file.
    pub(crate) fn close(&self) {
        let (lock, cond) = &*self.shared;
        if let Ok(mut st) = lock.lock() {
            st.closed = true;
            if let Some(q) = st.qemu.take() {
                let _ = q.shutdown(std::net::Shutdown::Both);
            }
            cond.notify_all();
        }
        let _ = self.ours.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes cross both ways; after a detach the server's writes wait, and reach the next
    /// QEMU, and the first QEMU's end-of-file does not end the server's channel.
    #[test]
    fn the_servers_end_outlives_a_qemu() {
        let (q1_host, mut q1_guest) = UnixStream::pair().unwrap();
        let (relay, mut server) = Relay::start(q1_host).unwrap();
        server.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        q1_guest.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        q1_guest.write_all(b"pong").unwrap();
        server.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"pong");
        relay.detach();
        drop(q1_guest);
        server.write_all(b"held").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (q2_host, mut q2_guest) = UnixStream::pair().unwrap();
        relay.attach(q2_host).unwrap();
        q2_guest.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"held");
        q2_guest.write_all(b"back").unwrap();
        server.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"back");
        // The guest ending (not detached) ends the server's channel.
        drop(q2_guest);
        let mut rest = Vec::new();
        server.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(server.read_to_end(&mut rest).unwrap(), 0);
        relay.close();
    }
}
