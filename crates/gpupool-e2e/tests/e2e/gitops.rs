//! The GitOps pieces checked by the tools users' clusters run: the Argo CD health checks in
//! Argo CD's Lua sandbox (gopher-lua, not a system Lua), the Argo CD `Application` and the Flux
//! `GitRepository` and `HelmRelease` accepted by the real CRDs of those projects, and the
//! GitHub Actions workflows by actionlint. Every tool comes from `make testtools`.

use std::process::Output;

use serde_json::{Value, json};

use crate::{
    chart::{dry_run, dry_run_output, ok, run},
    support::{install_third_party_crds, kubectl, repo_root, scratch_dir, test_tool},
};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn argocd_health_checks_give_the_documented_status_in_argo_cds_sandbox() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/argocd-health/cases.json"))
            .unwrap(),
    )
    .unwrap();
    for kind in ["VideoJob", "GpuInstance", "GpuPool"] {
        for status in ["Healthy", "Progressing", "Degraded"] {
            assert!(
                cases
                    .iter()
                    .any(|c| c["object"]["kind"] == kind && c["status"] == status),
                "no case where a {kind} is {status}"
            );
        }
    }
    // Every case, with the argocd-cm ConfigMap's script for its kind and with the .lua file.
    let out = run(repo_root().join("hack/test-argocd-health.sh"), &[], None);
    let text = ok("hack/test-argocd-health.sh", out);
    eprintln!("{text}");
    assert!(
        text.contains(&format!(
            "{} cases, {} checks, 0 failures",
            cases.len(),
            2 * cases.len()
        )),
        "{text}"
    );

    // The sandbox is Argo CD's, not a full Lua: no string library, a status Argo CD does not
    // know becomes Unknown, and a script that never ends is stopped.
    let dir = scratch_dir("gitops-sandbox");
    let object = dir.join("object.json");
    std::fs::write(&object, json!({"status": {"phase": "Ready"}}).to_string()).unwrap();
    let eval = |script: &str| {
        let path = dir.join("check.lua");
        std::fs::write(&path, script).unwrap();
        run(
            test_tool("argocd-health"),
            &[
                "-script",
                path.to_str().unwrap(),
                "-object",
                object.to_str().unwrap(),
            ],
            None,
        )
    };
    let out = eval("local hs = {}\nhs.status = string.lower(\"HEALTHY\")\nreturn hs\n");
    assert!(
        !out.status.success() && stderr(&out).contains("non-table object(nil) with key 'lower'"),
        "string library offered: {}",
        stderr(&out)
    );
    let out = eval(
        "local hs = {}\nfor _, c in ipairs({1, 2}) do table.insert(hs, c) end\n\
         hs = {status = obj.status.phase, message = os.date(\"!%Y\", 0)}\nreturn hs\n",
    );
    assert_eq!(
        ok("argocd-health -script", out).trim(),
        r#"{"status":"Unknown","message":"Lua returned an invalid health status"}"#
    );
    let out = eval("while true do end\n");
    assert!(
        !out.status.success() && stderr(&out).contains("context deadline exceeded"),
        "{}",
        stderr(&out)
    );
    let out = eval("return {status = \"Healthy\", message = \"fine\"}\n");
    assert_eq!(
        ok("argocd-health -script", out).trim(),
        r#"{"status":"Healthy","message":"fine"}"#
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The namespaces the GitOps manifests live in, so a dry run can place them.
fn gitops_namespaces() {
    for ns in ["argocd", "flux-system"] {
        let out = kubectl(&["create", "namespace", ns]);
        assert!(
            out.status.success() || stderr(&out).contains("AlreadyExists"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn gitops_manifests_are_accepted_by_the_real_argo_cd_and_flux_crds() {
    install_third_party_crds();
    gitops_namespaces();
    let read =
        |f: &str| std::fs::read_to_string(repo_root().join("deploy/gitops").join(f)).unwrap();
    for file in [
        "argocd-application.yaml",
        "argocd-cm-patch.yaml",
        "flux-helmrelease.yaml",
    ] {
        dry_run(&read(file));
    }

    // The same CRDs refuse what a typo or an old apiVersion would ship, naming the field.
    let cases = [
        (
            "flux-helmrelease.yaml",
            "kind: GitRepository\n        name",
            "kind: GitRepo\n        name",
            "spec.chart.spec.sourceRef.kind",
        ),
        (
            "flux-helmrelease.yaml",
            "    createNamespace: true",
            "    createNamespaces: true",
            "createNamespaces",
        ),
        (
            "flux-helmrelease.yaml",
            "    crds: CreateReplace\n  upgrade",
            "    crds: Replace\n  upgrade",
            "spec.install.crds",
        ),
        (
            "flux-helmrelease.yaml",
            "helm.toolkit.fluxcd.io/v2\n",
            "helm.toolkit.fluxcd.io/v2beta9\n",
            "v2beta9",
        ),
        (
            "argocd-application.yaml",
            "  syncPolicy:\n    automated:",
            "  syncPolicy:\n    automatic:",
            "automatic",
        ),
        (
            "argocd-application.yaml",
            "    targetRevision: v0.1.0",
            "    targetRevision: [v0.1.0]",
            "spec.source.targetRevision",
        ),
    ];
    for (file, from, to, named) in cases {
        let manifest = read(file);
        assert!(manifest.contains(from), "{from:?} not in {file}");
        let out = dry_run_output(&manifest.replacen(from, to, 1));
        assert!(
            !out.status.success() && stderr(&out).contains(named),
            "{file} with {to:?} accepted or refused without naming {named}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn github_workflows_pass_actionlint() {
    let root = repo_root();
    let workflows: Vec<_> = std::fs::read_dir(root.join(".github/workflows"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        workflows.iter().any(|p| p.ends_with("ci.yml"))
            && workflows.iter().any(|p| p.ends_with("release.yml")),
        "{workflows:?}"
    );
    let out = run(test_tool("actionlint"), &["-no-color"], None);
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );

    // And it does check: a workflow with a misspelt key and an unknown context is refused.
    let dir = scratch_dir("gitops-actionlint");
    let bad = dir.join("bad.yml");
    std::fs::write(
        &bad,
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-24.04\n    step:\n      - run: echo ${{ gihub.sha }}\n",
    )
    .unwrap();
    let out = run(
        test_tool("actionlint"),
        &["-no-color", bad.to_str().unwrap()],
        None,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("\"step\""), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
