//! The Helm chart against the real API server: it lints, every rendering the values allow is
//! accepted by a server-side dry run, it installs (no `--wait`: no Pod ever runs here), the
//! committed rendered manifests match it, and its RBAC is proven both ways with a token of its
//! own ServiceAccount: the operator binary runs a whole job life cycle with nothing else, and
//! every request outside its rules is refused. The gateway's ServiceAccount gets the same
//! treatment: exactly its verbs in its namespace, nothing else.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};

use gpupool::crd::{InstancePhase, JobPhase};

use crate::{
    operator::*,
    support::{TestNamespace, install_third_party_crds, kubectl, kubectl_ok, repo_root},
};

const CHART: &str = "charts/gpupool";

pub(crate) fn bin(name: &str) -> PathBuf {
    std::env::var("GPUPOOL_BIN")
        .map(|b| Path::new(&b).join(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

/// Runs `program` in the repository root, feeding it `stdin` if given.
pub(crate) fn run(program: PathBuf, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(&program);
    cmd.args(args).current_dir(repo_root());
    let Some(input) = stdin else {
        return cmd.output().expect("command runs");
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command runs");
    // Written from a thread, so a child that answers before reading everything cannot block us.
    let mut pipe = child.stdin.take().unwrap();
    let input = input.to_owned();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().expect("stdin written");
    out
}

pub(crate) fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Real helm, with the control plane's KUBECONFIG from the environment.
pub(crate) fn helm(args: &[&str]) -> Output {
    run(bin("helm"), args, None)
}

pub(crate) fn helm_ok(args: &[&str]) -> String {
    ok(&format!("helm {}", args.join(" ")), helm(args))
}

/// The server's version, so `helm template` checks the chart's kubeVersion against it.
pub(crate) fn server_version() -> String {
    let v: Value = serde_json::from_str(&kubectl_ok(&["version", "-o", "json"])).unwrap();
    v["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `helm template` of the chart as release `release` in `ns` with `--set` values.
pub(crate) fn render(release: &str, ns: &str, sets: &[&str]) -> Output {
    let kv = server_version();
    let mut args = vec![
        "template",
        release,
        CHART,
        "--namespace",
        ns,
        "--kube-version",
        &kv,
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args)
}

/// The kinds and names of the documents of a multi-document YAML stream.
pub(crate) fn objects(yaml: &str) -> Vec<(String, String, String)> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(d).ok()?).ok()?;
            let kind = v["kind"].as_str()?.to_string();
            let name = v["metadata"]["name"].as_str()?.to_string();
            let ns = v["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Some((kind, ns, name))
        })
        .collect()
}

pub(crate) fn has(objs: &[(String, String, String)], kind: &str, ns: &str, name: &str) -> bool {
    objs.iter()
        .any(|(k, n, m)| k == kind && n == ns && m == name)
}

/// The document of kind `kind` named `name` in a multi-document YAML stream.
pub(crate) fn document(yaml: &str, kind: &str, name: &str) -> Value {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).ok()?).ok())
        .find(|v| v["kind"] == kind && v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendering"))
}

/// A server-side dry run of `yaml`: the API server validates (strictly: unknown fields are
/// errors) and admits every object, or says why not.
pub(crate) fn dry_run_output(yaml: &str) -> Output {
    run(
        bin("kubectl"),
        &[
            "--kubeconfig",
            &std::env::var("KUBECONFIG").unwrap(),
            "apply",
            "--server-side",
            "--field-manager=gpupool-chart-e2e",
            "--dry-run=server",
            "-f",
            "-",
        ],
        Some(yaml),
    )
}

/// A server-side dry run that must succeed.
pub(crate) fn dry_run(yaml: &str) {
    ok("kubectl apply --dry-run=server", dry_run_output(yaml));
}

#[tokio::test]
async fn chart_lints_and_every_rendering_is_accepted_by_the_api_server() {
    install_third_party_crds();
    let ns = TestNamespace::new("chart-render").await;
    let watched = TestNamespace::new("chart-render-w").await;
    helm_ok(&["lint", "--strict", CHART]);
    let release = format!("r{}", ns.name);

    // Default values: every namespace, so the watched rules are a ClusterRole.
    let yaml = ok("helm template", render(&release, &ns.name, &[]));
    let objs = objects(&yaml);
    let full = format!("{release}-gpupool");
    for (kind, n, name) in [
        ("ServiceAccount", ns.name.as_str(), full.as_str()),
        ("Deployment", &ns.name, &full),
        ("Service", &ns.name, &full),
        ("ClusterRole", "", &full),
        ("ClusterRoleBinding", "", &full),
        ("ClusterRole", "", &format!("{full}-cluster-id")),
        ("Role", &ns.name, &format!("{full}-leader-election")),
        ("RoleBinding", &ns.name, &format!("{full}-leader-election")),
    ] {
        assert!(has(&objs, kind, n, name), "{kind} {n}/{name} in {objs:?}");
    }
    assert!(
        !objs.iter().any(|(k, _, n)| k == "ServiceMonitor"
            || k == "NetworkPolicy"
            || k == "PrometheusRule"
            || n.ends_with("-dashboard")),
        "monitoring and the NetworkPolicy are off by default: {objs:?}"
    );
    assert!(
        !objs.iter().any(|(_, _, n)| n.ends_with("-gateway")),
        "the gateway is off by default: {objs:?}"
    );
    dry_run(&yaml);

    // One watched namespace, the ServiceMonitor and the NetworkPolicy.
    let watch = format!("watchNamespaces={{{}}}", watched.name);
    let yaml = ok(
        "helm template",
        render(
            &release,
            &ns.name,
            &[
                &watch,
                "serviceMonitor.enabled=true",
                "prometheusRule.enabled=true",
                "grafanaDashboard.enabled=true",
                "networkPolicy.enabled=true",
            ],
        ),
    );
    let objs = objects(&yaml);
    assert!(has(&objs, "Role", &watched.name, &full), "{objs:?}");
    assert!(has(&objs, "RoleBinding", &watched.name, &full), "{objs:?}");
    assert!(
        !has(&objs, "ClusterRole", "", &full),
        "no cluster-wide rules: {objs:?}"
    );
    assert!(has(&objs, "ServiceMonitor", &ns.name, &full), "{objs:?}");
    assert!(has(&objs, "NetworkPolicy", &ns.name, &full), "{objs:?}");
    assert!(has(&objs, "PrometheusRule", &ns.name, &full), "{objs:?}");
    assert!(
        has(&objs, "ConfigMap", &ns.name, &format!("{full}-dashboard")),
        "{objs:?}"
    );
    assert!(yaml.contains(&format!(
        "name: GPUPOOL_NAMESPACE\n              value: \"{}\"",
        watched.name
    )));
    dry_run(&yaml);

    // A cluster id and a single replica without leader election: neither the Namespace rule
    // nor the Lease rules are rendered.
    let yaml = ok(
        "helm template",
        render(
            &release,
            &ns.name,
            &[
                &watch,
                "clusterId=prod-1",
                "leaderElection.enabled=false",
                "replicas=1",
            ],
        ),
    );
    let objs = objects(&yaml);
    assert!(
        !objs.iter().any(|(k, _, n)| n.ends_with("-cluster-id")
            || (k == "Role" && n.ends_with("-leader-election"))),
        "{objs:?}"
    );
    assert!(yaml.contains("name: GPUPOOL_CLUSTER_ID\n              value: \"prod-1\""));
    dry_run(&yaml);

    // The gateway with default values: its Role and its jobs in the release namespace (every
    // namespace is watched), and Pods the operator's selectors never pick.
    let gw = format!("{full}-gateway");
    let yaml = ok(
        "helm template",
        render(&release, &ns.name, &["gateway.enabled=true"]),
    );
    let objs = objects(&yaml);
    for (kind, n) in [
        ("Deployment", ns.name.as_str()),
        ("Service", &ns.name),
        ("ServiceAccount", &ns.name),
        ("PodDisruptionBudget", &ns.name),
        ("Role", &ns.name),
        ("RoleBinding", &ns.name),
    ] {
        assert!(has(&objs, kind, n, &gw), "{kind} {n}/{gw} in {objs:?}");
    }
    assert!(
        !objs.iter().any(|(k, _, n)| n == &gw
            && (k == "Ingress" || k == "NetworkPolicy" || k.starts_with("Cluster"))),
        "no Ingress, NetworkPolicy or cluster-wide rules for the gateway: {objs:?}"
    );
    let deployment = document(&yaml, "Deployment", &gw);
    let operator = document(&yaml, "Deployment", &full);
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let selector = operator["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(
        selector.iter().any(|(k, v)| &pod_labels[k] != v),
        "the operator's selector {selector:?} picks the gateway's Pods {pod_labels}"
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["gateway"]));
    assert_eq!(
        container["image"],
        operator["spec"]["template"]["spec"]["containers"][0]["image"]
    );
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {container}"))["value"]
            .clone()
    };
    assert_eq!(env("GPUPOOL_GATEWAY_NAMESPACE"), ns.name.as_str());
    assert_eq!(env("GPUPOOL_GATEWAY_HTTP_ADDR"), "0.0.0.0:8090");
    assert_eq!(env("GPUPOOL_GATEWAY_KEYS_SECRET"), "gpupool-gateway-keys");
    assert_eq!(env("GPUPOOL_GATEWAY_INSECURE_NO_AUTH"), "false");
    assert_eq!(env("GPUPOOL_GATEWAY_MAX_BODY_BYTES"), "1048576");
    assert_eq!(env("GPUPOOL_GATEWAY_JOB_TTL_SECONDS"), "86400");
    let role = document(&yaml, "Role", &gw);
    assert_eq!(
        role["rules"][2]["resourceNames"],
        json!(["gpupool-gateway-keys"]),
        "{role}"
    );
    dry_run(&yaml);

    // The gateway with one watched namespace (its Role and jobs go there), an Ingress with a
    // host and TLS, the NetworkPolicies and the ServiceMonitors.
    let yaml = ok(
        "helm template",
        render(
            &release,
            &ns.name,
            &[
                &watch,
                "gateway.enabled=true",
                "gateway.ingress.enabled=true",
                "gateway.ingress.className=nginx",
                "gateway.ingress.host=gpupool.example.com",
                "gateway.ingress.tls[0].secretName=gateway-tls",
                "gateway.ingress.tls[0].hosts[0]=gpupool.example.com",
                "gateway.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-body-size=1m",
                "networkPolicy.enabled=true",
                "serviceMonitor.enabled=true",
            ],
        ),
    );
    let objs = objects(&yaml);
    assert!(has(&objs, "Role", &watched.name, &gw), "{objs:?}");
    assert!(has(&objs, "RoleBinding", &watched.name, &gw), "{objs:?}");
    for kind in ["Ingress", "NetworkPolicy", "ServiceMonitor", "Deployment"] {
        assert!(has(&objs, kind, &ns.name, &gw), "{kind} in {objs:?}");
    }
    assert!(yaml.contains(&format!(
        "name: GPUPOOL_GATEWAY_NAMESPACE\n              value: \"{}\"",
        watched.name
    )));
    let ingress = document(&yaml, "Ingress", &gw);
    assert_eq!(ingress["spec"]["rules"][0]["host"], "gpupool.example.com");
    assert_eq!(
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"],
        json!({"name": gw, "port": {"name": "http"}})
    );
    // The port is open to everyone by default; the operator's policy never selects the gateway.
    let policy = document(&yaml, "NetworkPolicy", &gw);
    assert_eq!(
        policy["spec"]["ingress"],
        json!([{"ports": [{"port": 8090, "protocol": "TCP"}]}])
    );
    dry_run(&yaml);

    // An Ingress for every host, a narrowed NetworkPolicy, an existing ServiceAccount, no PDB,
    // and a namespace named explicitly while every namespace is watched.
    let yaml = ok(
        "helm template",
        render(
            &release,
            &ns.name,
            &[
                "gateway.enabled=true",
                &format!("gateway.namespace={}", watched.name),
                "gateway.ingress.enabled=true",
                "networkPolicy.enabled=true",
                "gateway.networkPolicy.ingressFrom[0].namespaceSelector.matchLabels.team=web",
                "gateway.networkPolicy.callbackCIDRs={203.0.113.0/24}",
                "gateway.serviceAccount.create=false",
                "gateway.serviceAccount.name=existing-sa",
                "gateway.podDisruptionBudget.enabled=false",
                "gateway.insecureNoAuth=true",
            ],
        ),
    );
    let objs = objects(&yaml);
    assert!(has(&objs, "Role", &watched.name, &gw), "{objs:?}");
    assert!(
        !objs
            .iter()
            .any(|(k, _, n)| n == &gw && (k == "ServiceAccount" || k == "PodDisruptionBudget")),
        "{objs:?}"
    );
    let ingress = document(&yaml, "Ingress", &gw);
    assert!(
        ingress["spec"]["rules"][0].get("host").is_none(),
        "{ingress}"
    );
    let binding = document(&yaml, "RoleBinding", &gw);
    assert_eq!(binding["subjects"][0]["name"], "existing-sa");
    assert_eq!(
        document(&yaml, "Deployment", &gw)["spec"]["template"]["spec"]["serviceAccountName"],
        "existing-sa"
    );
    dry_run(&yaml);

    // Values the operator cannot honour are refused at render time, with the reason.
    let out = render(
        &release,
        &ns.name,
        &[
            &watch,
            "gateway.enabled=true",
            "gateway.namespace=elsewhere",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not watched by the operator"),
        "{err}"
    );
    let out = render(&release, &ns.name, &["watchNamespaces={a,b}"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("one release per namespace"),
        "{err}"
    );
    let out = render(&release, &ns.name, &["leaderElection.enabled=false"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("leaderElection.enabled=true"),
        "{err}"
    );

    watched.cleanup().await;
    ns.cleanup().await;
}

#[tokio::test]
async fn helm_install_creates_the_operator_objects_and_uninstall_removes_them() {
    let ns = TestNamespace::new("chart-install").await;
    let release = format!("r{}", ns.name);
    let full = format!("{release}-gpupool");
    // No --wait: without a scheduler and kubelet the Pods never run.
    let notes = helm_ok(&["install", &release, CHART, "--namespace", &ns.name]);
    assert!(notes.contains("STATUS: deployed"), "{notes}");
    assert!(
        notes.contains("kubectl apply --server-side -f charts/gpupool/crds/"),
        "{notes}"
    );
    assert!(
        notes.contains("--for=jsonpath='{.status.phase}'=Succeeded vj/NAME"),
        "{notes}"
    );

    for obj in [
        format!("deployment/{full}"),
        format!("serviceaccount/{full}"),
        format!("service/{full}"),
        format!("role.rbac.authorization.k8s.io/{full}-leader-election"),
        format!("rolebinding.rbac.authorization.k8s.io/{full}-leader-election"),
    ] {
        kubectl_ok(&["get", "-n", &ns.name, &obj]);
    }
    for obj in [
        format!("clusterrole/{full}"),
        format!("clusterrolebinding/{full}"),
        format!("clusterrole/{full}-cluster-id"),
        format!("clusterrolebinding/{full}-cluster-id"),
    ] {
        kubectl_ok(&["get", &obj]);
    }

    // The Pod template as stored by the server: hardened, probed, configured by env.
    let d: Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "-n",
        &ns.name,
        &format!("deployment/{full}"),
        "-o",
        "json",
    ]))
    .unwrap();
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(pod["serviceAccountName"], full.as_str());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env: Vec<(String, Value)> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    let get = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(
        get("POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        get("POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(get("GPUPOOL_LEADER_ELECT").unwrap()["value"], "true");
    assert_eq!(
        get("GPUPOOL_LEASE_NAME").unwrap()["value"],
        format!("{full}-leader")
    );
    assert_eq!(
        get("GPUPOOL_LEADER_ELECTION_NAMESPACE").unwrap()["value"],
        ns.name.as_str()
    );
    assert_eq!(
        get("GPUPOOL_VAST_URL").unwrap()["value"],
        "https://console.vast.ai"
    );
    assert_eq!(get("GPUPOOL_LOG_FORMAT").unwrap()["value"], "json");
    assert!(
        get("GPUPOOL_NAMESPACE").is_none(),
        "all namespaces by default"
    );

    // Uninstall (no --wait) removes the cluster-wide objects too.
    helm_ok(&["uninstall", &release, "--namespace", &ns.name]);
    let out = kubectl(&["get", &format!("clusterrole/{full}")]);
    assert!(!out.status.success(), "ClusterRole left behind");
    ns.cleanup().await;
}

#[tokio::test]
async fn committed_rendered_manifests_match_the_chart_and_apply() {
    // deploy/manifests/*.yaml and deploy/gitops/argocd-cm-patch.yaml are up to date.
    ok(
        "hack/render-manifests.sh --check",
        run(
            repo_root().join("hack/render-manifests.sh"),
            &["--check"],
            None,
        ),
    );
    // The kustomization builds and the server accepts it (its namespace must exist to
    // dry-run the objects in it; nothing else uses that name in the tests).
    let built = kubectl_ok(&["kustomize", "deploy"]);
    let objs = objects(&built);
    assert!(
        has(&objs, "Deployment", "gpupool-system", "gpupool"),
        "{objs:?}"
    );
    assert!(
        has(
            &objs,
            "CustomResourceDefinition",
            "",
            "videojobs.gpupool.dev"
        ),
        "{objs:?}"
    );
    let out = kubectl(&["create", "namespace", "gpupool-system"]);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("AlreadyExists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dry_run(&built);
}

/// The full name of release `r<release_ns>` of the chart, which names the operator's objects.
pub(crate) fn release_full_name(release_ns: &str) -> String {
    format!("r{release_ns}-gpupool")
}

/// The name of the gateway's objects (its Deployment, Service and ServiceAccount) in release
/// `r<release_ns>`.
pub(crate) fn gateway_full_name(release_ns: &str) -> String {
    format!("{}-gateway", release_full_name(release_ns))
}

/// Installs the chart as release `r<ns>` in `release_ns`, watching only `watched`, and returns
/// the path of a kubeconfig that authenticates as its ServiceAccount (same server and CA).
fn install_and_token(release_ns: &str, watched: &str) -> (String, PathBuf) {
    let full = release_full_name(release_ns);
    let kubeconfig = install_and_token_for(
        release_ns,
        &[&format!("watchNamespaces={{{watched}}}")],
        &full,
    );
    (full, kubeconfig)
}

/// Installs the chart with the gateway on, as release `r<release_ns>` in `release_ns`, the
/// operator watching only `watched` (so the gateway's Role and jobs are there too), and returns
/// the path of a kubeconfig that authenticates as the gateway's ServiceAccount, to run
/// `gpupool gateway --namespace <watched>` with (its RBAC is all it gets). `sets` are more
/// `--set` values, e.g. `gateway.keysSecret=...`.
pub(crate) fn gateway_kubeconfig(release_ns: &str, watched: &str, sets: &[&str]) -> PathBuf {
    let watch = format!("watchNamespaces={{{watched}}}");
    let mut all = vec![watch.as_str(), "gateway.enabled=true"];
    all.extend_from_slice(sets);
    install_and_token_for(release_ns, &all, &gateway_full_name(release_ns))
}

/// Installs the chart as release `r<release_ns>` in `release_ns` with `sets` (`--set` values)
/// and returns the path of a kubeconfig that authenticates as the ServiceAccount
/// `service_account` of `release_ns` (same server and CA as the admin's), with a 1 h token.
pub(crate) fn install_and_token_for(
    release_ns: &str,
    sets: &[&str],
    service_account: &str,
) -> PathBuf {
    let release = format!("r{release_ns}");
    let mut args = vec!["install", &release, CHART, "--namespace", release_ns];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm_ok(&args);
    token_kubeconfig(release_ns, service_account)
}

/// A kubeconfig file for ServiceAccount `service_account` of namespace `ns`: a token from
/// `kubectl create token`, the admin kubeconfig's server and CA.
pub(crate) fn token_kubeconfig(ns: &str, service_account: &str) -> PathBuf {
    let token = kubectl_ok(&[
        "create",
        "token",
        service_account,
        "-n",
        ns,
        "--duration=1h",
    ]);
    let server = kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]);
    let ca = kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": service_account, "user": {"token": token.trim()}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account}}],
        "current-context": "sa",
    });
    let dir = crate::support::state_dir().join("chart-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{ns}-{service_account}.kubeconfig"));
    std::fs::write(&path, serde_json::to_string_pretty(&kubeconfig).unwrap()).unwrap();
    path
}

/// kubectl as the chart's ServiceAccount.
fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    all.extend_from_slice(args);
    run(bin("kubectl"), &all, None)
}

/// `kubectl auth can-i` as the ServiceAccount: true for yes, false for no.
fn can_i(kubeconfig: &Path, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let out = kubectl_as(kubeconfig, &all);
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match answer.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!(
            "kubectl auth can-i {}: {answer} {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test]
async fn the_chart_rbac_is_enough_for_a_whole_job_life_cycle() {
    let ns = namespace_with_secrets("chart-rbac").await;
    let release_ns = TestNamespace::new("chart-rbac-rel").await;
    let client = ns.client();
    let (_, kubeconfig) = install_and_token(&release_ns.name, &ns.name);
    let sim = sim().await;
    // The operator with only the ServiceAccount's token, and without --cluster-id so that it
    // reads the kube-system Namespace's UID as in a default install.
    let op = Operator::start_with_env(
        &ns.name,
        &sim,
        &["--cluster-id="],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    // The worker also gets a secret of its own from a Secret key (worker.env valueFrom),
    // read with the same rule as the API keys.
    create_secret(
        &client,
        &ns.name,
        "worker-s3",
        json!({"secretKey": "s3-rbac"}),
    )
    .await;
    let mut spec = vast_pool(4);
    spec["worker"]["env"] = json!([{"name": "S3_SECRET_KEY",
        "valueFrom": {"secretKeyRef": {"name": "worker-s3", "key": "secretKey"}}}]);
    create_pool(&client, &ns.name, "default", spec).await;
    create_job(
        &client,
        &ns.name,
        "cap-1",
        json!({"operation": "caption", "input": {"videoUrl": "https://x/1.mp4"}}),
    )
    .await;
    let job = finished_job(&client, &ns.name, "cap-1", Duration::from_secs(60), &op).await;
    let st = job.status.clone().unwrap();
    assert_eq!(st.phase, Some(JobPhase::Succeeded), "job: {st:?}");
    let instance = st.instance.clone().unwrap();

    // Torn down at its idle deadline: the machine is destroyed, the session Secret deleted.
    let last = final_state(&client, &ns.name, &instance, Duration::from_secs(30)).await;
    let deadline = last
        .status
        .as_ref()
        .unwrap()
        .idle_deadline
        .clone()
        .unwrap()
        .0;
    assert_eq!(
        last.status.as_ref().unwrap().phase,
        Some(InstancePhase::Terminating)
    );
    let state = admin(&sim, "state").await;
    let machine = &state["instances"][0];
    assert_eq!(state["instances"].as_array().unwrap().len(), 1, "{state}");
    assert_eq!(machine["alive"], false, "{state}");
    let destroyed: Timestamp = machine["destroyed_at"].as_str().unwrap().parse().unwrap();
    let late = destroyed.duration_since(deadline).as_secs_f64();
    eprintln!("idle teardown lateness with the chart's RBAC: {late:.3} s");
    assert!(
        (0.0..=1.0).contains(&late),
        "destroyed {late:.3} s from the deadline"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let session = format!("gpupool-session-{}", last.uid().unwrap());
    assert!(
        secrets.get_opt(&session).await.unwrap().is_none(),
        "{session} deleted"
    );

    // The machine's label carries the kube-system UID: the Namespace rule was used.
    let kube_system = kubectl_ok(&[
        "get",
        "namespace",
        "kube-system",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    assert!(
        machine.to_string().contains(&kube_system),
        "machine labelled with cluster id {kube_system}: {machine}"
    );
    // Events were published (events.k8s.io) under the operator's name.
    let events: Value = serde_json::from_str(&kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &ns.name,
        "-o",
        "json",
    ]))
    .unwrap();
    assert!(
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["reportingController"] == "gpupool"),
        "no event from gpupool: {events}"
    );
    // And nothing was refused along the way.
    let logs = op.logs();
    assert!(
        !logs.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{logs}"
    );
    drop(op);
    release_ns.cleanup().await;
    ns.cleanup().await;
}

#[tokio::test]
async fn the_chart_rbac_refuses_everything_else() {
    let ns = namespace_with_secrets("chart-deny").await;
    let release_ns = TestNamespace::new("chart-deny-rel").await;
    let other = namespace_with_secrets("chart-deny-other").await;
    let (full, kc) = install_and_token(&release_ns.name, &ns.name);
    let lease = format!("leases.coordination.k8s.io/{full}-leader");
    let (w, r, o) = (
        ns.name.as_str(),
        release_ns.name.as_str(),
        other.name.as_str(),
    );

    // What the operator does is allowed (so the refusals below are not vacuous).
    for args in [
        vec!["get", "secrets/vast", "-n", w],
        vec!["create", "secrets", "-n", w],
        vec!["list", "gpupools.gpupool.dev", "-n", w],
        vec!["watch", "videojobs.gpupool.dev", "-n", w],
        vec!["create", "gpuinstances.gpupool.dev", "-n", w],
        vec!["delete", "gpuinstances.gpupool.dev", "-n", w],
        vec![
            "patch",
            "gpupools.gpupool.dev",
            "--subresource=status",
            "-n",
            w,
        ],
        vec![
            "patch",
            "videojobs.gpupool.dev",
            "--subresource=status",
            "-n",
            w,
        ],
        vec!["create", "events.events.k8s.io", "-n", w],
        vec!["get", "namespaces/kube-system"],
        vec!["get", &lease, "-n", r],
        vec!["update", &lease, "-n", r],
        vec!["create", "leases.coordination.k8s.io", "-n", r],
    ] {
        assert!(can_i(&kc, &args), "should be allowed: {args:?}");
    }

    // Everything else is refused.
    let mut refused: Vec<Vec<&str>> = vec![
        // Secrets: never listed or watched, never read outside the watched namespace.
        vec!["list", "secrets", "-n", w],
        vec!["watch", "secrets", "-n", w],
        vec!["update", "secrets/vast", "-n", w],
        vec!["get", "secrets", "-n", "kube-system"],
        vec!["list", "secrets", "-n", "kube-system"],
        vec!["get", "secrets/vast", "-n", o],
        vec!["list", "secrets", "-n", o],
        vec!["get", "secrets", "-n", r],
        vec!["list", "secrets", "--all-namespaces"],
        // Namespaces: only kube-system, only get.
        vec!["get", "namespaces/default"],
        vec!["list", "namespaces"],
        vec!["delete", "namespaces/kube-system"],
        vec!["delete", "namespaces", "--all-namespaces"],
        // The user's objects: pools are never created, deleted or updated; jobs never created.
        vec!["create", "gpupools.gpupool.dev", "-n", w],
        vec!["delete", "gpupools.gpupool.dev", "-n", w],
        vec!["update", "gpupools.gpupool.dev", "-n", w],
        vec!["create", "videojobs.gpupool.dev", "-n", w],
        vec![
            "update",
            "videojobs.gpupool.dev",
            "--subresource=status",
            "-n",
            w,
        ],
        // Nothing of the kind outside the watched namespace.
        vec!["list", "gpupools.gpupool.dev", "-n", o],
        vec!["create", "gpuinstances.gpupool.dev", "-n", o],
        vec!["list", "gpuinstances.gpupool.dev", "--all-namespaces"],
        // Leases: only the one, only in the release namespace.
        vec!["update", "leases.coordination.k8s.io/other", "-n", r],
        vec!["get", "leases.coordination.k8s.io/other", "-n", r],
        vec!["delete", &lease, "-n", r],
        vec!["create", "leases.coordination.k8s.io", "-n", w],
        // RBAC itself and the CRDs.
        vec!["create", "rolebindings.rbac.authorization.k8s.io", "-n", w],
        vec!["create", "clusterrolebindings.rbac.authorization.k8s.io"],
        vec!["update", "customresourcedefinitions.apiextensions.k8s.io"],
    ];
    // No workloads or configuration anywhere it could reach.
    for verb in ["create", "delete"] {
        for res in ["deployments.apps", "pods", "configmaps"] {
            for n in [w, r] {
                refused.push(vec![verb, res, "-n", n]);
            }
        }
    }
    for args in &refused {
        assert!(!can_i(&kc, args), "should be refused: {args:?}");
    }

    // Real requests, not only access reviews.
    for args in [
        vec!["get", "secrets", "-n", "kube-system"],
        vec!["get", "secrets", "-n", w],
        vec!["get", "secret", "vast", "-n", o],
        vec!["delete", "namespace", o],
        vec!["create", "configmap", "x", "-n", w],
    ] {
        let out = kubectl_as(&kc, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.to_lowercase().contains("forbidden"),
            "kubectl {args:?} should be Forbidden: {err}"
        );
    }
    kubectl_ok(&["get", "namespace", o]);
    let got = ok(
        "get secret as the ServiceAccount",
        kubectl_as(&kc, &["get", "secret", "vast", "-n", w, "-o", "name"]),
    );
    assert_eq!(got.trim(), "secret/vast");
    // The leader Lease: created, read and renewed for real.
    let lease_name = format!("{full}-leader");
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": lease_name, "namespace": r},
        "spec": {"holderIdentity": "replica-a", "leaseDurationSeconds": 15}});
    let path = std::env::temp_dir().join(format!("{r}-lease.json"));
    std::fs::write(&path, lease.to_string()).unwrap();
    let p = path.to_str().unwrap();
    ok("create the Lease", kubectl_as(&kc, &["create", "-f", p]));
    let current: Value = serde_json::from_str(&ok(
        "get the Lease",
        kubectl_as(&kc, &["get", "lease", &lease_name, "-n", r, "-o", "json"]),
    ))
    .unwrap();
    let mut renewed = current.clone();
    renewed["spec"]["holderIdentity"] = json!("replica-b");
    std::fs::write(&path, renewed.to_string()).unwrap();
    ok("update the Lease", kubectl_as(&kc, &["replace", "-f", p]));
    let _ = std::fs::remove_file(&path);

    other.cleanup().await;
    release_ns.cleanup().await;
    ns.cleanup().await;
}

#[tokio::test]
async fn the_gateway_rbac_is_least_privilege() {
    let ns = namespace_with_secrets("chart-gw-rbac").await;
    let release_ns = TestNamespace::new("chart-gw-rbac-rel").await;
    let other = namespace_with_secrets("chart-gw-rbac-other").await;
    let kc = gateway_kubeconfig(&release_ns.name, &ns.name, &[]);
    let (w, r, o) = (
        ns.name.as_str(),
        release_ns.name.as_str(),
        other.name.as_str(),
    );
    let keys = "secrets/gpupool-gateway-keys";

    // Exactly what the gateway does, in its namespace.
    let mut allowed: Vec<Vec<&str>> = Vec::new();
    for verb in ["create", "get", "list", "watch", "delete", "patch"] {
        allowed.push(vec![verb, "videojobs.gpupool.dev", "-n", w]);
    }
    for verb in ["get", "list", "watch"] {
        allowed.push(vec![verb, "gpupools.gpupool.dev", "-n", w]);
        allowed.push(vec![verb, "gpuinstances.gpupool.dev", "-n", w]);
    }
    allowed.push(vec!["get", keys, "-n", w]);
    for args in &allowed {
        assert!(can_i(&kc, args), "should be allowed: {args:?}");
    }

    let mut refused: Vec<Vec<&str>> = vec![
        // Secrets: only the keys Secret, only get, only in its namespace.
        vec!["list", "secrets", "-n", w],
        vec!["watch", "secrets", "-n", w],
        vec!["get", "secrets", "-n", w],
        vec!["get", "secrets/vast", "-n", w],
        vec!["update", keys, "-n", w],
        vec!["patch", keys, "-n", w],
        vec!["delete", keys, "-n", w],
        vec!["create", "secrets", "-n", w],
        vec!["get", keys, "-n", o],
        vec!["get", keys, "-n", r],
        // Pools and instances are read only.
        vec!["create", "gpuinstances.gpupool.dev", "-n", w],
        vec!["update", "gpuinstances.gpupool.dev", "-n", w],
        vec!["patch", "gpuinstances.gpupool.dev", "-n", w],
        vec!["delete", "gpuinstances.gpupool.dev", "-n", w],
        vec!["create", "gpupools.gpupool.dev", "-n", w],
        vec!["update", "gpupools.gpupool.dev", "-n", w],
        vec!["delete", "gpupools.gpupool.dev", "-n", w],
        // Jobs: no update, no status (the operator's), nothing outside its namespace.
        vec!["update", "videojobs.gpupool.dev", "-n", w],
        vec![
            "update",
            "videojobs.gpupool.dev",
            "--subresource=status",
            "-n",
            w,
        ],
        vec![
            "patch",
            "videojobs.gpupool.dev",
            "--subresource=status",
            "-n",
            w,
        ],
        vec!["create", "videojobs.gpupool.dev", "-n", o],
        vec!["create", "videojobs.gpupool.dev", "-n", r],
        vec!["list", "videojobs.gpupool.dev", "-n", o],
        vec!["list", "videojobs.gpupool.dev", "--all-namespaces"],
        vec!["list", "gpupools.gpupool.dev", "--all-namespaces"],
        // None of the operator's other rights: no Lease, no Events, no Namespace.
        vec!["create", "leases.coordination.k8s.io", "-n", r],
        vec!["create", "events.events.k8s.io", "-n", w],
        vec!["create", "events", "-n", w],
        vec!["get", "namespaces/kube-system"],
        vec!["list", "namespaces"],
        // RBAC itself and the CRDs.
        vec!["create", "rolebindings.rbac.authorization.k8s.io", "-n", w],
        vec!["update", "customresourcedefinitions.apiextensions.k8s.io"],
    ];
    for n in [w, r] {
        for verb in ["get", "list", "create"] {
            refused.push(vec![verb, "pods", "-n", n]);
        }
        refused.push(vec!["create", "deployments.apps", "-n", n]);
        refused.push(vec!["get", "configmaps", "-n", n]);
    }
    for args in &refused {
        assert!(!can_i(&kc, args), "should be refused: {args:?}");
    }

    // Real requests, not only access reviews: the keys Secret is read, no other; a job is
    // created, read and deleted in the gateway's namespace, and refused in another.
    kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "gpupool-gateway-keys",
        "-n",
        w,
        "--from-literal=vps-app=k1",
    ]);
    let got = ok(
        "get the keys Secret as the gateway",
        kubectl_as(&kc, &["get", keys, "-n", w, "-o", "name"]),
    );
    assert_eq!(got.trim(), "secret/gpupool-gateway-keys");
    let job = |namespace: &str| {
        json!({"apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": "gw-rbac", "namespace": namespace,
                "labels": {"gpupool.dev/client": "vps-app"}},
            "spec": {"operation": "caption", "input": {"videoUrl": "https://x/1.mp4"}}})
    };
    let path = std::env::temp_dir().join(format!("{w}-gw-job.json"));
    std::fs::write(&path, job(w).to_string()).unwrap();
    let p = path.to_str().unwrap();
    ok(
        "create a job as the gateway",
        kubectl_as(&kc, &["create", "-f", p]),
    );
    ok(
        "annotate a job as the gateway",
        kubectl_as(
            &kc,
            &[
                "patch",
                "videojob",
                "gw-rbac",
                "-n",
                w,
                "--type=merge",
                "-p",
                r#"{"metadata":{"annotations":{"gpupool.dev/callback":"{}"}}}"#,
            ],
        ),
    );
    ok(
        "list jobs as the gateway",
        kubectl_as(&kc, &["get", "videojobs", "-n", w, "-o", "name"]),
    );
    std::fs::write(&path, job(o).to_string()).unwrap();
    for args in [
        vec!["create", "-f", p],
        vec!["get", "secret", "vast", "-n", w],
        vec!["get", "secrets", "-n", w],
        vec!["get", "pods", "-n", w],
    ] {
        let out = kubectl_as(&kc, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.to_lowercase().contains("forbidden"),
            "kubectl {args:?} should be Forbidden: {err}"
        );
    }
    let _ = std::fs::remove_file(&path);
    ok(
        "delete a job as the gateway",
        kubectl_as(
            &kc,
            &["delete", "videojob", "gw-rbac", "-n", w, "--wait=false"],
        ),
    );

    other.cleanup().await;
    release_ns.cleanup().await;
    ns.cleanup().await;
}
