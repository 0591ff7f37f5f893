fn main() {
    print!("{}", strata_operator::crd::crds_yaml().unwrap());
}
