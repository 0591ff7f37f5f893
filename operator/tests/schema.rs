//! Schema tests: good and bad objects against the generated CRD schemas, the way the API
//! server checks them: structure (types, required fields, enums, patterns, bounds) and the
//! CEL rules (evaluated client-side with kube's CEL validator), including transition rules.

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};
use strata_operator::crd::{CacheGroup, Quota, Volume};

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// Structural OpenAPI checks (what the API server does before CEL).
fn structural(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() {
        if schema["nullable"] != true && !path.is_empty() {
            errs.push(format!("{path}: null"));
        }
        return;
    }
    if let Some(t) = schema["type"].as_str() {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
        if !ok && schema["x-kubernetes-int-or-string"] != true {
            errs.push(format!("{path}: expected {t}, got {v}"));
            return;
        }
    }
    if let Some(e) = schema["enum"].as_array()
        && !e.contains(v)
    {
        errs.push(format!("{path}: {v} not one of {e:?}"));
    }
    if let (Some(p), Some(s)) = (schema["pattern"].as_str(), v.as_str())
        && !regex::Regex::new(p).unwrap().is_match(s)
    {
        errs.push(format!("{path}: {s:?} does not match {p}"));
    }
    if let (Some(min), Some(n)) = (schema["minimum"].as_f64(), v.as_f64())
        && n < min
    {
        errs.push(format!("{path}: {n} < {min}"));
    }
    if let (Some(max), Some(n)) = (schema["maximum"].as_f64(), v.as_f64())
        && n > max
    {
        errs.push(format!("{path}: {n} > {max}"));
    }
    if let (Some(min), Some(s)) = (schema["minLength"].as_u64(), v.as_str())
        && (s.chars().count() as u64) < min
    {
        errs.push(format!("{path}: shorter than {min}"));
    }
    if let (Some(max), Some(s)) = (schema["maxLength"].as_u64(), v.as_str())
        && (s.chars().count() as u64) > max
    {
        errs.push(format!("{path}: longer than {max}"));
    }
    if let (Some(max), Some(a)) = (schema["maxItems"].as_u64(), v.as_array())
        && a.len() as u64 > max
    {
        errs.push(format!("{path}: more than {max} items"));
    }
    if let Some(obj) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{path}.{r}: Required value"));
            }
        }
        let props = schema["properties"].as_object();
        for (k, val) in obj {
            if path.is_empty() && (k == "apiVersion" || k == "kind" || k == "metadata") {
                continue;
            }
            match props.and_then(|p| p.get(k)) {
                Some(s) => structural(s, val, &format!("{path}.{k}"), errs),
                None => match schema.get("additionalProperties") {
                    Some(ap) if ap.is_object() => structural(ap, val, &format!("{path}.{k}"), errs),
                    _ if schema["x-kubernetes-preserve-unknown-fields"] == true => {}
                    _ => errs.push(format!("{path}.{k}: unknown field")),
                },
            }
        }
    }
    if let Some(a) = v.as_array() {
        for (i, item) in a.iter().enumerate() {
            structural(&schema["items"], item, &format!("{path}[{i}]"), errs);
        }
    }
}

/// All errors of `obj` (and `old` for transition rules) against the CRD of `kind`.
fn validate(obj: &Value, old: Option<&Value>) -> Vec<String> {
    let crd = match obj["kind"].as_str().unwrap() {
        "Volume" => Volume::crd(),
        "Quota" => Quota::crd(),
        "CacheGroup" => CacheGroup::crd(),
        k => panic!("unknown kind {k}"),
    };
    let schema = schema_of(&crd);
    let mut errs = vec![];
    structural(&schema, obj, "", &mut errs);
    if let Err(e) = Validator::new().validate(&schema, obj, old) {
        errs.extend(e.into_vec().iter().map(|e| e.to_string()));
    }
    errs
}

fn examples() -> Vec<Value> {
    let mut out = vec![];
    for f in ["volume.yaml", "quota.yaml", "cachegroup.yaml"] {
        let path = format!("{}/../e2e/examples/{f}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        out.extend(
            docs.into_iter()
                .filter(|d| d["apiVersion"] == "strata.io/v1alpha1"),
        );
    }
    out
}

#[test]
fn example_objects_validate_and_deserialize() {
    let ex = examples();
    assert_eq!(ex.len(), 3);
    for obj in &ex {
        assert_eq!(validate(obj, None), Vec::<String>::new(), "{obj}");
    }
    let _: Volume = serde_json::from_value(ex[0].clone()).unwrap();
    let _: Quota = serde_json::from_value(ex[1].clone()).unwrap();
    let _: CacheGroup = serde_json::from_value(ex[2].clone()).unwrap();
}

fn with(base: &Value, path: &[&str], v: Value) -> Value {
    let mut o = base.clone();
    let mut cur = &mut o;
    for p in &path[..path.len() - 1] {
        cur = &mut cur[*p];
    }
    let last = path[path.len() - 1];
    if v.is_null() {
        cur.as_object_mut().unwrap().remove(last);
    } else {
        cur[last] = v;
    }
    o
}

/// Each bad object is rejected, with a message naming the problem.
#[test]
fn bad_objects_are_rejected_with_readable_messages() {
    let ex = examples();
    let (vol, quota, cg) = (&ex[0], &ex[1], &ex[2]);
    let cases: Vec<(Value, &str)> = vec![
        (
            with(vol, &["metadata", "name"], json!("Models_1")),
            "a Volume name is the file-system name",
        ),
        (
            with(vol, &["spec", "format", "blockSizeKiB"], json!(1000)),
            "blockSizeKiB must be a power of two",
        ),
        (
            with(vol, &["spec", "storage", "bucket"], json!("models")),
            "for type s3 give bucket as a URL",
        ),
        (
            with(vol, &["spec", "storage", "type"], json!("gcs")),
            "not one of",
        ),
        (
            with(vol, &["spec", "capacity"], json!("lots")),
            "does not match",
        ),
        (
            with(vol, &["spec", "credentialsSecretRef"], Value::Null),
            "credentialsSecretRef: Required value",
        ),
        (
            with(vol, &["spec", "mountOptions"], json!(["--buffer-size 600"])),
            "mountOptions are `strata mount` flags",
        ),
        (
            with(
                vol,
                &["spec", "storageClasses"],
                json!([{"name": "a"}, {"name": "a"}]),
            ),
            "storageClasses names must be unique",
        ),
        (
            with(vol, &["spec", "colour"], json!("blue")),
            "unknown field",
        ),
        (with(quota, &["spec", "capacity"], Value::Null), "x"),
        (
            with(
                &with(quota, &["spec", "capacity"], Value::Null),
                &["spec", "inodes"],
                Value::Null,
            ),
            "set capacity, inodes or both",
        ),
        (with(quota, &["spec", "inodes"], json!(-1)), "< 0"),
        (
            with(cg, &["spec", "medium"], json!({})),
            "medium needs exactly one of hostPath or ephemeral",
        ),
        (
            with(cg, &["spec", "medium", "ephemeral"], json!({})),
            "medium needs exactly one of hostPath or ephemeral",
        ),
        (
            with(cg, &["spec", "warmupPaths"], json!(["../etc"])),
            "warmupPaths are relative paths",
        ),
        (with(cg, &["spec", "replicas"], json!(0)), "0 < 1"),
        (
            with(cg, &["metadata", "name"], json!("GPU")),
            "a CacheGroup name is used in DaemonSet names",
        ),
    ];
    for (i, (obj, want)) in cases.iter().enumerate() {
        let errs = validate(obj, None);
        if *want == "x" {
            // Only capacity removed: inodes remain, still valid.
            assert!(errs.is_empty(), "case {i}: {errs:?}");
            continue;
        }
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "case {i}: want {want:?}, got {errs:?}"
        );
    }
}

#[test]
fn immutable_fields_refuse_updates() {
    let ex = examples();
    let (vol, quota) = (&ex[0], &ex[1]);
    let changed = with(
        vol,
        &["spec", "storage", "bucket"],
        json!("https://other.s3.example.com"),
    );
    let errs = validate(&changed, Some(vol));
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.storage cannot change")),
        "{errs:?}"
    );
    let changed = with(vol, &["spec", "format", "blockSizeKiB"], json!(1024));
    let errs = validate(&changed, Some(vol));
    assert!(
        errs.iter().any(|e| e.contains("spec.format cannot change")),
        "{errs:?}"
    );
    let changed = with(quota, &["spec", "volume"], json!("other"));
    let errs = validate(&changed, Some(quota));
    assert!(
        errs.iter().any(|e| e.contains("spec.volume cannot change")),
        "{errs:?}"
    );
    // Capacity may change.
    let grown = with(vol, &["spec", "capacity"], json!("100Ti"));
    assert_eq!(validate(&grown, Some(vol)), Vec::<String>::new());
}

#[test]
fn checked_in_crds_match_the_types() {
    let path = format!(
        "{}/../{}",
        env!("CARGO_MANIFEST_DIR"),
        strata_operator::crd::CHART_CRDS_PATH
    );
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        on_disk,
        strata_operator::crd::crds_yaml().unwrap(),
        "CRDs drifted: run `.ci/k8s-checks.sh --update`"
    );
}

/// A malformed Volume is rejected with a message naming the field (what `kubectl apply`
/// shows), including the bounds that keep the CEL rules within the API server's cost budget.
#[test]
fn malformed_volume_errors_name_the_field() {
    let ex = examples();
    let (vol, cg) = (&ex[0], &ex[2]);
    let many: Vec<String> = (0..33).map(|i| format!("opt-{i}=1")).collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            with(vol, &["spec", "mountOptions"], json!(many)),
            "spec.mountOptions",
            "more than 32 items",
        ),
        (
            with(
                vol,
                &["spec", "mountOptions"],
                json!([format!("a={}", "x".repeat(300))]),
            ),
            "spec.mountOptions[0]",
            "longer than 256",
        ),
        (
            with(vol, &["spec", "mountOptions"], json!(["--buffer-size 600"])),
            "spec.mountOptions",
            "mountOptions are `strata mount` flags",
        ),
        (
            with(vol, &["spec", "name"], json!("x".repeat(64))),
            "spec.name",
            "longer than 63",
        ),
        (
            with(vol, &["spec", "storage", "region"], json!("r".repeat(65))),
            "spec.storage.region",
            "longer than 64",
        ),
        (
            with(vol, &["spec", "capacity"], json!("lots")),
            "spec.capacity",
            "does not match",
        ),
        (
            with(cg, &["spec", "warmupPaths"], json!(["a".repeat(1025)])),
            "spec.warmupPaths[0]",
            "longer than 1024",
        ),
    ];
    for (i, (obj, field, want)) in cases.iter().enumerate() {
        let errs = validate(obj, None);
        assert!(
            errs.iter().any(|e| e.contains(field) && e.contains(want)),
            "case {i}: want {field:?} and {want:?} in one message, got {errs:?}"
        );
    }
}
