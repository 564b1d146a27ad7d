//! Times the export interface on a data directory: `export_timing DATA_DIR TEMPLATE [DIR]`
//! exports TEMPLATE as a disk image (cold, then cached) and, with DIR, times the content
//! digest of a saved-layer-like directory. The numbers in docs/PERFORMANCE.md come from it.

use std::time::Instant;

use ringfence_image::{DiskFs, Store, TemplateForm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(data), Some(name)) = (args.get(1), args.get(2)) else {
        return Err("usage: export_timing DATA_DIR TEMPLATE [DIR]".into());
    };
    let store = Store::open(std::path::Path::new(data))?;
    let form = TemplateForm::DiskImage { fs: DiskFs::Ext4 };
    for what in ["cold", "cached"] {
        let t = Instant::now();
        let e = store.export(name, form)?;
        println!("disk image ({what}): {:.2}s {:?}", t.elapsed().as_secs_f64(), e.artifact);
    }
    println!("exports on disk: {} MiB allocated", store.exports_bytes() >> 20);
    if let Some(dir) = args.get(3) {
        let t = Instant::now();
        let d = ringfence_image::shared::tree_digest(std::path::Path::new(dir))?;
        println!("tree digest of {dir}: {:.2}s {d}", t.elapsed().as_secs_f64());
    }
    Ok(())
}
