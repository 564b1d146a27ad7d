//! The query string of envd's `/files` (download and upload), parsed exactly once.
//!
//! A signed `download_url()`/`upload_url()` authorises one path, one operation and one user.
//! If the code that checks the signature and the code that serves the file read the query
//! differently (one decoding keys and the other not, one taking the first of two `path`s and
//! the other the last), a URL signed for one file can be widened to any file as any user. So
//! the API layer parses the query with [`parse_file_query`], checks the signature over the
//! result, and hands that very value to envd in the request's extensions: there is one
//! reading of the query, and it is strict:
//!
//! - pairs are separated by `&` only (a `;` is data), keys and values are decoded the same way
//!   (`+` is a space, `%XX` a byte), and the decoded bytes must be UTF-8;
//! - a malformed escape (`%zz`, a trailing `%`), an empty name, an unknown name, a name given
//!   twice (in any spelling: `path` and `pa%74h` are the same name), a NUL byte anywhere, or a
//!   non-numeric `signature_expiration` is refused.

/// The parameters `/files` understands, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    /// Unix seconds.
    pub signature_expiration: Option<i64>,
}

/// Why a `/files` query was refused (answered with 400 and this text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid query: {0}")]
pub struct FileQueryError(pub String);

/// Parses the raw (still percent-encoded) query string of a `/files` request.
pub fn parse_file_query(raw: &str) -> Result<FileQuery, FileQueryError> {
    let mut q = FileQuery::default();
    // Parameters are few; tracking seen names separately keeps "given twice" independent of
    // whether the first value was empty.
    let mut seen: Vec<&'static str> = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        let value = decode(v)?;
        let name: &'static str = match key.as_str() {
            "path" => "path",
            "username" => "username",
            "signature" => "signature",
            "signature_expiration" => "signature_expiration",
            "" => return Err(FileQueryError("a parameter has an empty name".into())),
            other => {
                return Err(FileQueryError(format!("unknown parameter {:?}", printable(other))));
            }
        };
        if seen.contains(&name) {
            return Err(FileQueryError(format!("parameter {name:?} is given more than once")));
        }
        seen.push(name);
        if value.contains('\0') {
            return Err(FileQueryError(format!("parameter {name:?} contains a NUL byte")));
        }
        match name {
            "path" => q.path = Some(value),
            "username" => q.username = Some(value),
            "signature" => q.signature = Some(value),
            _ => {
                let secs = value.parse::<i64>().map_err(|_| {
                    FileQueryError(format!(
                        "signature_expiration {:?} is not a whole number of Unix seconds",
                        printable(&value)
                    ))
                })?;
                q.signature_expiration = Some(secs);
            }
        }
    }
    Ok(q)
}

/// `application/x-www-form-urlencoded` decoding, strict: a `%` must start a two-digit hex
/// escape, and the result must be UTF-8.
fn decode(s: &str) -> Result<String, FileQueryError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad_escape)?;
                let hi = hex_digit(hex[0]).ok_or_else(bad_escape)?;
                let lo = hex_digit(hex[1]).ok_or_else(bad_escape)?;
                out.push((hi << 4) | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| FileQueryError("a parameter is not valid UTF-8".into()))
}

fn bad_escape() -> FileQueryError {
    FileQueryError("malformed percent-encoding".into())
}

fn hex_digit(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A name or value as it may appear in an error message: short, without control characters.
fn printable(s: &str) -> String {
    s.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> FileQuery {
        parse_file_query(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"))
    }

    fn refused(raw: &str) -> String {
        match parse_file_query(raw) {
            Ok(q) => panic!("{raw:?} was accepted as {q:?}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn parses_what_the_sdks_send() {
        let q = ok("path=%2Fhome%2Fuser%2Fa+b.txt&username=user&signature=v1_abc&\
                    signature_expiration=1700000000");
        assert_eq!(q.path.as_deref(), Some("/home/user/a b.txt"));
        assert_eq!(q.username.as_deref(), Some("user"));
        assert_eq!(q.signature.as_deref(), Some("v1_abc"));
        assert_eq!(q.signature_expiration, Some(1_700_000_000));
        assert_eq!(ok(""), FileQuery::default());
        // Empty segments (a trailing `&`) carry nothing.
        assert_eq!(ok("path=/a&&").path.as_deref(), Some("/a"));
        // `+` and `%20` are both a space; `%2B` is a plus.
        assert_eq!(ok("path=/a+b").path, ok("path=/a%20b").path);
        assert_eq!(ok("path=/a%2Bb").path.as_deref(), Some("/a+b"));
        // A name without `=` has an empty value.
        assert_eq!(ok("username").username.as_deref(), Some(""));
    }

    /// The review's attack: a signed download URL with a second, encoded `path` and
    /// `username` appended. One reading of the query sees both; it is refused.
    #[test]
    fn encoded_duplicate_keys_are_refused() {
        let signed = "path=%2Fhome%2Fuser%2Fa.txt&username=user&signature=v1_x";
        for extra in [
            "&pa%74h=%2Froot%2Fsecret&user%6eame=root",
            "&pa%74h=%2Froot%2Fsecret",
            "&user%6eame=root",
            "&%70%61%74%68=/etc/shadow",
            "&path=/etc/shadow",
            "&username=root",
            "&signature=v1_y",
            "&signature_expiration=1&sign%61ture_expiration=2",
            "&path",
            "&path=",
        ] {
            let e = refused(&format!("{signed}{extra}"));
            assert!(e.contains("more than once"), "{extra}: {e}");
        }
        // Duplicates are refused whichever comes first, and when both are empty.
        assert!(refused("pa%74h=/a&path=/a").contains("more than once"));
        assert!(refused("path=&path=").contains("more than once"));
    }

    #[test]
    fn unknown_empty_and_case_variant_names_are_refused() {
        for raw in ["Path=/a", "PATH=/a", "USERNAME=root", "path%00=/a", "x=1", "path;username=r"] {
            assert!(refused(raw).contains("unknown parameter"), "{raw}");
        }
        assert!(refused("=/a").contains("empty name"));
        assert!(refused("path=/a&=root").contains("empty name"));
    }

    #[test]
    fn separators_inside_values_stay_data() {
        // `;` is not a separator: the whole rest is the path, as signed.
        assert_eq!(ok("path=/a;username=root").path.as_deref(), Some("/a;username=root"));
        assert_eq!(ok("path=/a;username=root").username, None);
        // Encoded `&` and `=` are data too, never a new parameter.
        let q = ok("path=%2Fa%26username%3Droot");
        assert_eq!(q.path.as_deref(), Some("/a&username=root"));
        assert_eq!(q.username, None);
        // A raw `=` inside a value is data after the first one.
        assert_eq!(ok("path=/a=b").path.as_deref(), Some("/a=b"));
    }

    #[test]
    fn bad_encoding_nul_and_bad_numbers_are_refused() {
        for raw in ["path=%zz", "path=/a%", "path=/a%2", "pa%7=x", "path=%C3%28"] {
            let e = refused(raw);
            assert!(e.contains("percent-encoding") || e.contains("UTF-8"), "{raw}: {e}");
        }
        assert!(refused("path=/a%00b").contains("NUL"));
        assert!(refused("username=ro%00ot").contains("NUL"));
        for raw in
            ["signature_expiration=soon", "signature_expiration=", "signature_expiration=1e9"]
        {
            assert!(refused(raw).contains("Unix seconds"), "{raw}");
        }
        assert!(refused("signature_expiration=99999999999999999999").contains("Unix seconds"));
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // A cheap stand-in for the fuzz harness: every short string over a hostile alphabet.
        let alphabet = ['%', '&', '=', '+', ';', 'a', 'p', '0', 'f', '\u{e9}'];
        let mut s = String::new();
        fn walk(s: &mut String, alphabet: &[char], depth: usize) {
            let _ = parse_file_query(s);
            if depth == 0 {
                return;
            }
            for c in alphabet {
                s.push(*c);
                walk(s, alphabet, depth - 1);
                s.pop();
            }
        }
        walk(&mut s, &alphabet, 4);
    }
}
