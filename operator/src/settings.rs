//! Operator settings (a YAML file from the chart's ConfigMap; every field has a default).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Image of cache members (the one Strata image: strata, strata-csi, strata-operator).
    pub image: String,
    pub image_pull_policy: String,
    /// Seconds between reconciles of a healthy object (usage and health refresh).
    pub resync_secs: u64,
    /// Seconds before retrying an object waiting on a dependency or with a config problem.
    pub retry_secs: u64,
    /// Port of the cache members' Prometheus metrics (scraped for the hit ratio).
    pub member_metrics_port: u16,
    /// Host directory under which cache members mount the volume (`<dir>/<group>`).
    pub cache_group_host_dir: String,
    /// PriorityClass of cache member pods (empty: none).
    pub member_priority_class: String,
    /// CSI driver name written into StorageClasses.
    pub csi_driver: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            image: "ghcr.io/strata-fs/strata:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            resync_secs: 60,
            retry_secs: 20,
            member_metrics_port: 9567,
            cache_group_host_dir: "/var/lib/strata/cache-groups".into(),
            member_priority_class: String::new(),
            csi_driver: "csi.strata.io".into(),
        }
    }
}

impl Settings {
    /// Parse a settings file (YAML or JSON); absent fields take their defaults.
    pub fn from_yaml(text: &str) -> Result<Settings, serde_saphyr::Error> {
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        serde_saphyr::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_fill_defaults_and_reject_unknown_fields() {
        let s = Settings::from_yaml("image: example/strata:1\nresyncSecs: 5\n").unwrap();
        assert_eq!(s.image, "example/strata:1");
        assert_eq!(s.resync_secs, 5);
        assert_eq!(s.csi_driver, "csi.strata.io");
        assert_eq!(Settings::from_yaml("").unwrap(), Settings::default());
        assert!(Settings::from_yaml("imagee: x\n").is_err());
    }
}
