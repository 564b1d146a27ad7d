//! What the analysis adds to a cell or command: median time per call on typical submissions.
//!
//!     cargo run --release -p ringfence-risk --example cost

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use ringfence_risk::{Language, analyze};

const CELL: &str = r#"import pandas as pd
import numpy as np
import matplotlib.pyplot as plt

df = pd.read_csv('/home/user/data.csv')
df['total'] = df['price'] * df['quantity']
summary = df.groupby('region').agg({'total': ['sum', 'mean'], 'quantity': 'count'})
print(summary.head(10))

fig, ax = plt.subplots(figsize=(8, 4))
for region, group in df.groupby('region'):
    ax.plot(group['date'], group['total'].cumsum(), label=region)
ax.set_title('Cumulative sales by region')
ax.legend()
plt.show()
summary
"#;

fn median_us(lang: Language, code: &str) -> f64 {
    let mut times = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = Instant::now();
        std::hint::black_box(analyze(lang, std::hint::black_box(code)));
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let script = CELL.repeat(12);
    let cases = [
        ("python cell (16 lines)", Language::Python, CELL.to_string()),
        ("python script (192 lines)", Language::Python, script),
        (
            "shell command",
            Language::Shell,
            "pip install -q pandas && python3 run.py | tee out.log".into(),
        ),
        (
            "javascript cell",
            Language::JavaScript,
            "const xs = [1, 2, 3].map(x => x * 2);\nconsole.log(xs.reduce((a, b) => a + b, 0));"
                .into(),
        ),
    ];
    if std::env::var_os("PARSE_ONLY").is_some() {
        let mut p = tree_sitter::Parser::new();
        p.set_language(&tree_sitter_python::LANGUAGE.into()).unwrap();
        for code in [CELL.to_string(), CELL.repeat(12)] {
            let t = Instant::now();
            for _ in 0..200 {
                std::hint::black_box(p.parse(code.as_bytes(), None));
            }
            println!(
                "parse only {} bytes: {:.1} µs",
                code.len(),
                t.elapsed().as_secs_f64() * 1e6 / 200.0
            );
        }
    }
    for (name, lang, code) in cases {
        println!("{name:<28} {:>8.1} µs (median of 2000)", median_us(lang, &code));
    }
}
