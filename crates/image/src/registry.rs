//! Pulling images from an OCI registry (the Docker Registry HTTP API v2).
//!
//! Anonymous pulls with the registries' token flow: a request answered 401 with
//! `WWW-Authenticate: Bearer realm=...,service=...,scope=...` gets a token from the realm and
//! is retried with it. Manifest lists and image indexes resolve to linux/amd64. Every
//! manifest, config and layer is checked against its digest (a manifest fetched by tag against
//! the registry's `Docker-Content-Digest`, where it sends one). HTTPS verifies certificates
//! against the system's CA store; `--insecure-registry HOST:PORT` allows plain HTTP to one
//! registry (local test registries).

use std::io::Read;
use std::time::Duration;

use ureq::tls::{RootCerts, TlsConfig};

use crate::archive::{Blobs, MAX_JSON, plan_manifest_at};
use crate::error::ImageError;
use crate::oci::{self, Digest, Index, Manifest};
use crate::store::{Progress, Record, Store};
use crate::unpack::Limits;

/// Options of a pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`HOST:PORT`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// As written in the reference (`docker.io` when it names none).
    pub registry: String,
    pub repository: String,
    /// A tag or a digest.
    pub reference: String,
}

impl Reference {
    /// `[REGISTRY/]REPOSITORY[:TAG|@DIGEST]`; the registry is the first part if it has a `.`
    /// or a `:` or is `localhost`; Docker Hub's one-part names live under `library/`.
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let bad = |why: &str| ImageError::Format(format!("invalid image reference {s:?}: {why}"));
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?.to_string())),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, p)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), p)
            }
            _ => ("docker.io".to_string(), rest),
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t)),
            _ => (path, None),
        };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if path.is_empty() || !path.chars().all(ok) || path.split('/').any(str::is_empty) {
            return Err(bad("the repository is lower-case letters, digits, '.', '_', '-', '/'"));
        }
        if let Some(t) = tag
            && (t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
        {
            return Err(bad("bad tag"));
        }
        let repository = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let reference = digest.or(tag.map(str::to_string)).unwrap_or_else(|| "latest".into());
        Ok(Reference { registry, repository, reference })
    }

    /// The default template name: the repository's last part and the tag.
    pub fn template_name(&self) -> String {
        let base = self.repository.rsplit('/').next().unwrap_or(&self.repository);
        match self.reference.strip_prefix("sha256:") {
            Some(hex) => format!("{base}:sha256-{}", &hex[..12]),
            None => format!("{base}:{}", self.reference),
        }
    }
}

/// Pulls `reference` into `store` as template `name` (default: [`Reference::template_name`]).
pub fn pull(
    store: &Store,
    reference: &str,
    name: Option<&str>,
    opts: &PullOptions,
    limits: &Limits,
    progress: &mut dyn Progress,
) -> Result<Record, ImageError> {
    let r = Reference::parse(reference)?;
    let name = name.map(str::to_string).unwrap_or_else(|| r.template_name());
    // Refuse a bad name before any download.
    crate::store::normalize_name(&name)?;
    let mut client = Client::new(&r, opts);
    let (bytes, digest) = client.manifest(&r.reference)?;
    let mut top = oci::json::<serde_json::Value>(&bytes, "manifest")?;
    let mut manifest_digest = digest;
    let mut manifest_bytes = bytes;
    for _ in 0..4 {
        let media = top.get("mediaType").and_then(|m| m.as_str()).unwrap_or_default().to_string();
        let is_index = media == oci::MT_OCI_INDEX
            || media == oci::MT_DOCKER_LIST
            || (media.is_empty() && top.get("manifests").is_some());
        if !is_index {
            break;
        }
        let index: Index = oci::json(&manifest_bytes, "image index")?;
        let chosen = oci::pick_platform(&index, "image index")?.digest.clone();
        let (b, d) = client.manifest(&chosen)?;
        top = oci::json(&b, "manifest")?;
        manifest_bytes = b;
        manifest_digest = d;
    }
    if top.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) {
        return Err(client.err("schema 1 manifests (deprecated) are not supported".into()));
    }
    let manifest: Manifest = oci::json(&manifest_bytes, "manifest")?;
    let mut plan =
        plan_manifest_at(&mut client, &manifest, Some(manifest_digest), |d| d.to_string())?;
    plan.suggested_name = None;
    let source = format!(
        "pull {}/{}@{}",
        r.registry,
        r.repository,
        plan.manifest_digest.as_ref().map(|d| d.as_str()).unwrap_or("?")
    );
    store.install(&plan, &mut client, &name, source, limits, progress)
}

/// Accepted manifest media types, most wanted first.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

struct Client {
    agent: ureq::Agent,
    /// `https://host` or `http://host:port`.
    base: String,
    registry: String,
    repository: String,
    token: Option<String>,
}

impl Client {
    fn new(r: &Reference, opts: &PullOptions) -> Client {
        let host = if r.registry == "docker.io" { "registry-1.docker.io" } else { &r.registry };
        let scheme = if opts.insecure.iter().any(|h| h == &r.registry) { "http" } else { "https" };
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(TlsConfig::builder().root_certs(RootCerts::PlatformVerifier).build())
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent("ringfence")
            .build();
        Client {
            agent: config.into(),
            base: format!("{scheme}://{host}"),
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            token: None,
        }
    }

    fn err(&self, reason: String) -> ImageError {
        ImageError::Registry { registry: self.registry.clone(), reason }
    }

    /// GETs `path` (under `/v2/<repository>/`), getting a token first if the registry asks.
    fn get(
        &mut self,
        path: &str,
        accept: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, ImageError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repository);
        for attempt in 0..2 {
            let mut req = self.agent.get(&url).header("Accept", accept);
            if let Some(t) = &self.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
            let resp = req.call().map_err(|e| self.err(format!("GET {url}: {e}")))?;
            let status = resp.status().as_u16();
            if status == 401 && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.token = Some(self.fetch_token(&challenge)?);
                continue;
            }
            if status != 200 {
                let what = match status {
                    401 | 403 => "not authorised (only anonymous pulls are supported)".to_string(),
                    404 => "not found".to_string(),
                    s => format!("HTTP {s}"),
                };
                return Err(self.err(format!("GET {url}: {what}")));
            }
            return Ok(resp);
        }
        Err(self.err(format!("GET {url}: still unauthorised with a token")))
    }

    fn fetch_token(&self, challenge: &str) -> Result<String, ImageError> {
        let params = challenge
            .strip_prefix("Bearer ")
            .map(parse_challenge)
            .ok_or_else(|| self.err(format!("unsupported authentication {challenge:?}")))?;
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let realm = get("realm").ok_or_else(|| self.err("token challenge without realm".into()))?;
        let scope = get("scope")
            .map(str::to_string)
            .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
        let mut req = self.agent.get(realm).query("scope", &scope);
        if let Some(service) = get("service") {
            req = req.query("service", service);
        }
        let resp = req.call().map_err(|e| self.err(format!("token from {realm}: {e}")))?;
        if resp.status().as_u16() != 200 {
            return Err(self.err(format!("token from {realm}: HTTP {}", resp.status().as_u16())));
        }
        let body = read_limited(resp.into_body(), MAX_JSON)
            .map_err(|e| self.err(format!("token: {e}")))?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = oci::json(&body, "token response")?;
        t.token.or(t.access_token).ok_or_else(|| self.err("token response has no token".into()))
    }

    /// Fetches a manifest by tag or digest; returns its bytes and verified digest.
    fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, Digest), ImageError> {
        let resp = self.get(&format!("manifests/{reference}"), ACCEPT)?;
        let header = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_limited(resp.into_body(), MAX_JSON)
            .map_err(|e| self.err(format!("manifest {reference}: {e}")))?;
        let actual = Digest::of(&bytes);
        let expected =
            if reference.starts_with("sha256:") { Some(reference.to_string()) } else { header };
        if let Some(expected) = expected
            && expected != actual.as_str()
        {
            return Err(ImageError::Digest {
                what: "manifest",
                name: format!("{}:{reference}", self.repository),
                expected,
                actual: actual.to_string(),
            });
        }
        Ok((bytes, actual))
    }
}

impl Blobs for Client {
    fn exists(&mut self, _path: &str) -> bool {
        true
    }

    fn open(&mut self, digest: &str) -> Result<(Box<dyn Read + '_>, Option<u64>), ImageError> {
        let resp = self.get(&format!("blobs/{digest}"), "*/*")?;
        let size = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((Box::new(resp.into_body().into_reader()), size))
    }
}

fn read_limited(body: ureq::Body, max: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    body.into_reader().take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(out)
}

/// `realm="https://auth",service="registry",scope="repository:x:pull"` → pairs.
fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (q[..end].to_string(), &q[end + 1..]),
                None => (q.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (after[..end].trim().to_string(), &after[end..]),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = next.trim_start_matches([',', ' ']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_like_docker() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("docker.io", "library/busybox", "latest")
        );
        let r = Reference::parse("127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "team/app", "v1.2")
        );
        assert_eq!(r.template_name(), "app:v1.2");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/o/r@{d}")).unwrap();
        assert_eq!(r.reference, d);
        assert_eq!(r.template_name(), "r:sha256-aaaaaaaaaaaa");
        for bad in ["", "UPPER/x", "x:", "a//b", "x@sha256:zz"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = parse_challenge(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.docker.io/token".into()));
        assert_eq!(p[1], ("service".into(), "registry.docker.io".into()));
        assert_eq!(p[2], ("scope".into(), "repository:library/busybox:pull".into()));
    }
}
