//! Reads the name a client put in its first bytes: the server name of a TLS ClientHello, or
//! the `Host` of an HTTP/1 request. Parsing is bounded and never trusts a length it has not
//! checked against the buffer.

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// TLS; the SNI host name, if the ClientHello carried one.
    Tls(Option<String>),
    /// HTTP/1; the `Host` header's host part, if any.
    Http(Option<String>),
    /// Something else.
    Other,
}

/// Most bytes we wait for before giving up on finding a name.
pub const MAX_SNIFF: usize = 16 * 1024;

pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::Incomplete,
        Some(0x16) => tls(buf),
        Some(b) if b.is_ascii_uppercase() => http(buf),
        Some(_) => Sniffed::Other,
    }
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?])))
}

fn tls(buf: &[u8]) -> Sniffed {
    // Record header: type 0x16, version 0x03xx, length.
    if buf.len() < 5 {
        return Sniffed::Incomplete;
    }
    if buf[1] != 0x03 {
        return Sniffed::Other;
    }
    let Some(rec_len) = be16(buf, 3) else { return Sniffed::Incomplete };
    // A ClientHello larger than one record is legal but rare; we read the first record only.
    let Some(rec) = buf.get(5..5 + rec_len) else {
        return if 5 + rec_len > MAX_SNIFF { Sniffed::Tls(None) } else { Sniffed::Incomplete };
    };
    Sniffed::Tls(client_hello_sni(rec))
}

/// The SNI of a ClientHello handshake message (inside one record).
fn client_hello_sni(h: &[u8]) -> Option<String> {
    if *h.first()? != 0x01 {
        return None;
    }
    // type(1) len(3) version(2) random(32)
    let mut at = 4 + 2 + 32;
    let sid = usize::from(*h.get(at)?);
    at += 1 + sid;
    let suites = be16(h, at)?;
    at += 2 + suites;
    let comp = usize::from(*h.get(at)?);
    at += 1 + comp;
    let ext_len = be16(h, at)?;
    at += 2;
    let end = (at + ext_len).min(h.len());
    while at + 4 <= end {
        let kind = be16(h, at)?;
        let len = be16(h, at + 2)?;
        let body = h.get(at + 4..at + 4 + len)?;
        if kind == 0 {
            // server_name_list: len(2), then entries type(1) len(2) name.
            let mut p = 2;
            while p + 3 <= body.len() {
                let name_type = body[p];
                let n = be16(body, p + 1)?;
                let name = body.get(p + 3..p + 3 + n)?;
                if name_type == 0 {
                    return std::str::from_utf8(name).ok().map(str::to_string);
                }
                p += 3 + n;
            }
            return None;
        }
        at += 4 + len;
    }
    None
}

fn http(buf: &[u8]) -> Sniffed {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        // Not a request line shape at all: stop waiting.
        let first = buf.split(|b| *b == b' ').next().unwrap_or_default();
        if !first.iter().all(u8::is_ascii_uppercase) || first.len() > 16 {
            return Sniffed::Other;
        }
        return if buf.len() >= MAX_SNIFF { Sniffed::Http(None) } else { Sniffed::Incomplete };
    };
    let head = &buf[..end];
    let mut lines = head.split(|b| *b == b'\n');
    let request = lines.next().unwrap_or_default();
    let request = request.strip_suffix(b"\r").unwrap_or(request);
    if !request.ends_with(b" HTTP/1.1") && !request.ends_with(b" HTTP/1.0") {
        return Sniffed::Other;
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        if line[..colon].eq_ignore_ascii_case(b"host") {
            let value = String::from_utf8_lossy(&line[colon + 1..]).trim().to_string();
            return Sniffed::Http(Some(strip_port(&value)));
        }
    }
    Sniffed::Http(None)
}

/// `host:port` → `host`; `[v6]:port` → `v6`.
fn strip_port(v: &str) -> String {
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_string();
    }
    match v.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h.to_string(),
        _ => v.to_string(),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with an SNI extension.
    fn hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0, 0];
        let mut list = vec![0u8];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name.as_bytes());
        let mut body = (list.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(&list);
        sni.extend_from_slice(&(body.len() as u16).to_be_bytes());
        sni.extend_from_slice(&body);
        let mut h = vec![0x03, 0x03];
        h.extend_from_slice(&[7; 32]);
        h.push(0); // session id
        h.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        h.extend_from_slice(&[1, 0]); // null compression
        h.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        h.extend_from_slice(&sni);
        let mut msg = vec![0x01, 0];
        msg.extend_from_slice(&(h.len() as u16).to_be_bytes());
        msg.extend_from_slice(&h);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        rec.extend_from_slice(&msg);
        rec
    }

    #[test]
    fn tls_sni() {
        let h = hello("www.allowed.test");
        assert_eq!(sniff(&h), Sniffed::Tls(Some("www.allowed.test".into())));
        assert_eq!(sniff(&h[..20]), Sniffed::Incomplete);
        assert_eq!(sniff(&h[..3]), Sniffed::Incomplete);
        // Truncated lengths inside the record never panic.
        let mut bad = h;
        bad[5 + 4 + 2 + 32] = 0xff;
        assert_eq!(sniff(&bad), Sniffed::Tls(None));
    }

    #[test]
    fn http_host() {
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHOST: a.test:8080\r\n\r\n"),
            Sniffed::Http(Some("a.test".into()))
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniffed::Http(Some("::1".into()))
        );
        assert_eq!(sniff(b"GET / HTTP/1.0\r\n\r\n"), Sniffed::Http(None));
        assert_eq!(sniff(b"GET / HT"), Sniffed::Incomplete);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"\x00\x01"), Sniffed::Other);
    }
}
