//! Writes the generated CustomResourceDefinitions to `crds/` and to the chart's copy in
//! `charts/gpupool/crds/`. With `--check`, writes nothing and exits 1 when a committed
//! copy differs from what the types generate.

use std::{fs, path::PathBuf, process::ExitCode};

const TARGETS: [&str; 2] = ["crds", "charts/gpupool/crds"];

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let files = match gpupool::crd::crd_files() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = Vec::new();
    for dir in TARGETS {
        let dir = root.join(dir);
        for (name, yaml) in &files {
            let path = dir.join(name);
            if check {
                if fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                    stale.push(path.display().to_string());
                }
                continue;
            }
            if let Err(e) = fs::create_dir_all(&dir).and_then(|_| fs::write(&path, yaml)) {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    if stale.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "crdgen: out of date, run `cargo run --bin crdgen`: {}",
            stale.join(", ")
        );
        ExitCode::FAILURE
    }
}
