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
        apps::v1 as apps, batch::v1 as batch, core::v1 as core, policy::v1 as policy,
        rbac::v1 as rbac, scheduling::v1 as sched, storage::v1 as storage,
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
            "Service" => strict::<core::Service>(&d),
            "Namespace" => strict::<core::Namespace>(&d),
            "ConfigMap" => strict::<core::ConfigMap>(&d),
            "ClusterRole" => strict::<rbac::ClusterRole>(&d),
            "ClusterRoleBinding" => strict::<rbac::ClusterRoleBinding>(&d),
            "Role" => strict::<rbac::Role>(&d),
            "RoleBinding" => strict::<rbac::RoleBinding>(&d),
            "PriorityClass" => strict::<sched::PriorityClass>(&d),
            "PodDisruptionBudget" => strict::<policy::PodDisruptionBudget>(&d),
            "Job" => strict::<batch::Job>(&d),
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

/// The render `kubectl apply -f manifests/strata.yaml` uses: CRDs included, no hooks.
fn render_manifests() -> String {
    render(&[
        "--include-crds",
        "--no-hooks",
        "--set",
        "createNamespace=true",
    ])
}

/// The documents of a render, as JSON.
fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind}/{name} not rendered"))
}

fn container<'a>(pod_owner: &'a Value, name: &str) -> &'a Value {
    pod_owner["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name} missing"))
}

/// CRDs live in crds/ (Helm's convention): `helm template`/`install` without
/// `--include-crds` renders none from templates (so `--skip-crds` skips them and CRDs
/// applied beforehand are not claimed by the release); no resource-policy annotation.
#[test]
fn crds_are_in_the_crds_directory_not_in_templates() {
    let chart = PathBuf::from(chart());
    assert!(chart.join("crds/strata.io.yaml").exists());
    assert!(!chart.join("templates/crds").exists());
    let (kinds, _) = check_objects(&render(&[]));
    assert!(
        !kinds.iter().any(|k| k == "CustomResourceDefinition"),
        "{kinds:?}"
    );
    let with_crds = render(&["--include-crds"]);
    assert!(!with_crds.contains("helm.sh/resource-policy"));
    let (kinds, problems) = check_objects(&with_crds);
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "CustomResourceDefinition")
            .count(),
        3
    );
}

#[test]
fn default_render_has_every_component_and_valid_objects() {
    let yaml = render_manifests();
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
    assert!(
        !yaml.contains("helm.sh/hook"),
        "manifests carry no Helm hooks"
    );
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
        render_manifests(),
        "manifests/ drifted from the chart: run .ci/k8s-checks.sh --update"
    );
}

/// The node plugin runs as root (the image's user is 65532; privileged alone is not root).
#[test]
fn node_plugin_runs_privileged_as_root() {
    let d = docs(&render(&[]));
    let plugin = container(find(&d, "DaemonSet", "strata-csi-node"), "node-plugin");
    let sc = &plugin["securityContext"];
    assert_eq!(sc["privileged"], true);
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["runAsGroup"], 0);
}

/// A change of operator.settings changes the controller pod template (checksum/config), so
/// `helm upgrade` rolls the operator; other values leave it alone.
#[test]
fn operator_settings_change_rolls_the_controller() {
    let checksum = |args: &[&str]| {
        let d = docs(&render(args));
        let dep = find(&d, "Deployment", "strata-csi-controller");
        let cm = find(&d, "ConfigMap", "strata-operator");
        (
            dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                .as_str()
                .expect("checksum/config annotation")
                .to_string(),
            cm["data"]["settings.yaml"].as_str().unwrap().to_string(),
        )
    };
    let (a, settings) = checksum(&[]);
    assert_eq!(a.len(), 64, "sha256 hex: {a}");
    assert!(settings.contains("resyncSecs: 60"), "{settings}");
    let (b, settings_b) = checksum(&["--set", "operator.settings.resyncSecs=30"]);
    assert!(settings_b.contains("resyncSecs: 30"), "{settings_b}");
    assert_ne!(a, b);
    let (c, _) = checksum(&["--set", "controller.replicas=3"]);
    assert_eq!(a, c);
    // The settings still parse as the operator reads them.
    strata_operator::settings::Settings::from_yaml(&settings_b).unwrap();
}

/// hostPaths: mounted at the same path into the operator, the CSI controller and the node
/// plugin (DirectoryOrCreate), chowned to 65532 by an init container with CAP_CHOWN only;
/// nothing of it without hostPaths.
#[test]
fn host_paths_reach_operator_controller_and_node_plugin() {
    let d = docs(&render(&[
        "--set",
        "hostPaths={/var/lib/strata,/srv/strata}",
        "--set",
        "node.mountMode=pod",
    ]));
    let dep = find(&d, "Deployment", "strata-csi-controller");
    let ds = find(&d, "DaemonSet", "strata-csi-node");
    for (owner, containers) in [
        (dep, &["operator", "csi-plugin"][..]),
        (ds, &["node-plugin"][..]),
    ] {
        let pod = &owner["spec"]["template"]["spec"];
        let vols = pod["volumes"].as_array().unwrap();
        for (i, p) in ["/var/lib/strata", "/srv/strata"].iter().enumerate() {
            let name = format!("host-path-{i}");
            let v = vols.iter().find(|v| v["name"] == name.as_str()).unwrap();
            assert_eq!(v["hostPath"]["path"], *p);
            assert_eq!(v["hostPath"]["type"], "DirectoryOrCreate");
            for c in containers {
                let mounts = container(owner, c)["volumeMounts"].as_array().unwrap();
                assert!(
                    mounts
                        .iter()
                        .any(|m| m["name"] == name.as_str() && m["mountPath"] == *p),
                    "{c}: {mounts:?}"
                );
            }
        }
        let init = &pod["initContainers"][0];
        assert_eq!(
            init["command"],
            serde_json::json!(["chown", "65532:65532", "/var/lib/strata", "/srv/strata"])
        );
        let sc = &init["securityContext"];
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(sc["capabilities"]["add"], serde_json::json!(["CHOWN"]));
        assert_eq!(sc["allowPrivilegeEscalation"], false);
    }
    let (_, problems) = check_objects(&render(&["--set", "hostPaths={/var/lib/strata}"]));
    assert_eq!(problems, Vec::<String>::new());

    let plain = docs(&render(&[]));
    let dep = find(&plain, "Deployment", "strata-csi-controller");
    assert!(dep["spec"]["template"]["spec"]["initContainers"].is_null());
    let out = Command::new(tool("helm"))
        .args([
            "template",
            "strata",
            &chart(),
            "--set",
            "hostPaths={relative}",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "relative hostPaths refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("hostPaths"));
}

/// extraVolumes / extraVolumeMounts per component.
#[test]
fn extra_volumes_are_added_per_component() {
    let d = docs(&render(&[
        "--set",
        "controller.extraVolumes[0].name=ca",
        "--set",
        "controller.extraVolumes[0].configMap.name=ca-bundle",
        "--set",
        "operator.extraVolumeMounts[0].name=ca",
        "--set",
        "operator.extraVolumeMounts[0].mountPath=/etc/ca",
        "--set",
        "node.extraVolumes[0].name=data",
        "--set",
        "node.extraVolumes[0].hostPath.path=/data",
        "--set",
        "node.extraVolumeMounts[0].name=data",
        "--set",
        "node.extraVolumeMounts[0].mountPath=/data",
    ]));
    let dep = find(&d, "Deployment", "strata-csi-controller");
    let vols = dep["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(vols.iter().any(|v| v["configMap"]["name"] == "ca-bundle"));
    let m = container(dep, "operator")["volumeMounts"]
        .as_array()
        .unwrap();
    assert!(m.iter().any(|m| m["mountPath"] == "/etc/ca"));
    let ds = find(&d, "DaemonSet", "strata-csi-node");
    let m = container(ds, "node-plugin")["volumeMounts"]
        .as_array()
        .unwrap();
    assert!(m.iter().any(|m| m["mountPath"] == "/data"));
}

/// The post-delete hook deletes exactly the Leases the sidecars and the operator create
/// (names as csi-lib-utils sanitizes the driver name), with hook-scoped RBAC that is deleted
/// whatever the outcome.
#[test]
fn post_delete_hook_deletes_the_release_leases() {
    let d = docs(&render(&["--set", "csiDriver.name=csi.example.io/x."]));
    let job = find(&d, "Job", "strata-cleanup");
    let c = container(job, "cleanup-leases");
    assert_eq!(c["command"], serde_json::json!(["strata-operator"]));
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "cleanup-leases",
            "--namespace=strata-system",
            "--names=csi-example-io-x-X,external-resizer-csi-example-io-x-X,strata-operator-leader",
            "--wait-for-pods=app.kubernetes.io/name=strata-csi-controller",
        ]
    );
    assert_eq!(
        job["spec"]["template"]["spec"]["serviceAccountName"],
        "strata-cleanup"
    );
    let role = find(&d, "Role", "strata-cleanup");
    assert_eq!(
        role["rules"][0]["resourceNames"],
        serde_json::json!([
            "csi-example-io-x-X",
            "external-resizer-csi-example-io-x-X",
            "strata-operator-leader"
        ])
    );
    assert_eq!(role["rules"][0]["verbs"], serde_json::json!(["delete"]));
    assert_eq!(role["rules"][1]["resources"], serde_json::json!(["pods"]));
    assert_eq!(role["rules"][1]["verbs"], serde_json::json!(["list"]));
    for (kind, weight) in [
        ("ServiceAccount", "-10"),
        ("Role", "-10"),
        ("RoleBinding", "-10"),
        ("Job", "0"),
    ] {
        let a = &find(&d, kind, "strata-cleanup")["metadata"]["annotations"];
        assert_eq!(a["helm.sh/hook"], "post-delete", "{kind}");
        assert_eq!(a["helm.sh/hook-weight"], weight, "{kind}");
        let policy = a["helm.sh/hook-delete-policy"].as_str().unwrap();
        for p in ["before-hook-creation", "hook-succeeded", "hook-failed"] {
            assert!(policy.contains(p), "{kind}: {policy}");
        }
    }
    // Default driver name: the Lease names the sidecars use for csi.strata.io.
    let d = docs(&render(&[]));
    let args = container(find(&d, "Job", "strata-cleanup"), "cleanup-leases")["args"].clone();
    assert_eq!(
        args[2],
        "--names=csi-strata-io,external-resizer-csi-strata-io,strata-operator-leader"
    );
    let (_, problems) = check_objects(&render(&[]));
    assert_eq!(problems, Vec::<String>::new());
    let d = docs(&render(&["--set", "cleanupHook.enabled=false"]));
    assert!(!d.iter().any(|x| x["kind"] == "Job"));
}

/// monitoring.*: four PodMonitors (off by default) whose selectors match the Pods that serve
/// a `metrics` port (the gateway and the controller as rendered; mount Pods and cache members
/// as the CSI driver and the operator label them), the PrometheusRule is the rules file, and
/// the dashboard ConfigMap is the dashboard file.
#[test]
fn monitoring_objects_select_the_pods_that_serve_metrics() {
    let default = docs(&render(&[]));
    assert!(
        !default
            .iter()
            .any(|d| d["kind"] == "PodMonitor" || d["kind"] == "PrometheusRule")
    );
    let yaml = render(&[
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.podMonitor.labels.release=kps",
        "--set",
        "monitoring.prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "gateway.enabled=true",
        "--set",
        "gateway.volumeSecret=v",
        "--set",
        "gateway.credentialsSecret=c",
    ]);
    let (_, problems) = check_objects(&yaml);
    let problems: Vec<&String> = problems
        .iter()
        .filter(|p| !p.starts_with("PodMonitor/") && !p.starts_with("PrometheusRule/"))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    let d = docs(&yaml);
    let selects = |pm: &Value, pod_labels: &Value| {
        let sel = pm["spec"]["selector"]["matchLabels"].as_object().unwrap();
        assert!(!sel.is_empty());
        for (k, v) in sel {
            assert_eq!(&pod_labels[k], v, "{k} of {}", pm["metadata"]["name"]);
        }
    };
    for name in [
        "strata-mount",
        "strata-cache",
        "strata-gateway",
        "strata-operator",
    ] {
        let pm = find(&d, "PodMonitor", name);
        assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(pm["metadata"]["labels"]["release"], "kps");
        let ep = &pm["spec"]["podMetricsEndpoints"][0];
        assert_eq!(ep["port"], "metrics");
        assert_eq!(ep["honorLabels"], true);
        assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    }
    for (pm, owner, c) in [
        ("strata-gateway", "strata-gateway", "gateway"),
        ("strata-operator", "strata-csi-controller", "operator"),
    ] {
        let dep = find(&d, "Deployment", owner);
        selects(
            find(&d, "PodMonitor", pm),
            &dep["spec"]["template"]["metadata"]["labels"],
        );
        let ports = container(dep, c)["ports"].as_array().unwrap().clone();
        assert!(ports.iter().any(|p| p["name"] == "metrics"), "{ports:?}");
    }
    // The labels csi-driver/src/pod.rs and operator/src/cachegroup.rs give their Pods
    // (their unit tests check them there).
    selects(
        find(&d, "PodMonitor", "strata-mount"),
        &serde_json::json!({"app.kubernetes.io/name": "strata-mount", "app.kubernetes.io/component": "mount"}),
    );
    selects(
        find(&d, "PodMonitor", "strata-cache"),
        &serde_json::json!({"app.kubernetes.io/name": "strata-cache", "app.kubernetes.io/component": "cache"}),
    );
    let files = PathBuf::from(chart()).join("files");
    let rules: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(files.join("prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    let pr = find(&d, "PrometheusRule", "strata");
    assert_eq!(pr["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pr["spec"], rules);
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(files.join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let cm = find(&d, "ConfigMap", "strata-grafana-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(cm["data"]["strata.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard);
}
