//! The `ringfence-agent` executable: PID 1 inside every sandbox. All logic lives in the
//! `ringfence-agent` crate.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    ringfence_agent::main()
}
