//! The sandboxes' resolver: a forwarder to the operator's upstream servers that refuses names
//! the policy could never allow, drops answers that point into blocked ranges (DNS
//! rebinding), answers IPv4 only, and remembers ("pins") which addresses it gave for which
//! names, so domain rules can be checked against what the sandbox was actually told.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::netns::Dialer;

/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads the nameservers of a resolv.conf (`/etc/resolv.conf` by default).
pub fn system_upstreams(path: &std::path::Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Parses `--dns-upstream` values: `IP` or `IP:PORT` (`[v6]:PORT`).
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not an address"))
}

/// Forwards queries to the upstream servers, from the egress namespace.
#[derive(Debug)]
pub struct Upstream {
    servers: Vec<SocketAddr>,
    dialer: Arc<Dialer>,
}

impl Upstream {
    pub fn new(servers: Vec<SocketAddr>, dialer: Arc<Dialer>) -> Upstream {
        Upstream { servers, dialer }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Sends `query` (already given a fresh id) to each server in turn until one answers;
    /// a truncated UDP answer is asked again over TCP.
    pub async fn ask(&self, query: &Message) -> io::Result<Message> {
        let bytes = query.to_vec().map_err(io::Error::other)?;
        let mut last = io::Error::other("no DNS upstream configured");
        for server in &self.servers {
            match self.udp(&bytes, query.metadata.id, *server).await {
                Ok(m) if m.metadata.truncation => match self.tcp(&bytes, *server).await {
                    Ok(m) => return Ok(m),
                    Err(e) => last = e,
                },
                Ok(m) => return Ok(m),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn udp(&self, q: &[u8], id: u16, server: SocketAddr) -> io::Result<Message> {
        let sock = self.dialer.udp().await?;
        sock.connect(server).await?;
        sock.send(q).await?;
        let mut buf = vec![0u8; 65535];
        tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            loop {
                let n = sock.recv(&mut buf).await?;
                // Anything that is not the answer to this id is noise (or spoofing): ignore it.
                if let Ok(m) = Message::from_vec(&buf[..n])
                    && m.metadata.id == id
                    && m.metadata.message_type == MessageType::Response
                {
                    return Ok(m);
                }
            }
        })
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("DNS upstream {server} timed out"))
        })?
    }

    async fn tcp(&self, q: &[u8], server: SocketAddr) -> io::Result<Message> {
        let mut s = self.dialer.connect(server, UPSTREAM_TIMEOUT).await?;
        let len = u16::try_from(q.len()).map_err(io::Error::other)?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(q).await?;
        tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            let n = s.read_u16().await?;
            let mut buf = vec![0u8; usize::from(n)];
            s.read_exact(&mut buf).await?;
            Message::from_vec(&buf).map_err(io::Error::other)
        })
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("DNS upstream {server} timed out"))
        })?
    }
}

/// Most (name, address) pairs one sandbox's resolver remembers; the oldest go first.
const MAX_PINS: usize = 8192;

/// Which addresses the sandbox's resolver returned for which names.
#[derive(Debug, Default)]
pub struct Pins {
    by_ip: HashMap<IpAddr, Vec<String>>,
    order: VecDeque<(String, IpAddr)>,
}

impl Pins {
    pub fn add(&mut self, name: &str, ip: IpAddr) {
        let names = self.by_ip.entry(ip).or_default();
        if names.iter().any(|n| n == name) {
            return;
        }
        names.push(name.to_string());
        self.order.push_back((name.to_string(), ip));
        while self.order.len() > MAX_PINS {
            if let Some((n, ip)) = self.order.pop_front()
                && let Some(v) = self.by_ip.get_mut(&ip)
            {
                v.retain(|x| *x != n);
                if v.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    /// Did the resolver give `ip` for `name`?
    pub fn has(&self, name: &str, ip: IpAddr) -> bool {
        self.by_ip.get(&ip).is_some_and(|v| v.iter().any(|n| n == name))
    }

    /// The names the resolver gave `ip` for, oldest first.
    pub fn names(&self, ip: IpAddr) -> Vec<String> {
        self.by_ip.get(&ip).cloned().unwrap_or_default()
    }
}

/// What filtering an upstream answer did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Addresses kept, with the record name they were given for.
    pub kept: Vec<(String, IpAddr)>,
    /// Addresses removed, and why.
    pub removed: Vec<(IpAddr, String)>,
}

/// Removes from `answer` every A record `blocked` objects to (with its reason) and every
/// AAAA record (sandboxes are IPv4-only), in all sections.
pub fn filter_answer(answer: &mut Message, blocked: impl Fn(IpAddr) -> Option<String>) -> Filtered {
    let mut out = Filtered::default();
    let mut keep = |r: &hickory_proto::rr::Record| -> bool {
        match &r.data {
            RData::A(a) => {
                let ip = IpAddr::V4(a.0);
                match blocked(ip) {
                    Some(why) => {
                        out.removed.push((ip, why));
                        false
                    }
                    None => {
                        let name = r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
                        out.kept.push((name, ip));
                        true
                    }
                }
            }
            RData::AAAA(_) => false,
            _ => true,
        }
    };
    answer.answers.retain(&mut keep);
    answer.additionals.retain(&mut keep);
    answer
        .authorities
        .retain(|r| r.record_type() != RecordType::AAAA && r.record_type() != RecordType::A);
    out
}

/// An answer with `code` and no records, for `query`.
pub fn reply(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(query.metadata.id, query.metadata.op_code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    m.queries = query.queries.clone();
    m
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::str::FromStr;

    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record};

    use super::*;

    #[test]
    fn filters_rebinding_and_ipv6() {
        let n = Name::from_str("www.x.test.").unwrap();
        let t = Name::from_str("edge.x.test.").unwrap();
        let mut m = Message::response(7, hickory_proto::op::OpCode::Query);
        m.answers.push(Record::from_rdata(n, 60, RData::CNAME(CNAME(t.clone()))));
        m.answers.push(Record::from_rdata(
            t.clone(),
            60,
            RData::A(A(Ipv4Addr::new(203, 0, 113, 1))),
        ));
        m.answers.push(Record::from_rdata(t.clone(), 60, RData::A(A(Ipv4Addr::new(10, 0, 0, 1)))));
        m.answers.push(Record::from_rdata(t, 60, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))));
        let f =
            filter_answer(&mut m, |ip| ip.to_string().starts_with("10.").then(|| "private".into()));
        assert_eq!(m.answers.len(), 2);
        assert_eq!(f.kept, vec![("edge.x.test".to_string(), "203.0.113.1".parse().unwrap())]);
        assert_eq!(f.removed.len(), 1);
    }

    #[test]
    fn pins_remember_and_forget_oldest() {
        let mut p = Pins::default();
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        p.add("a.test", ip);
        p.add("a.test", ip);
        p.add("b.test", ip);
        assert!(p.has("a.test", ip) && !p.has("c.test", ip));
        assert_eq!(p.names(ip), vec!["a.test", "b.test"]);
        for i in 0..MAX_PINS {
            p.add(&format!("n{i}.test"), "203.0.113.2".parse().unwrap());
        }
        assert!(!p.has("a.test", ip));
    }

    #[test]
    fn resolv_conf_and_flags() {
        let dir = std::env::temp_dir().join(format!("rf-resolv-{}", std::process::id()));
        std::fs::write(&dir, "# x\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch a\n")
            .unwrap();
        let u = system_upstreams(&dir);
        let _ = std::fs::remove_file(&dir);
        assert_eq!(u.len(), 2);
        assert_eq!(parse_upstream("1.2.3.4").unwrap().port(), 53);
        assert_eq!(parse_upstream("1.2.3.4:5353").unwrap().port(), 5353);
        assert!(parse_upstream("nope").is_err());
    }
}
