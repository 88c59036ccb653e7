//! Bad manifests are refused by the API server with a message naming the field; good ones,
//! including every bound at its edge, are accepted.
//!
//! Each file in tests/fixtures/invalid/ starts with `# expect: <text>` lines: applying the
//! file with kubectl must fail and print each text. A file with two documents creates the
//! object with the first and tries a forbidden change with the second.

use std::fs;

use crate::support::{TestNamespace, kubectl, kubectl_ok, repo_root};

fn fixtures(dir: &str) -> Vec<(String, String)> {
    let mut files: Vec<_> = fs::read_dir(repo_root().join("tests/fixtures").join(dir))
        .expect("fixture dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            (
                p.strip_prefix(repo_root()).unwrap().display().to_string(),
                text,
            )
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() {
    let ns = TestNamespace::new("invalid").await;
    let cases = fixtures("invalid");
    assert!(cases.len() >= 15, "only {} invalid fixtures", cases.len());
    let mut failures = Vec::new();
    for (path, text) in &cases {
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .collect();
        assert!(!expected.is_empty(), "{path} has no `# expect:` line");
        let out = kubectl(&["apply", "-n", &ns.name, "-f", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{path}: accepted, expected refusal"));
            continue;
        }
        for want in &expected {
            if !stderr.contains(want) {
                failures.push(format!(
                    "{path}: error lacks {want:?}; got: {}",
                    stderr.trim()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} invalid manifests refused with the field named",
        cases.len()
    );
    ns.cleanup().await;
}

#[tokio::test]
async fn valid_manifests_at_the_edges_are_accepted_and_resync_without_churn() {
    let ns = TestNamespace::new("valid").await;
    let cases = fixtures("valid");
    assert!(cases.len() >= 5);
    for (path, _) in &cases {
        kubectl_ok(&["apply", "-n", &ns.name, "-f", path]);
        let version = || {
            kubectl_ok(&[
                "get",
                "-n",
                &ns.name,
                "-f",
                path,
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ])
        };
        // A GitOps re-sync, client-side or server-side, must not change the stored object.
        let before = version();
        kubectl_ok(&["apply", "-n", &ns.name, "-f", path]);
        assert_eq!(
            version(),
            before,
            "{path}: client-side re-apply changed the object"
        );
        let ssa = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "-n",
            &ns.name,
            "-f",
            path,
        ];
        kubectl_ok(&ssa); // takes over field ownership once, which is a write
        let before = version();
        kubectl_ok(&ssa);
        assert_eq!(
            version(),
            before,
            "{path}: server-side re-apply changed the object"
        );
    }
    ns.cleanup().await;
}
