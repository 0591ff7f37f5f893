//! `crdgen`: print the CRD YAML, or write it to a file (`crdgen --out PATH`; the chart keeps
//! it in `charts/strata/crds/strata.io.yaml`, `.ci/k8s-checks.sh --update` rewrites it).

fn main() -> anyhow::Result<()> {
    let yaml = strata_operator::crd::crds_yaml()?;
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => print!("{yaml}"),
        (Some("--out"), Some(path)) => std::fs::write(&path, yaml)?,
        _ => anyhow::bail!("usage: crdgen [--out PATH]"),
    }
    Ok(())
}
