//! What every end-to-end test needs: the local control plane's kubeconfig, a kube client,
//! real kubectl, the CRDs installed once per run, and a namespace of its own.
//!
//! The control plane is started by `hack/with-control-plane.sh` (through `make test`), which
//! exports KUBECONFIG and puts its kubectl first on PATH.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::{DeleteParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// The workspace root (this crate is `crates/gpupool-e2e` in it): the tests read the chart,
/// the CRDs, the examples and the fixtures from there, and run kubectl and helm there.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the workspace root")
        .to_path_buf()
}

/// Where the tests keep logs, kubeconfigs and scratch files: `$GPUPOOL_STATE`, or `.state`
/// in the workspace root.
pub fn state_dir() -> PathBuf {
    std::env::var_os("GPUPOOL_STATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".state"))
}

/// The operator binary the tests run as users do: `$GPUPOOL_OPERATOR_BIN`, or `gpupool` in
/// the target directory this test binary was built in (`make e2e` builds it first with
/// `cargo build -p gpupool --bin gpupool`, in the same profile).
pub fn operator_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("GPUPOOL_OPERATOR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/gpupool
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("a target directory")
        .join("gpupool");
    assert!(
        path.exists(),
        "{} is missing: build the operator first (cargo build -p gpupool --bin gpupool, with \
         --release for the benchmarks), as `make e2e` and `make bench-cluster` do",
        path.display()
    );
    path
}

/// The reference worker binary (`gpupool-worker`), next to the operator's: `make e2e` builds
/// both (`cargo build -p gpupool --bin gpupool -p gpupool-worker`).
pub fn worker_binary() -> PathBuf {
    let path = operator_binary().with_file_name("gpupool-worker");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p gpupool-worker), as `make e2e` does",
        path.display()
    );
    path
}

fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "KUBECONFIG is not set: the e2e tests need the local control plane; run them with \
             `make test` (or hack/with-control-plane.sh cargo test --features e2e)"
        ),
    }
}

/// A client for the local control plane, as the operator would build one from a kubeconfig.
pub async fn client() -> Client {
    client_from(&kubeconfig_path()).await
}

/// A client for the control plane of the kubeconfig at `path`.
pub async fn client_from(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("kubeconfig readable");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(config).expect("client")
}

/// Runs real kubectl against the local control plane.
pub fn kubectl(args: &[&str]) -> Output {
    kubectl_with(&kubeconfig_path(), args)
}

/// Runs real kubectl against the control plane of the kubeconfig at `kubeconfig`.
pub fn kubectl_with(kubeconfig: &Path, args: &[&str]) -> Output {
    let bin = std::env::var("GPUPOOL_BIN")
        .map(|b| Path::new(&b).join("kubectl"))
        .unwrap_or_else(|_| PathBuf::from("kubectl"));
    Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("kubectl runs")
}

/// Runs kubectl and returns stdout, failing the test with stderr when it fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh directory under the state directory (`.state`), for files a test hands to a tool.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = state_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tool that `hack/testbins.sh --test-tools` (`make testtools`, part of `make test`) builds
/// and links into the control plane's bin directory: promtool, actionlint, argocd-health, crds.
pub fn test_tool(name: &str) -> PathBuf {
    let dir =
        std::env::var("GPUPOOL_BIN").expect("GPUPOOL_BIN is set by hack/with-control-plane.sh");
    let path = Path::new(&dir).join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make testtools` (hack/testbins.sh --test-tools), which `make test` does",
        path.display()
    );
    path
}

static THIRD_PARTY_CRDS: Once = Once::new();

/// Installs the real Argo CD, Flux and Prometheus Operator CRDs that `make testtools` took from
/// their Go modules (server-side apply: some are too large for the client-side annotation),
/// once per test binary, and waits until they are Established.
pub fn install_third_party_crds() {
    THIRD_PARTY_CRDS.call_once(|| {
        // kubectl reads a symlink as a file, so give it the directory itself.
        let dir = std::fs::canonicalize(test_tool("crds")).unwrap();
        let dir = dir.to_str().unwrap();
        kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=gpupool-e2e",
            "-f",
            dir,
        ]);
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/applications.argoproj.io",
            "crd/appprojects.argoproj.io",
            "crd/gitrepositories.source.toolkit.fluxcd.io",
            "crd/helmreleases.helm.toolkit.fluxcd.io",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ]);
    });
}

static CRDS: Once = Once::new();

/// Installs the committed CRDs (server-side apply, as `helm`/GitOps would) and waits until
/// they are Established. Runs once per test binary.
pub fn install_crds() {
    CRDS.call_once(|| {
        kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=gpupool-e2e",
            "-f",
            "crds/",
        ]);
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/gpupools.gpupool.dev",
            "crd/gpuinstances.gpupool.dev",
            "crd/videojobs.gpupool.dev",
        ]);
    });
}

/// A namespace owned by one test; deleted when the test calls `cleanup`.
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl TestNamespace {
    pub async fn new(prefix: &str) -> Self {
        install_crds();
        let client = client().await;
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        Self { name, client }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Deletes the namespace. Without kube-controller-manager it stays Terminating, which
    /// is harmless on a throw-away control plane; names never repeat within a run.
    pub async fn cleanup(self) {
        let _ = Api::<Namespace>::all(self.client)
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}
