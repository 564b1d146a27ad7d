//! Parsers of client bytes that sit between the HTTP edge and the agent: Connect envelopes and
//! gzip bodies. They are pure (no sandbox, no I/O besides the streams handed to them) and public,
//! so a fuzz harness can drive them with arbitrary input.
//!
//! Both are built to do work linear in their input and to hold a bounded amount of memory
//! whatever the input claims:
//!
//! - [`EnvelopeReader`] consumes frames with a cursor (no shifting of the buffer per frame, which
//!   made many small frames quadratic) and refuses a frame longer than its limit from the prefix
//!   alone, before buffering it;
//! - [`Inflater`] inflates at most [`INFLATE_CHUNK`] bytes per step, whatever a single input
//!   chunk would expand to, and stops with an error as soon as the output passes its size cap or
//!   its expansion ratio, instead of inflating a decompression bomb in full first.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};

use bytes::{Buf, Bytes};
use flate2::bufread::MultiGzDecoder;
use futures_util::{Stream, StreamExt};

/// Largest piece of output one [`Inflater::step`] produces.
pub const INFLATE_CHUNK: usize = 64 << 10;

/// Size of a Connect envelope's prefix: `[flags:u8][len:u32 BE]`.
pub const ENVELOPE_PREFIX: usize = 5;

// ---------------------------------------------------------------------------------------------
// Connect envelopes.

/// A Connect envelope that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
}

/// Incremental parser of Connect envelopes: `[flags:u8][len:u32 BE][len bytes]`.
///
/// Feed it bytes as they arrive with [`push`](Self::push) and take complete frames with
/// [`next_frame`](Self::next_frame). It buffers at most one frame (up to `limit` bytes) plus the
/// last chunk pushed.
#[derive(Debug)]
pub struct EnvelopeReader {
    buf: Vec<u8>,
    /// Where the next unconsumed frame starts in `buf`: frames are consumed by moving this
    /// cursor, and the consumed prefix is dropped once per `push`, so the cost stays linear.
    start: usize,
    limit: usize,
}

impl EnvelopeReader {
    /// A reader that refuses frames longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        EnvelopeReader { buf: Vec::new(), start: 0, limit }
    }

    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame (its flags and payload), if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, EnvelopeError> {
        let rest = &self.buf[self.start..];
        let Some(prefix) = rest.get(..ENVELOPE_PREFIX) else { return Ok(None) };
        let flags = prefix[0];
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.limit {
            return Err(EnvelopeError::TooLarge { len, limit: self.limit });
        }
        let Some(data) = rest.get(ENVELOPE_PREFIX..ENVELOPE_PREFIX + len) else {
            return Ok(None);
        };
        let data = data.to_vec();
        self.start += ENVELOPE_PREFIX + len;
        Ok(Some((flags, data)))
    }

    /// Whether nothing is left over (a partial frame at the end of a body is a truncation).
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Gzip.

/// How far a gzip body may inflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateLimits {
    /// Most output bytes in all.
    pub max_output: u64,
    /// Most output bytes per input byte, checked once the output passes `ratio_grace`. Deflate
    /// cannot exceed about 1032:1; real data rarely passes 20:1, a run of zeros reaches the
    /// maximum. `None` checks no ratio.
    pub max_ratio: Option<u64>,
    /// Output allowed whatever the ratio, so a small, very compressible file (a megabyte of
    /// zeros) still goes through.
    pub ratio_grace: u64,
}

impl InflateLimits {
    /// Only a total size cap.
    pub fn size(max_output: u64) -> Self {
        InflateLimits { max_output, max_ratio: None, ratio_grace: 0 }
    }
}

/// Why inflating stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("malformed gzip body: {0}")]
    Malformed(String),
    #[error(
        "the gzip body expands more than {ratio}:1 ({input} compressed bytes inflated past \
         {output}); refused as a decompression bomb"
    )]
    Ratio { ratio: u64, input: u64, output: u64 },
    #[error("the gzip body inflates past {limit} bytes")]
    TooLarge { limit: u64 },
    /// The compressed stream itself failed (the client's body broke off).
    #[error("{0}")]
    Input(String),
}

/// Compressed input as it arrives. Reading past what has arrived answers `WouldBlock`, which
/// the gzip decoder is written to resume from; the end of input reads as end of file.
#[derive(Debug, Default)]
struct Feed {
    chunks: VecDeque<Bytes>,
    ended: bool,
    /// Bytes the decoder has taken: the ratio is measured against these, not against what was
    /// pushed, so pushing a whole bomb at once does not buy it a bigger allowance.
    consumed: u64,
}

impl Read for Feed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = {
            let avail = self.fill_buf()?;
            let n = avail.len().min(out.len());
            out[..n].copy_from_slice(&avail[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Feed {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
        match self.chunks.front() {
            Some(c) => Ok(c),
            None if self.ended => Ok(&[]),
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn consume(&mut self, n: usize) {
        if let Some(c) = self.chunks.front_mut() {
            let n = n.min(c.len());
            c.advance(n);
            self.consumed += n as u64;
        }
    }
}

/// What one [`Inflater::step`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inflated {
    /// Up to [`INFLATE_CHUNK`] bytes of output.
    Data(Bytes),
    /// Everything pushed so far is inflated: push more, or end the input.
    NeedInput,
    /// The gzip stream (every member) ended.
    Done,
}

/// A push-driven, output-bounded gzip decoder (multi-member, as Go's reader that envd uses).
///
/// Each step inflates at most [`INFLATE_CHUNK`] bytes, so memory does not depend on how far a
/// chunk of input expands, and the limits are checked after every step.
pub struct Inflater {
    decoder: MultiGzDecoder<Feed>,
    limits: InflateLimits,
    input: u64,
    output: u64,
    buf: Vec<u8>,
    failed: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("limits", &self.limits)
            .field("input", &self.input)
            .field("output", &self.output)
            .finish()
    }
}

impl Inflater {
    pub fn new(limits: InflateLimits) -> Self {
        Inflater {
            decoder: MultiGzDecoder::new(Feed::default()),
            limits,
            input: 0,
            output: 0,
            buf: vec![0; INFLATE_CHUNK],
            failed: false,
        }
    }

    /// Adds compressed input. Call it when [`step`](Self::step) asks for input: pushing more
    /// before is allowed but only makes the buffer grow.
    pub fn push(&mut self, data: Bytes) {
        self.input += data.len() as u64;
        self.decoder.get_mut().chunks.push_back(data);
    }

    /// No more input will come: what is missing now is a truncation.
    pub fn end_input(&mut self) {
        self.decoder.get_mut().ended = true;
    }

    /// Compressed bytes pushed, compressed bytes inflated and bytes produced so far.
    pub fn totals(&self) -> (u64, u64, u64) {
        (self.input, self.decoder.get_ref().consumed, self.output)
    }

    /// Inflates the next piece. After an error, every later step repeats a malformed-input
    /// error: the decoder's state is not trusted any more.
    pub fn step(&mut self) -> Result<Inflated, InflateError> {
        if self.failed {
            return Err(InflateError::Malformed("the stream already failed".into()));
        }
        let result = self.inflate();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn inflate(&mut self) -> Result<Inflated, InflateError> {
        let n = match self.decoder.read(&mut self.buf) {
            Ok(0) => return Ok(Inflated::Done),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Inflated::NeedInput),
            Err(e) => return Err(InflateError::Malformed(e.to_string())),
        };
        self.output += n as u64;
        if self.output > self.limits.max_output {
            return Err(InflateError::TooLarge { limit: self.limits.max_output });
        }
        let consumed = self.decoder.get_ref().consumed;
        if let Some(ratio) = self.limits.max_ratio
            && self.output > self.limits.ratio_grace
            && self.output > consumed.saturating_mul(ratio)
        {
            return Err(InflateError::Ratio { ratio, input: consumed, output: self.output });
        }
        Ok(Inflated::Data(Bytes::copy_from_slice(&self.buf[..n])))
    }
}

/// Inflates a whole gzip message already in memory, refusing to produce more than `max` bytes
/// (a Connect message compressed with gzip).
pub fn gunzip_bounded(data: Bytes, max: usize) -> Result<Vec<u8>, InflateError> {
    let mut inflater = Inflater::new(InflateLimits::size(max as u64));
    inflater.push(data);
    inflater.end_input();
    let mut out = Vec::new();
    loop {
        match inflater.step()? {
            Inflated::Data(d) => out.extend_from_slice(&d),
            Inflated::Done => return Ok(out),
            // All input was pushed and ended, so the decoder cannot ask for more.
            Inflated::NeedInput => {
                return Err(InflateError::Malformed("truncated gzip stream".into()));
            }
        }
    }
}

/// Inflates a gzip stream as it arrives, in pieces of at most [`INFLATE_CHUNK`] bytes. Input is
/// pulled only when the output so far has been taken, so a consumer that stops pulling stops
/// the inflation too. Errors of the input stream pass through as [`InflateError::Input`]; the
/// stream ends after the first error.
pub fn gunzip_stream<S, E>(
    stream: S,
    limits: InflateLimits,
) -> impl Stream<Item = Result<Bytes, InflateError>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    let state = Some((stream, Inflater::new(limits)));
    futures_util::stream::unfold(state, |state| async move {
        let (mut stream, mut inflater) = state?;
        loop {
            match inflater.step() {
                Ok(Inflated::Data(d)) => return Some((Ok(d), Some((stream, inflater)))),
                Ok(Inflated::Done) => return None,
                Ok(Inflated::NeedInput) => match stream.next().await {
                    Some(Ok(chunk)) => inflater.push(chunk),
                    Some(Err(e)) => return Some((Err(InflateError::Input(e.to_string())), None)),
                    None => inflater.end_input(),
                },
                Err(e) => return Some((Err(e), None)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::Write;

    use super::*;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// A gzip body of `members` members of `each` zeros: a bomb cheap to build.
    fn zeros_bomb(each: usize, members: usize) -> Vec<u8> {
        let one = gzip(&vec![0u8; each]);
        one.repeat(members)
    }

    fn frame(flags: u8, data: &[u8]) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn envelopes_parse_across_pushes_and_refuse_big_prefixes() {
        let mut r = EnvelopeReader::new(10);
        let mut bytes = frame(0, b"abc");
        bytes.extend(frame(2, b""));
        for b in &bytes {
            r.push(&[*b]);
        }
        assert_eq!(r.next_frame().unwrap(), Some((0, b"abc".to_vec())));
        assert_eq!(r.next_frame().unwrap(), Some((2, Vec::new())));
        assert_eq!(r.next_frame().unwrap(), None);
        assert!(r.is_empty());
        // A prefix claiming more than the limit is refused before its payload arrives.
        r.push(&[0, 0, 0, 0, 11]);
        assert_eq!(r.next_frame(), Err(EnvelopeError::TooLarge { len: 11, limit: 10 }));
        let mut t = EnvelopeReader::new(10);
        t.push(&frame(0, b"abc")[..6]);
        assert_eq!(t.next_frame().unwrap(), None);
        assert!(!t.is_empty(), "a partial frame is left over");
    }

    #[test]
    fn many_tiny_envelopes_take_linear_time() {
        // 2 MiB of empty frames in one push: shifting the buffer per frame took minutes.
        let bytes = frame(0, b"").repeat(400_000);
        let mut r = EnvelopeReader::new(16 << 20);
        let t = std::time::Instant::now();
        r.push(&bytes);
        let mut n = 0;
        while r.next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 400_000);
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t.elapsed());
    }

    #[test]
    fn inflater_steps_are_bounded_and_resume_across_any_split() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let z = gzip(&data);
        for split in [1usize, 7, 4096, z.len()] {
            let mut inf = Inflater::new(InflateLimits::size(u64::MAX));
            let mut input = z.chunks(split);
            let mut out = Vec::new();
            loop {
                match inf.step().unwrap() {
                    Inflated::Data(d) => {
                        assert!(d.len() <= INFLATE_CHUNK);
                        out.extend_from_slice(&d);
                    }
                    Inflated::NeedInput => match input.next() {
                        Some(c) => inf.push(Bytes::copy_from_slice(c)),
                        None => inf.end_input(),
                    },
                    Inflated::Done => break,
                }
            }
            assert_eq!(out, data, "split {split}");
        }
    }

    #[test]
    fn multi_member_bodies_inflate_whole() {
        let mut z = gzip(b"hello ");
        z.extend(gzip(b"world"));
        assert_eq!(gunzip_bounded(Bytes::from(z), 100).unwrap(), b"hello world");
    }

    #[test]
    fn malformed_and_truncated_gzip_is_an_error() {
        assert!(matches!(
            gunzip_bounded(Bytes::from_static(b"not gzip at all"), 100),
            Err(InflateError::Malformed(_))
        ));
        let z = gzip(&[7u8; 1000]);
        assert!(gunzip_bounded(Bytes::copy_from_slice(&z[..z.len() - 4]), 10_000).is_err());
        assert!(gunzip_bounded(Bytes::new(), 100).is_err(), "an empty body is not gzip");
        // Garbage after a valid member is not silently ignored.
        let mut g = gzip(b"x");
        g.extend_from_slice(b"trailing");
        assert!(gunzip_bounded(Bytes::from(g), 100).is_err());
    }

    #[test]
    fn a_bomb_stops_at_the_size_cap_without_inflating_it_all() {
        // 16 MiB of compressed members, each 16 MiB of zeros: 16 GiB if inflated in full.
        let one = gzip(&vec![0u8; 16 << 20]);
        let members = (16 << 20) / one.len();
        let bomb = one.repeat(members);
        let t = std::time::Instant::now();
        let r = gunzip_bounded(Bytes::from(bomb), 16 << 20);
        assert_eq!(r, Err(InflateError::TooLarge { limit: 16 << 20 }));
        // Inflating 16 GiB takes minutes; stopping at the cap, well under that.
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t.elapsed());
    }

    #[test]
    fn the_ratio_cap_spares_small_files_and_stops_bombs_early() {
        let limits =
            InflateLimits { max_output: u64::MAX, max_ratio: Some(100), ratio_grace: 1 << 20 };
        // A megabyte of zeros expands ~1000:1 but stays within the grace.
        let small = gzip(&vec![0u8; 1 << 20]);
        let mut inf = Inflater::new(limits);
        inf.push(Bytes::from(small));
        inf.end_input();
        let mut total = 0;
        loop {
            match inf.step().unwrap() {
                Inflated::Data(d) => total += d.len(),
                Inflated::Done => break,
                Inflated::NeedInput => panic!("input was ended"),
            }
        }
        assert_eq!(total, 1 << 20);
        // 64 MiB of zeros in one member is refused just past the grace.
        let bomb = zeros_bomb(16 << 20, 4);
        let mut inf = Inflater::new(limits);
        inf.push(Bytes::from(bomb));
        inf.end_input();
        let err = loop {
            match inf.step() {
                Ok(Inflated::Data(_)) => {}
                Ok(other) => panic!("bomb inflated to the end: {other:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, InflateError::Ratio { ratio: 100, .. }), "{err}");
        let (_, _, out) = inf.totals();
        assert!(out <= (1 << 20) + INFLATE_CHUNK as u64, "inflated {out} bytes first");
        assert!(err.to_string().contains("decompression bomb"));
        // The decoder stays failed.
        assert!(inf.step().is_err());
    }

    #[tokio::test]
    async fn stream_pulls_input_only_as_output_is_taken() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 7) as u8).collect();
        let z = gzip(&data);
        let chunks: Vec<Result<Bytes, String>> =
            z.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let out: Vec<Result<Bytes, InflateError>> =
            gunzip_stream(futures_util::stream::iter(chunks), InflateLimits::size(u64::MAX))
                .collect()
                .await;
        let mut all = Vec::new();
        for piece in out {
            let piece = piece.unwrap();
            assert!(piece.len() <= INFLATE_CHUNK);
            all.extend_from_slice(&piece);
        }
        assert_eq!(all, data);
        // A broken input stream ends the output with its error.
        let bad: Vec<Result<Bytes, String>> =
            vec![Ok(Bytes::copy_from_slice(&z[..100])), Err("connection reset".into())];
        let out: Vec<_> =
            gunzip_stream(futures_util::stream::iter(bad), InflateLimits::size(u64::MAX))
                .collect()
                .await;
        assert_eq!(out.last(), Some(&Err(InflateError::Input("connection reset".into()))));
    }
}
