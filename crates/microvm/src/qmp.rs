//! A QMP client: QEMU's machine protocol, one JSON object per line over a unix socket. After
//! the greeting and `qmp_capabilities`, each command gets one reply (`return` or `error`);
//! asynchronous `event` lines may come between and are skipped (nothing here waits on one).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::MicrovmError;

/// One QMP connection.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

#[derive(Serialize)]
struct Command<'a> {
    execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<Value>,
}

#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
    event: Option<String>,
    #[serde(rename = "QMP")]
    greeting: Option<Value>,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

fn io(op: &str) -> impl Fn(std::io::Error) -> MicrovmError + '_ {
    move |source| MicrovmError::Io { op: op.to_string(), source }
}

impl Qmp {
    /// Connects to the socket QEMU listens on (it may not exist yet: QEMU is starting),
    /// reads the greeting and leaves capabilities negotiation.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, MicrovmError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if started.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io("connect to QMP")(e)),
            }
        };
        stream.set_read_timeout(Some(timeout)).map_err(io("QMP timeout"))?;
        let writer = stream.try_clone().map_err(io("QMP socket"))?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.read_reply()?;
        if greeting.greeting.is_none() {
            return Err(MicrovmError::Qmp("no QMP greeting".into()));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_reply(&mut self) -> Result<Reply, MicrovmError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(io("read QMP"))?;
        if n == 0 {
            return Err(MicrovmError::Qmp("QEMU closed its QMP socket".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| MicrovmError::Qmp(format!("unreadable QMP reply {line:?}: {e}")))
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, MicrovmError> {
        let mut msg = serde_json::to_vec(&Command { execute: command, arguments })
            .map_err(|e| MicrovmError::Qmp(e.to_string()))?;
        msg.push(b'\n');
        self.writer.write_all(&msg).map_err(io("write QMP"))?;
        self.await_reply(command)
    }

    fn await_reply(&mut self, command: &str) -> Result<Value, MicrovmError> {
        loop {
            let reply = self.read_reply()?;
            if let Some(e) = reply.error {
                return Err(MicrovmError::Qmp(format!("{command}: {} ({})", e.desc, e.class)));
            }
            if let Some(v) = reply.ret {
                return Ok(v);
            }
            if reply.event.is_some() {
                continue;
            }
        }
    }

    /// Hands QEMU a descriptor under `name` (QMP `getfd`: the descriptor travels with the
    /// command as `SCM_RIGHTS`), for a later `fd:<name>` URI.
    pub fn send_fd(&mut self, name: &str, fd: &impl AsRawFd) -> Result<(), MicrovmError> {
        let cmd =
            Command { execute: "getfd", arguments: Some(serde_json::json!({ "fdname": name })) };
        let mut msg = serde_json::to_vec(&cmd).map_err(|e| MicrovmError::Qmp(e.to_string()))?;
        msg.push(b'\n');
        ringfence_sys::send_with_fd(self.writer.as_raw_fd(), &msg, Some(fd.as_raw_fd()))
            .map_err(|e| MicrovmError::Qmp(format!("getfd: {e}")))?;
        self.await_reply("getfd").map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU: greets, answers capabilities, sends an event before the next reply, then
    /// an error. The client must skip the event and turn the error into one naming the command.
    #[test]
    fn replies_events_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            s.write_all(b"{\"return\": {}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"stop\""), "{line}");
            s.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            s.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n")
                .unwrap();
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.execute("stop", None).unwrap(), serde_json::json!({}));
        let e = q.execute("cont", None).unwrap_err().to_string();
        assert!(e.contains("cont") && e.contains("nope"), "{e}");
        drop(q);
        server.join().unwrap();
    }
}
