//! A fuzz harness for the parsers that take input from a client or from inside a sandbox,
//! run by `cargo test` on stable Rust (no nightly toolchain, no separate runner).
//!
//! Each target is driven by proptest with two kinds of input: random bytes, and mutations of
//! valid seed inputs (byte flips, insertions, deletions, duplicated slices, truncation), so
//! that inputs get past the first length or magic check and reach the deeper code. A target
//! fails on any panic; proptest then shrinks the input and prints it.
//!
//! Memory is watched by the process's allocator: `Cap` counts every live byte and refuses
//! allocations past `HEAP_LIMIT`, which aborts the run. An input that makes a parser allocate
//! without bound therefore fails the test instead of passing quietly, and each target reports
//! the largest live heap it saw.
//!
//! `RINGFENCE_FUZZ_CASES` sets the number of inputs per target (CI runs the default; the
//! numbers recorded in docs/SECURITY.md came from a run with 1,000,000), and
//! `RINGFENCE_FUZZ_SEED` replays a run (each run prints its seed).

use std::alloc::System;
use std::fmt::Debug;

use cap::Cap;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Every allocation of the test process goes through here.
#[global_allocator]
pub static HEAP: Cap<System> = Cap::new(System, usize::MAX);

/// Most live heap the whole test process may hold. Targets run on parallel test threads, so
/// this is a bound on all of them together: far above what any parser needs for the inputs
/// given here (a few KiB to a few MiB each), far below what an unbounded one would take.
pub const HEAP_LIMIT: usize = 1 << 30;

/// Default inputs per target in a plain `cargo test` run.
const DEFAULT_CASES: u32 = 20_000;

/// Inputs per target: `RINGFENCE_FUZZ_CASES`, or the default.
pub fn cases() -> u32 {
    std::env::var("RINGFENCE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES)
}

fn seed(name: &str) -> [u8; 32] {
    let base: u64 = match std::env::var("RINGFENCE_FUZZ_SEED").ok().and_then(|v| v.parse().ok()) {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    let mut out = [0u8; 32];
    out[..8].copy_from_slice(&base.to_le_bytes());
    // Distinct streams per target from one seed, so a seed replays any of them (FNV-1a).
    let n = name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    out[8..16].copy_from_slice(&n.to_le_bytes());
    out
}

/// Random bytes up to `max_len`, and mutations of `seeds` (most of the inputs, since random
/// bytes rarely get past a parser's first check).
pub fn bytes(seeds: Vec<Vec<u8>>, max_len: usize) -> BoxedStrategy<Vec<u8>> {
    let random = proptest::collection::vec(any::<u8>(), 0..max_len);
    if seeds.is_empty() {
        return random.boxed();
    }
    let edits = proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..5), 0..8);
    let mutated = (proptest::sample::select(seeds), edits).prop_map(|(mut s, edits)| {
        for (at, byte, op) in edits {
            mutate(&mut s, at, byte, op);
        }
        s
    });
    prop_oneof![1 => random, 4 => mutated].boxed()
}

/// One edit of `s`: overwrite, insert, delete, duplicate a slice, or truncate.
fn mutate(s: &mut Vec<u8>, at: usize, byte: u8, op: u8) {
    let len = s.len();
    match op {
        0 if len > 0 => s[at % len] = byte,
        1 => s.insert(at % (len + 1), byte),
        2 if len > 0 => {
            s.remove(at % len);
        }
        3 if len > 0 => {
            let from = at % len;
            let to = (from + usize::from(byte) + 1).min(len);
            let chunk = s[from..to].to_vec();
            let into = (at / 7) % (s.len() + 1);
            s.splice(into..into, chunk);
        }
        4 => s.truncate(at % (len + 1)),
        _ => s.push(byte),
    }
}

/// Text inputs: the same, turned into strings lossily (most parsers of queries and headers
/// take `&str`).
pub fn text(seeds: &[&str], max_len: usize) -> BoxedStrategy<String> {
    let seeds = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    bytes(seeds, max_len).prop_map(|b| String::from_utf8_lossy(&b).into_owned()).boxed()
}

/// Runs `target` on `cases()` inputs from `strategy`. Panics (failing the test) with the
/// shrunk input when the target panics.
pub fn fuzz<S>(name: &str, strategy: S, target: impl Fn(S::Value))
where
    S: Strategy,
    S::Value: Debug,
{
    // Idempotent: the first target to start sets it; it only ever lowers an unlimited cap.
    let _ = HEAP.set_limit(HEAP_LIMIT);
    let cases = cases();
    let seed = seed(name);
    let mut config = Config::with_cases(cases);
    config.failure_persistence = None;
    config.max_shrink_iters = 2_000;
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |input| {
        target(input);
        Ok(())
    });
    let seed_hint = u64::from_le_bytes(seed[..8].try_into().unwrap_or([0; 8]));
    match result {
        Ok(()) => eprintln!(
            "fuzz {name}: {cases} inputs in {:.1} s, no panic; peak live heap of the process \
             {} KiB (seed {seed_hint})",
            started.elapsed().as_secs_f64(),
            HEAP.max_allocated() >> 10,
        ),
        Err(e) => panic!("fuzz {name} (RINGFENCE_FUZZ_SEED={seed_hint}): {e}"),
    }
}
