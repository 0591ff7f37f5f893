//! The CRD class of error a real API server finds and a mock does not: CEL rules are costed
//! when the CRD is created, and a rule touching a string or list without `maxLength` /
//! `maxItems` is estimated over the whole request size (3 MiB), which makes the CRD "exceed
//! budget by a factor of more than 100x" and the API server refuses it.
//!
//! Two checks over every CRD schema:
//! 1. bounds: every string, list and map a rule touches is bounded. A rule touches the
//!    subtree of each `self.a.b` / `oldSelf.a.b` path it names (a bare `self`: the whole node
//!    it sits on); at the root, `self.metadata.name` is only bounded when the schema declares
//!    `metadata.name` and `metadata.generateName` (otherwise the API server substitutes
//!    unbounded strings).
//! 2. a rough cost estimate after the API server's method (apiextensions validation,
//!    `k8s.io/apiserver/pkg/cel/common/schemas.go`): a string of `maxLength` N counts 4N bytes,
//!    unbounded strings the request size; traversal costs 0.1 per byte; `matches` multiplies by
//!    a quarter of the regex length; each nested comprehension multiplies by the list size; the
//!    result is multiplied by the product of `maxItems` of the lists above the rule. Each rule
//!    must stay under the per-expression limit (10,000,000) and the sum under the per-CRD
//!    limit (100,000,000).

use kube::CustomResourceExt;
use serde_json::{Value, json};
use strata_operator::crd::all_crds;

/// `StaticEstimatedCostLimit` of apiextensions validation (per expression).
const RULE_COST_LIMIT: f64 = 10_000_000.0;
/// `StaticEstimatedCRDCostLimit` (sum over every rule of a CRD).
const CRD_COST_LIMIT: f64 = 100_000_000.0;
/// `maxRequestSizeBytes` of the API server: the size assumed for unbounded data.
const MAX_REQUEST_BYTES: f64 = 3.0 * 1024.0 * 1024.0;

/// One rule found in a schema: where it sits, its text, and the cardinality (how many times
/// it can run per object: product of the `maxItems` / `maxProperties` above it).
struct Rule {
    path: String,
    rule: String,
    node: Value,
    root: bool,
    cardinality: f64,
}

fn collect_rules(node: &Value, path: &str, cardinality: f64, root: bool, out: &mut Vec<Rule>) {
    for r in node["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push(Rule {
            path: if path.is_empty() {
                "<root>".into()
            } else {
                path.into()
            },
            rule: r["rule"].as_str().unwrap_or_default().to_string(),
            node: node.clone(),
            root,
            cardinality,
        });
    }
    if let Some(props) = node["properties"].as_object() {
        for (k, v) in props {
            collect_rules(v, &format!("{path}.{k}"), cardinality, false, out);
        }
    }
    if node["items"].is_object() {
        let n = list_size(node);
        collect_rules(
            &node["items"],
            &format!("{path}[]"),
            cardinality * n,
            false,
            out,
        );
    }
    if node["additionalProperties"].is_object() {
        let n = node["maxProperties"]
            .as_f64()
            .unwrap_or(MAX_REQUEST_BYTES / 8.0);
        collect_rules(
            &node["additionalProperties"],
            &format!("{path}{{}}"),
            cardinality * n,
            false,
            out,
        );
    }
}

fn list_size(node: &Value) -> f64 {
    // Unbounded: as many of the smallest element as fit in a request.
    node["maxItems"].as_f64().unwrap_or(MAX_REQUEST_BYTES / 3.0)
}

/// Bytes the API server assumes for a string node.
fn string_bytes(node: &Value) -> f64 {
    if let Some(n) = node["maxLength"].as_f64() {
        return n * 4.0;
    }
    if let Some(e) = node["enum"].as_array() {
        return e
            .iter()
            .filter_map(|v| v.as_str())
            .map(|s| s.len() as f64)
            .fold(0.0, f64::max);
    }
    match node["format"].as_str() {
        Some("date") => 10.0,
        Some("date-time") => 32.0,
        Some("duration") => 64.0,
        _ => MAX_REQUEST_BYTES,
    }
}

/// Unbounded strings, lists and maps in the subtree of `node`.
fn unbounded(node: &Value, path: &str, out: &mut Vec<String>) {
    if node["x-kubernetes-int-or-string"] == true && node["maxLength"].is_null() {
        out.push(format!("{path}: int-or-string without maxLength"));
        return;
    }
    if node["x-kubernetes-preserve-unknown-fields"] == true {
        out.push(format!(
            "{path}: preserves unknown fields (cannot be bounded)"
        ));
    }
    match node["type"].as_str() {
        Some("string") if string_bytes(node) >= MAX_REQUEST_BYTES => {
            out.push(format!("{path}: string without maxLength"))
        }
        Some("array") => {
            if node["maxItems"].is_null() {
                out.push(format!("{path}: list without maxItems"));
            }
            unbounded(&node["items"], &format!("{path}[]"), out);
        }
        _ => {}
    }
    if node["additionalProperties"].is_object() {
        if node["maxProperties"].is_null() {
            out.push(format!("{path}: map without maxProperties"));
        }
        unbounded(&node["additionalProperties"], &format!("{path}{{}}"), out);
    }
    if let Some(props) = node["properties"].as_object() {
        for (k, v) in props {
            unbounded(v, &format!("{path}.{k}"), out);
        }
    }
}

/// The nodes a rule touches: for each `self...` / `oldSelf...` path, the node it reaches
/// (field names followed by `(` are method calls, not fields).
fn touched(rule: &Rule) -> Vec<(String, Option<Value>)> {
    let text = rule.rule.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < text.len() {
        let word_start = i == 0 || !(text[i - 1].is_ascii_alphanumeric() || text[i - 1] == b'_');
        let kw = if text[i..].starts_with(b"oldSelf") {
            7
        } else if text[i..].starts_with(b"self") {
            4
        } else {
            0
        };
        let word_end = kw > 0
            && text
                .get(i + kw)
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || *c == b'_'));
        if kw == 0 || !word_start || !word_end {
            i += 1;
            continue;
        }
        let mut j = i + kw;
        let mut node = Some(rule.node.clone());
        let mut path = "self".to_string();
        while j < text.len() && text[j] == b'.' {
            let start = j + 1;
            let mut end = start;
            while end < text.len() && (text[end].is_ascii_alphanumeric() || text[end] == b'_') {
                end += 1;
            }
            if end == start || text.get(end) == Some(&b'(') {
                break;
            }
            let field = std::str::from_utf8(&text[start..end]).unwrap();
            node = node.and_then(|n| {
                let p = &n["properties"][field];
                p.is_object().then(|| p.clone())
            });
            path.push('.');
            path.push_str(field);
            j = end;
        }
        out.push((path, node));
        i = j;
    }
    out
}

/// Problems of one CRD's rules: unbounded data they touch, estimated costs over the limits.
fn check_schema(kind: &str, schema: &Value) -> (Vec<String>, f64) {
    let mut rules = vec![];
    collect_rules(schema, "", 1.0, true, &mut rules);
    let mut problems = vec![];
    let mut total = 0.0;
    for r in &rules {
        let mut rule_unbounded = vec![];
        let mut traversal = 0.0;
        let mut max_list: f64 = 1.0;
        for (p, node) in touched(r) {
            match node {
                Some(n) => {
                    unbounded(&n, &format!("{}.{p}", r.path), &mut rule_unbounded);
                    traversal += traversal_cost(&n);
                    max_list = max_list.max(largest_list(&n));
                }
                None if r.root && p.starts_with("self.metadata.") => {
                    rule_unbounded.push(format!(
                        "{p}: metadata.name/generateName not declared with maxLength at the root (the API server assumes the request size)"
                    ));
                    traversal += MAX_REQUEST_BYTES * 0.1;
                }
                None => {}
            }
        }
        let regex_factor = regex_literals(&r.rule)
            .map(|l| (l as f64 * 0.25).ceil())
            .fold(1.0, f64::max);
        let comprehensions = [".all(", ".exists(", ".exists_one(", ".map(", ".filter("]
            .iter()
            .map(|m| r.rule.matches(m).count())
            .sum::<usize>();
        let nesting = max_list.powi(comprehensions.saturating_sub(1) as i32);
        let cost = r.cardinality * (traversal + 1.0) * regex_factor * nesting;
        total += cost;
        for u in rule_unbounded {
            problems.push(format!("{kind}: rule `{}` at {}: {u}", r.rule, r.path));
        }
        if cost > RULE_COST_LIMIT {
            problems.push(format!(
                "{kind}: rule `{}` at {}: estimated cost {cost:.0} > {RULE_COST_LIMIT}",
                r.rule, r.path
            ));
        }
    }
    if total > CRD_COST_LIMIT {
        problems.push(format!(
            "{kind}: estimated cost of all rules {total:.0} > {CRD_COST_LIMIT}"
        ));
    }
    (problems, total)
}

/// Cost of visiting every byte / element of a node once (0.1 per string byte).
fn traversal_cost(node: &Value) -> f64 {
    match node["type"].as_str() {
        Some("string") => (string_bytes(node) * 0.1).ceil(),
        Some("array") => list_size(node) * (traversal_cost(&node["items"]) + 1.0),
        _ => {
            let mut c = 1.0;
            if let Some(props) = node["properties"].as_object() {
                c += props.values().map(traversal_cost).sum::<f64>();
            }
            if node["additionalProperties"].is_object() {
                let n = node["maxProperties"]
                    .as_f64()
                    .unwrap_or(MAX_REQUEST_BYTES / 8.0);
                c += n * (traversal_cost(&node["additionalProperties"]) + 1.0);
            }
            c
        }
    }
}

fn largest_list(node: &Value) -> f64 {
    let mut m: f64 = 1.0;
    if node["type"] == "array" {
        m = m.max(list_size(node));
        m = m.max(largest_list(&node["items"]));
    }
    if let Some(props) = node["properties"].as_object() {
        for v in props.values() {
            m = m.max(largest_list(v));
        }
    }
    m
}

/// Lengths of the string literals passed to `matches(...)`.
fn regex_literals(rule: &str) -> impl Iterator<Item = usize> + '_ {
    rule.match_indices("matches(").filter_map(move |(i, m)| {
        let rest = &rule[i + m.len()..];
        let q = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        rest[1..].find(q)
    })
}

fn schema_of(crd: &Value) -> Value {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn every_rule_of_every_crd_touches_only_bounded_data_and_fits_the_cost_budget() {
    let mut problems = vec![];
    for crd in all_crds() {
        let v = serde_json::to_value(&crd).unwrap();
        let kind = v["spec"]["names"]["kind"].as_str().unwrap().to_string();
        for version in v["spec"]["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            let (p, total) = check_schema(&kind, schema);
            problems.extend(p);
            eprintln!("{kind}: estimated CEL cost {total:.0}");
        }
    }
    assert_eq!(problems, Vec::<String>::new());
}

/// The check itself finds the defect the API server reported (unbounded mountOptions, an
/// undeclared metadata.name under a root rule, an unbounded list under a nested
/// comprehension), so it cannot pass vacuously.
#[test]
fn the_check_finds_unbounded_data_under_rules() {
    let bad = json!({
        "type": "object",
        "x-kubernetes-validations": [{"rule": "self.metadata.name.matches('^[a-z]+$')"}],
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "mountOptions": {
                        "type": "array",
                        "items": {"type": "string"},
                        "x-kubernetes-validations": [{"rule": "self.all(o, o.matches('^[a-z][a-z0-9-]*(=[^,]+)?$'))"}]
                    },
                    "classes": {
                        "type": "array",
                        "maxItems": 8,
                        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
                        "x-kubernetes-validations": [{"rule": "self.all(x, self.exists_one(y, y.name == x.name))"}]
                    },
                    "region": {"type": "string"},
                    "fine": {
                        "type": "object",
                        "properties": {"a": {"type": "string", "maxLength": 10}, "b": {"type": "string"}},
                        "x-kubernetes-validations": [{"rule": "self.a != 'x'"}]
                    }
                }
            }
        }
    });
    let (problems, total) = check_schema("Bad", &bad);
    let has = |s: &str| problems.iter().any(|p| p.contains(s));
    assert!(has("self.metadata.name: metadata.name"), "{problems:#?}");
    assert!(
        has("spec.mountOptions.self: list without maxItems"),
        "{problems:#?}"
    );
    assert!(
        has("spec.mountOptions.self[]: string without maxLength"),
        "{problems:#?}"
    );
    assert!(
        has("spec.classes.self[].name: string without maxLength"),
        "{problems:#?}"
    );
    assert!(has("estimated cost of all rules"), "{total} {problems:#?}");
    // `self.a` is bounded; the unbounded sibling `b` is not touched by that rule.
    assert!(!problems.iter().any(|p| p.contains(".b:")), "{problems:#?}");
    // region is touched by no rule.
    assert!(!has("region"), "{problems:#?}");

    // The same schema bounded passes.
    let mut good = bad.clone();
    good["properties"]["metadata"] = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 253},
        "generateName": {"type": "string", "maxLength": 253}}});
    let mo = &mut good["properties"]["spec"]["properties"]["mountOptions"];
    mo["maxItems"] = json!(32);
    mo["items"]["maxLength"] = json!(256);
    good["properties"]["spec"]["properties"]["classes"]["items"]["properties"]["name"]["maxLength"] =
        json!(253);
    let (problems, total) = check_schema("Good", &good);
    assert_eq!(problems, Vec::<String>::new());
    assert!(total < RULE_COST_LIMIT, "{total}");
}

/// The root schema declares metadata.name bounded (the API server then uses our maxLength for
/// the root rules' `self.metadata.name`), with apiVersion and kind, which it also requires
/// before it keeps the declared metadata.
#[test]
fn root_schemas_declare_bounded_object_meta() {
    for crd in [
        strata_operator::crd::Volume::crd(),
        strata_operator::crd::CacheGroup::crd(),
    ] {
        let name = crd.spec.names.kind.clone();
        let declared = all_crds()
            .into_iter()
            .find(|c| c.spec.names.kind == name)
            .unwrap();
        let s = schema_of(&serde_json::to_value(&declared).unwrap());
        assert_eq!(s["properties"]["apiVersion"]["type"], "string", "{name}");
        assert_eq!(s["properties"]["kind"]["type"], "string", "{name}");
        for f in ["name", "generateName"] {
            assert_eq!(
                s["properties"]["metadata"]["properties"][f]["type"],
                "string"
            );
            assert_eq!(
                s["properties"]["metadata"]["properties"][f]["maxLength"],
                253
            );
        }
    }
}
