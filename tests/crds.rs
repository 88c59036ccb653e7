//! Plain `cargo test` (no cluster): the committed CRD YAML is exactly what the types
//! generate, and every example manifest parses into the Rust types.

use std::{fs, path::PathBuf};

use serde::Deserialize;

use gpupool::crd::{GpuInstance, GpuPool, ProviderKind, VideoJob, crd_files};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crds_match_the_types() {
    let files = crd_files().expect("CRDs render");
    assert_eq!(files.len(), 3);
    for dir in ["crds", "charts/gpupool/crds"] {
        for (name, yaml) in &files {
            let path = root().join(dir).join(name);
            let committed = fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!("{}: {e}; run `cargo run --bin crdgen`", path.display())
            });
            assert!(
                committed == *yaml,
                "{} differs from the generated CRD; run `cargo run --bin crdgen` and commit",
                path.display()
            );
        }
    }
}

fn documents(file: &str) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(root().join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .collect()
}

#[test]
fn examples_parse_into_the_types() {
    let pools: Vec<GpuPool> = documents("deploy/examples/10-gpupool-hybrid.yaml")
        .into_iter()
        .map(|d| serde_json::from_value(d).unwrap())
        .collect();
    let kinds: Vec<_> = pools[0].spec.providers.iter().map(|p| p.kind()).collect();
    assert_eq!(
        kinds,
        [
            Some(ProviderKind::RunpodServerless),
            Some(ProviderKind::Runpod),
            Some(ProviderKind::Vast)
        ]
    );
    assert_eq!(pools[0].spec.idle_timeout_seconds, 300);

    let gi: GpuInstance =
        serde_json::from_value(documents("deploy/examples/20-gpuinstance-prewarm.yaml").remove(0))
            .unwrap();
    assert_eq!(
        (gi.spec.pool.as_str(), gi.spec.provider.as_str()),
        ("default", "vast")
    );

    let jobs: Vec<VideoJob> = documents("deploy/examples/30-videojobs.yaml")
        .into_iter()
        .map(|d| serde_json::from_value(d).unwrap())
        .collect();
    assert_eq!(jobs.len(), 3);
    // Omitted fields take the same defaults the CRD schema gives.
    assert_eq!(jobs[1].spec.pool, "default");
    assert_eq!(jobs[1].spec.timeout_seconds, 600);
    assert_eq!(jobs[2].spec.provider.as_deref(), Some("vast"));
}
