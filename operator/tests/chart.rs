//! Chart rendering: `helm lint` and `helm template` with default and custom values; every
//! rendered object deserialises into its k8s-openapi type with no field dropped (an unknown
//! or misplaced field fails), and kubectl decodes the output offline (`annotate --local`).
//! helm and kubectl come from `.ci/deps.d/k8s-tools.sh` (STRATA_K8S_TOOLS or
//! /opt/strata-k8s-tools).

use std::path::PathBuf;
use std::process::Command;

use serde::de::DeserializeOwned;
use serde_json::Value;

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("STRATA_K8S_TOOLS").unwrap_or_else(|_| "/opt/strata-k8s-tools".into());
    let p = PathBuf::from(dir).join("bin").join(name);
    assert!(
        p.exists(),
        "{} missing: run .ci/install-deps (it runs .ci/deps.d/k8s-tools.sh)",
        p.display()
    );
    p
}

fn chart() -> String {
    format!("{}/../charts/strata", env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn render(args: &[&str]) -> String {
    run(Command::new(tool("helm"))
        .args([
            "template",
            "strata",
            &chart(),
            "--namespace",
            "strata-system",
        ])
        .args(args))
}

/// Every leaf of `orig` is present in `round` (serde dropped nothing).
fn dropped(orig: &Value, round: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, round) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => dropped(v, w, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                match b.get(i) {
                    Some(w) => dropped(v, w, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

fn strict<T: DeserializeOwned + serde::Serialize>(doc: &Value) -> Vec<String> {
    let typed: T = match serde_json::from_value(doc.clone()) {
        Ok(t) => t,
        Err(e) => return vec![format!("does not deserialise: {e}")],
    };
    let round = serde_json::to_value(&typed).unwrap();
    let mut out = vec![];
    dropped(doc, &round, "", &mut out);
    out.into_iter()
        .map(|p| format!("unknown field {p}"))
        .collect()
}

/// Check every object of a rendered stream; returns (kinds seen, problems).
fn check_objects(yaml: &str) -> (Vec<String>, Vec<String>) {
    use k8s_openapi::api::{
        apps::v1 as apps, core::v1 as core, policy::v1 as policy, rbac::v1 as rbac,
        scheduling::v1 as sched, storage::v1 as storage,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
    let (mut kinds, mut problems) = (vec![], vec![]);
    for d in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = d["kind"].as_str().unwrap_or("").to_string();
        let errs = match kind.as_str() {
            "CustomResourceDefinition" => strict::<CustomResourceDefinition>(&d),
            "CSIDriver" => strict::<storage::CSIDriver>(&d),
            "DaemonSet" => strict::<apps::DaemonSet>(&d),
            "Deployment" => strict::<apps::Deployment>(&d),
            "ServiceAccount" => strict::<core::ServiceAccount>(&d),
            "ConfigMap" => strict::<core::ConfigMap>(&d),
            "ClusterRole" => strict::<rbac::ClusterRole>(&d),
            "ClusterRoleBinding" => strict::<rbac::ClusterRoleBinding>(&d),
            "Role" => strict::<rbac::Role>(&d),
            "RoleBinding" => strict::<rbac::RoleBinding>(&d),
            "PriorityClass" => strict::<sched::PriorityClass>(&d),
            "PodDisruptionBudget" => strict::<policy::PodDisruptionBudget>(&d),
            k => vec![format!("no type check for kind {k:?}")],
        };
        let name = d["metadata"]["name"].as_str().unwrap_or("?").to_string();
        problems.extend(errs.into_iter().map(|e| format!("{kind}/{name}: {e}")));
        kinds.push(kind);
    }
    (kinds, problems)
}

#[test]
fn helm_lint_is_clean() {
    let out = run(Command::new(tool("helm")).args(["lint", "--strict", &chart()]));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn default_render_has_every_component_and_valid_objects() {
    let yaml = render(&[]);
    let (kinds, problems) = check_objects(&yaml);
    assert_eq!(problems, Vec::<String>::new());
    for k in [
        "CSIDriver",
        "DaemonSet",
        "Deployment",
        "PriorityClass",
        "PodDisruptionBudget",
        "CustomResourceDefinition",
        "ClusterRole",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "CustomResourceDefinition")
            .count(),
        3
    );
    assert!(yaml.contains("attachRequired: false") && yaml.contains("podInfoOnMount: true"));
    assert!(yaml.contains("--extra-create-metadata"));
    assert!(yaml.contains("/var/lib/kubelet/plugins/csi.strata.io/csi.sock"));
    assert!(yaml.contains("helm.sh/resource-policy: keep"));
    assert!(
        !yaml.contains("strata-grafana-dashboard"),
        "dashboard is optional, off by default"
    );
    // kubectl parses every object offline (`apply --dry-run=client` needs an API server for
    // discovery; `annotate --local` decodes the same way without one).
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.yaml");
    std::fs::write(&f, &yaml).unwrap();
    let out = run(Command::new(tool("kubectl"))
        .args([
            "annotate",
            "--local",
            "-o",
            "name",
            "strata.io/checked=true",
            "-f",
        ])
        .arg(&f));
    assert!(
        out.contains("customresourcedefinition.apiextensions.k8s.io/volumes.strata.io"),
        "{out}"
    );
}

#[test]
fn custom_values_render_and_bad_values_are_refused() {
    let yaml = render(&[
        "--set",
        "kubeletDir=/var/snap/microk8s/common/var/lib/kubelet",
        "--set",
        "image.repository=registry.example.com/strata",
        "--set",
        "image.tag=v9",
        "--set",
        "operator.enabled=false",
        "--set",
        "priorityClasses.create=false",
        "--set",
        "podDisruptionBudget.enabled=false",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "node.mountMode=pod",
        "--set",
        "controller.replicas=3",
    ]);
    let (kinds, problems) = check_objects(&yaml);
    assert_eq!(problems, Vec::<String>::new());
    assert!(yaml.contains("/var/snap/microk8s/common/var/lib/kubelet/plugins_registry"));
    assert!(yaml.contains("image: registry.example.com/strata:v9"));
    assert!(
        !yaml.contains("strata-operator\n") || !yaml.contains("command: [\"strata-operator\"]")
    );
    assert!(
        !kinds
            .iter()
            .any(|k| k == "PriorityClass" || k == "PodDisruptionBudget")
    );
    assert!(yaml.contains("--mount-mode=pod") && yaml.contains("replicas: 3"));
    assert!(yaml.contains("strata-grafana-dashboard"));

    let out = Command::new(tool("helm"))
        .args([
            "template",
            "strata",
            &chart(),
            "--set",
            "node.mountMode=sideways",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mountMode"),
        "values.schema.json names the field: {err}"
    );
}

#[test]
fn checked_in_manifests_match_the_chart() {
    let dir = format!("{}/../manifests", env!("CARGO_MANIFEST_DIR"));
    let on_disk = std::fs::read_to_string(format!("{dir}/strata.yaml")).unwrap();
    assert_eq!(
        on_disk,
        render(&[]),
        "manifests/ drifted from the chart: run .ci/k8s-checks.sh --update"
    );
}
