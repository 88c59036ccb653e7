//! The chart's alerts and dashboard checked by promtool (Prometheus's own rule loader, PromQL
//! parser and rule unit-test engine, built by `make testtools`): every alert fires on the
//! series of tests/monitoring/alerts.test.yaml that should fire it and on no other, and every
//! query of the Grafana dashboard is valid PromQL.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{
    chart::{ok, render},
    support::{repo_root, scratch_dir, test_tool},
};

/// The documents of `helm template` for release `gpupool` in `gpupool-system` with `sets`.
fn rendered(sets: &[&str]) -> Vec<Value> {
    let yaml = ok("helm template", render("gpupool", "gpupool-system", sets));
    serde_yaml::Deserializer::from_str(&yaml)
        .filter_map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).ok()?).ok())
        .filter(|v: &Value| v.is_object())
        .collect()
}

fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(test_tool("promtool"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    ok(&format!("promtool {}", args.join(" ")), out)
}

#[test]
fn every_alert_fires_on_its_series_and_stays_quiet_on_the_others() {
    let docs = rendered(&["prometheusRule.enabled=true"]);
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let groups = &rule["spec"]["groups"];
    let alerts: Vec<String> = groups
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    for wanted in [
        "GpupoolTeardownFailing",
        "GpupoolJobsPilingUp",
        "GpupoolReconcileErrors",
        "GpupoolIdleTeardownLate",
        "GpupoolIdleMachinePastDeadline",
        "GpupoolNoProviderAvailable",
        "GpupoolSpendAboveLimit",
        "GpupoolNoLeader",
    ] {
        assert!(
            alerts.iter().any(|a| a == wanted),
            "{wanted} missing: {alerts:?}"
        );
    }

    // Every alert has a case where it fires and one where it must not.
    let tests: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("tests/monitoring/alerts.test.yaml")).unwrap(),
    )
    .unwrap();
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for alert in &alerts {
        let of = |firing: bool| {
            cases.iter().any(|c| {
                c["alertname"] == alert.as_str()
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() != firing)
            })
        };
        assert!(of(true), "no case where {alert} fires");
        assert!(of(false), "no case where {alert} stays quiet");
    }

    // promtool reads the rules as the Prometheus Operator hands them to Prometheus: the
    // PrometheusRule's spec is a rule file.
    let dir = scratch_dir("monitoring-alerts");
    let file = serde_json::json!({ "groups": groups });
    std::fs::write(
        dir.join("rules.yaml"),
        serde_yaml::to_string(&file).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("tests/monitoring/alerts.test.yaml"),
        dir.join("alerts.test.yaml"),
    )
    .unwrap();
    let checked = promtool(
        &dir,
        &["check", "rules", "--lint=all", "--lint-fatal", "rules.yaml"],
    );
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    let tested = promtool(&dir, &["test", "rules", "alerts.test.yaml"]);
    eprintln!("{tested}");
    assert!(tested.contains("SUCCESS"), "{tested}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Grafana's variables as they are when "All" is selected, and its interval macros.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$job", ".+")
        .replace("$namespace", ".+")
        .replace("$pool", ".+")
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let docs = rendered(&[
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.folder=GPU",
    ]);
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "gpupool-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "GPU");
    let dashboard: Value = serde_json::from_str(cm["data"]["gpupool.json"].as_str().unwrap())
        .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "gpupool-overview");

    let mut exprs: Vec<(String, String)> = Vec::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            exprs.push((title.clone(), t["expr"].as_str().unwrap().to_string()));
        }
        titles.push(title);
    }
    // The panels an on-call person opens first.
    for wanted in [
        "Machines by phase",
        "Idle machines: seconds to their deadline",
        "Spend per hour by pool",
        "Spend per job (last hour)",
        "Jobs by phase",
        "Job wait (creation to dispatch)",
        "Teardown lateness (deletion minus deadline)",
        "Provider errors",
        "Back-off: seconds until retried",
    ] {
        assert!(
            titles.iter().any(|t| t == wanted),
            "no panel {wanted}: {titles:?}"
        );
    }
    // The variables' label_values(selector, label) queries: the selector must parse too.
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(sel, _)| sel.to_string())
            .unwrap_or_else(|| panic!("variable query {q} is not label_values(selector, label)"));
        exprs.push((format!("variable {}", v["name"]), inner));
    }

    // As recording rules, so promtool parses and type-checks each one.
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": substitute(e)}))
        .collect();
    let dir = scratch_dir("monitoring-dashboard");
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(
        dir.join("dashboard.yaml"),
        serde_yaml::to_string(&file).unwrap(),
    )
    .unwrap();
    let checked = promtool(&dir, &["check", "rules", "dashboard.yaml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{checked}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // Every metric the dashboard and the alerts name is one the operator exports.
    let metrics = gpupool::metrics::Metrics::new();
    let names = metrics.names();
    let rules_yaml = ok(
        "helm template",
        render(
            "gpupool",
            "gpupool-system",
            &["prometheusRule.enabled=true"],
        ),
    );
    let mut used: Vec<String> = Vec::new();
    for text in exprs
        .iter()
        .map(|(_, e)| e.as_str())
        .chain([rules_yaml.as_str()])
    {
        let mut rest = text;
        while let Some(i) = rest.find("gpupool_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.push(name);
        }
    }
    used.sort();
    used.dedup();
    for name in &used {
        let known = names.iter().any(|n| {
            name == n
                || ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(n))
        });
        assert!(
            known,
            "{name} is not a metric the operator exports ({names:?})"
        );
    }
}
