//! The custom resources of group `strata.io`, version `v1alpha1`: [`Volume`] (cluster-scoped),
//! [`Quota`] (namespaced: the namespace is the tenant) and [`CacheGroup`] (cluster-scoped).
//! The CRD YAML in `charts/strata/crds/` is generated from these types by `crdgen`;
//! validation rules (OpenAPI and CEL) live here so the API server rejects malformed objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Strata resource.
pub const GROUP: &str = "strata.io";
/// Finalizer the operator puts on each of its resources.
pub const FINALIZER: &str = "strata.io/cleanup";
/// Label on every object the operator creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "strata-operator");
/// Label naming the Volume an owned object belongs to.
pub const VOLUME_LABEL: &str = "strata.io/volume";
/// Label naming the CacheGroup of cache member pods.
pub const CACHE_GROUP_LABEL: &str = "strata.io/cache-group";

/// Kubernetes quantity: plain bytes or a number with a suffix (binary Ki..Ei or decimal k..E).
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

// ------------------------------------------------------------------------------------ Volume

/// A Strata file system: where its metadata and objects live, how it is formatted, and the
/// StorageClass(es) through which PVCs use it. The operator formats it if it is new, adopts
/// it if it already exists with the same name, and never reformats it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "Volume",
    status = "VolumeStatus",
    shortname = "svol",
    category = "strata",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Storage","type":"string","jsonPath":".spec.storage.type"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.usage"}"#,
    printcolumn = r#"{"name":"Inodes","type":"integer","jsonPath":".status.usedInodes"}"#,
    printcolumn = r#"{"name":"Clients","type":"integer","jsonPath":".status.clients"}"#,
    printcolumn = r#"{"name":"Mirror","type":"string","jsonPath":".status.mirror.phase"}"#,
    printcolumn = r#"{"name":"UUID","type":"string","priority":1,"jsonPath":".status.uuid"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("has(self.spec.name) || self.metadata.name.matches('^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$')").message("a Volume name is the file-system name: use 3-63 characters of a-z, 0-9 and '-', not starting or ending with '-' (or set spec.name)").field_path(".metadata.name")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.storage.type == oldSelf.storage.type && self.storage.bucket == oldSelf.storage.bucket && (has(self.storage.endpoint) ? self.storage.endpoint : '') == (has(oldSelf.storage.endpoint) ? oldSelf.storage.endpoint : '')) || (has(oldSelf.mirror) && self.storage.type == oldSelf.mirror.storage.type && self.storage.bucket == oldSelf.mirror.storage.bucket && (has(self.storage.endpoint) ? self.storage.endpoint : '') == (has(oldSelf.mirror.storage.endpoint) ? oldSelf.mirror.storage.endpoint : ''))").message("spec.storage cannot change after the volume is created, except to the location of spec.mirror once the mirror is the primary (docs/MIGRATION.md)").field_path(".storage"))]
pub struct VolumeSpec {
    /// File-system name inside the metadata (default: the object name). An existing volume
    /// is adopted when this name matches the one it was formatted with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$')").message("spec.name must be 3-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.name cannot change: the volume was formatted with it"))]
    pub name: Option<String>,
    /// Secret with key `metaurl` (the metadata URL) and, for S3, `access-key`, `secret-key`
    /// and optionally `session-token`. The same Secret is handed to the CSI driver.
    pub credentials_secret_ref: SecretRef,
    pub storage: StorageSpec,
    /// Options used when the volume is formatted; they cannot change afterwards.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.format cannot change after the volume is created"))]
    pub format: FormatSpec,
    /// Capacity limit of the whole volume (a quantity like `10Ti`; absent or 0 = unlimited).
    /// Rounded up to GiB. Changing it changes the volume's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"),
        length(max = 64)
    )]
    pub capacity: Option<String>,
    /// Inode limit of the whole volume (absent or 0 = unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
    /// Default `strata mount` options for every PVC of this volume: flags without dashes,
    /// e.g. `buffer-size=600`, `attr-cache=5`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    #[x_kube(validation = Rule::new("self.all(o, o.matches('^[a-z][a-z0-9-]*(=[^,]+)?$'))").message("mountOptions are `strata mount` flags without dashes, like buffer-size=600 or read-only"))]
    pub mount_options: Vec<String>,
    /// Local cache of the mount clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// StorageClasses to create for this volume (default: one named after the Volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y.name == x.name))").message("storageClasses names must be unique"))]
    pub storage_classes: Vec<StorageClassSpec>,
    /// What happens to the data when the Volume object is deleted: `Retain` (default: the
    /// metadata and objects stay and can be adopted again) or `Delete` (every file is removed
    /// and the volume's objects are deleted from the bucket).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Buckets that other systems write, attached as read-only directories of the volume
    /// (`strata attach`, docs/DATASETS.md): read in place through the caches, no copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub datasets: Vec<DatasetSpec>,
    /// A second object store (another cloud) that every new object also goes to, while the
    /// volume's clients copy the existing ones over (docs/MIGRATION.md). Progress in
    /// `status.mirror`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorSpec>,
    /// Which store is the primary: `Storage` (default, `spec.storage`) or `Mirror`. Setting
    /// `Mirror` switches every running mount to the mirror within seconds, once the mirror
    /// is up to date (the operator waits until then). To retire the old store afterwards,
    /// set `spec.storage` to the mirror's location and remove `spec.mirror` and this field.
    #[serde(default)]
    pub primary: PrimaryStore,
}

/// Which of `spec.storage` and `spec.mirror` is the primary store.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PrimaryStore {
    #[default]
    Storage,
    Mirror,
}

/// The mirror store of a Volume; its keys come from the Volume's Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorSpec {
    pub storage: StorageSpec,
    /// Key of the Secret holding the mirror's access key (default `mirror-access-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub access_key_key: Option<String>,
    /// Key of the Secret holding the mirror's secret key (default `mirror-secret-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_key_key: Option<String>,
}

/// The volume's stores as reconciled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MirrorStatus {
    /// `Copying` (existing objects go to the mirror), `InSync` (every object is in both),
    /// `Switching` (waiting to make the mirror the primary), `Detaching` (waiting for the
    /// backlog to drain before the mirror is removed), `Detached`.
    pub phase: String,
    /// The primary store's location.
    pub primary: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    pub copy_done: bool,
    pub objects_compared: u64,
    pub objects_copied: u64,
    pub bytes_copied: u64,
    /// Objects one of the stores may lack, waiting for the copier.
    pub backlog: u64,
    /// Who copies now (a client of the volume), if anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A source attached to a directory of the volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.path.startsWith('/') && !self.path.contains('..') && self.path != '/'").message("datasets[].path is an absolute path below the volume root without '..', e.g. /datasets/web"))]
#[x_kube(validation = Rule::new("self.source.startsWith('s3://')").message("datasets[].source is s3://BUCKET[/PREFIX]"))]
pub struct DatasetSpec {
    /// Directory of the volume the source appears at, e.g. `/datasets/web` (created; its
    /// parents are created too).
    #[schemars(length(min = 2, max = 1024))]
    pub path: String,
    /// `s3://BUCKET[/PREFIX]`.
    #[schemars(length(min = 6, max = 1024))]
    pub source: String,
    /// S3 endpoint URL, e.g. `http://seaweedfs.storage:8333` (default: AWS in `region`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Keys of the Volume's credentials Secret holding the source's access and secret key
    /// (default `access-key` and `secret-key`: the volume's own store keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_key: Option<String>,
    /// Seconds a directory's listing is trusted before an access lists it again (default
    /// 600; 0: only the first access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_seconds: Option<u64>,
}

/// An attached source as reconciled.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetStatus {
    pub path: String,
    pub source: String,
    /// The attachment id in the volume (`strata attach --list`).
    pub attachment: u32,
}

/// A reference to a Secret in a namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// Object storage backend kind.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// A directory (on a shared file system for more than one node).
    File,
    /// S3 or an S3-compatible store.
    #[default]
    S3,
}

/// Where the volume's objects live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type != 's3' || has(self.endpoint) || self.bucket.startsWith('http://') || self.bucket.startsWith('https://')").message("for type s3 give bucket as a URL (https://bucket.s3.example.com or http://host:port/bucket) or set endpoint"))]
#[x_kube(validation = Rule::new("self.type != 'file' || !has(self.endpoint)").message("endpoint is only for type s3"))]
pub struct StorageSpec {
    #[serde(rename = "type", default)]
    pub type_: StorageType,
    /// `s3`: a bucket URL, or a bucket name with `endpoint`. `file`: a directory.
    #[schemars(length(min = 1, max = 1024))]
    pub bucket: String,
    /// S3 endpoint (`https://s3.example.com`); the bucket URL is `endpoint/bucket` (path style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/?#]+/?$"), length(max = 1024))]
    pub endpoint: Option<String>,
    /// S3 signing region (default us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub region: Option<String>,
}

impl StorageSpec {
    /// The bucket as `strata format --bucket` takes it.
    pub fn bucket_url(&self) -> String {
        match &self.endpoint {
            Some(ep) => format!("{}/{}", ep.trim_end_matches('/'), self.bucket),
            None => self.bucket.clone(),
        }
    }
}

/// Format options (fixed at creation).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FormatSpec {
    /// Block size in KiB: a power of two from 64 to 16384.
    #[serde(default = "default_block_size")]
    #[x_kube(validation = Rule::new("self in [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]").message("blockSizeKiB must be a power of two from 64 to 16384 (default 4096)"))]
    pub block_size_ki_b: u32,
}

fn default_block_size() -> u32 {
    4096
}

impl Default for FormatSpec {
    fn default() -> Self {
        FormatSpec {
            block_size_ki_b: default_block_size(),
        }
    }
}

/// Local cache of the mount clients of a volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Cache directory on the node (`--cache-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub dir: Option<String>,
    /// Cache size in MiB (`--cache-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub size_mi_b: Option<u64>,
}

/// A StorageClass for the CSI driver.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageClassSpec {
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("a StorageClass name is a DNS subdomain: a-z, 0-9, '-' and '.'"))]
    pub name: String,
    /// Make it the cluster's default StorageClass.
    #[serde(default)]
    pub is_default: bool,
    /// Where a PVC lands in the volume (CSI `pathPattern`; default
    /// `tenants/${pvc.namespace}/${pv.name}`, which puts PVCs under their tenant's Quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub path_pattern: Option<String>,
    /// What the CSI driver does with a PVC's directory when the PV is deleted.
    #[serde(default)]
    pub on_delete: OnDelete,
    /// PV reclaim policy.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    /// Extra `strata mount` options for this class (added to the Volume's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub mount_options: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    #[default]
    Delete,
    Retain,
    Archive,
}

impl OnDelete {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReclaimPolicy {
    #[default]
    Delete,
    Retain,
}

impl ReclaimPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReclaimPolicy::Delete => "Delete",
            ReclaimPolicy::Retain => "Retain",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Retain,
    Delete,
}

/// Observed state of a Volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// UUID of the formatted file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Whether the operator formatted the volume or adopted an existing one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_inodes: Option<u64>,
    /// Capacity in bytes (absent: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_bytes: Option<u64>,
    /// Clients (mounts, gateways, cache members) with a live session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<u64>,
    /// Human-readable usage, e.g. `1.5Gi / 10Ti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
    /// StorageClasses the operator maintains for this volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub storage_classes: Vec<String>,
    /// Attached sources (`spec.datasets`) as reconciled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<DatasetStatus>,
    /// The mirror (`spec.mirror`, `spec.primary`) as reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorStatus>,
}

// ------------------------------------------------------------------------------------- Quota

/// A tenant quota: the namespace's directory `tenants/<namespace>` in a Volume gets a
/// directory quota; PVCs of the namespace are provisioned below it (StorageClass
/// `pathPattern` default), so together they cannot use more than the quota.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "Quota",
    namespaced,
    status = "QuotaStatus",
    shortname = "squota",
    category = "strata",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.usage"}"#,
    printcolumn = r#"{"name":"Inodes","type":"string","jsonPath":".status.inodeUsage"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.capacity) || has(self.inodes)").message("set capacity, inodes or both"))]
pub struct QuotaSpec {
    /// Name of the Volume.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.volume cannot change; delete the Quota and create another"))]
    pub volume: String,
    /// Bytes the tenant may use (a quantity like `500Gi`; 0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"),
        length(max = 64)
    )]
    pub capacity: Option<String>,
    /// Inodes (files, directories, ...) the tenant may use (0 = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inodes: Option<u64>,
}

/// Observed state of a Quota.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Directory inside the volume that carries the quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_bytes: Option<u64>,
    /// Absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_inodes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_inodes: Option<u64>,
    /// Human-readable, e.g. `12Gi / 500Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode_usage: Option<String>,
}

// -------------------------------------------------------------------------------- CacheGroup

/// A distributed cache for a Volume: a DaemonSet of cache members (`strata mount
/// --cache-group NAME`) on the selected nodes, each with a local cache medium; clients on
/// those nodes join the group through the mount options in `status.clientMountOptions` (or
/// the StorageClass named by `storageClassName`, which carries them).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "strata.io",
    version = "v1alpha1",
    kind = "CacheGroup",
    status = "CacheGroupStatus",
    shortname = "scg",
    category = "strata",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Members","type":"string","jsonPath":".status.members"}"#,
    printcolumn = r#"{"name":"Hit","type":"string","jsonPath":".status.hitRatio"}"#,
    printcolumn = r#"{"name":"Cached","type":"string","jsonPath":".status.cached"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$')").message("a CacheGroup name is used in DaemonSet names and --cache-group: 1-42 characters of a-z, 0-9 and '-'").field_path(".metadata.name")
)]
#[serde(rename_all = "camelCase")]
pub struct CacheGroupSpec {
    /// Name of the Volume.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.volume cannot change; create another CacheGroup"))]
    pub volume: String,
    /// Nodes that run a cache member.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Where each member keeps its cache.
    pub medium: CacheMedium,
    /// Cache size per node (a quantity like `200Gi`); rounded down to MiB.
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size_per_node: String,
    /// Paths inside the volume loaded into the cache when a member starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 1024)))]
    #[x_kube(validation = Rule::new("self.all(p, !p.contains('..') && !p.startsWith('/'))").message("warmupPaths are relative paths inside the volume without '..'"))]
    pub warmup_paths: Vec<String>,
    /// Members serving each hot block (1 = only its owner).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: u32,
    /// Port the members serve blocks on (host network).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: u16,
    /// Create a StorageClass of this name whose mounts join the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Member resources (CPU/memory requests and limits); defaults in the operator settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
}

fn default_replicas() -> u32 {
    2
}

fn default_port() -> u16 {
    9568
}

/// Cache medium: a host directory or a generic ephemeral volume (exactly one).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.hostPath) != has(self.ephemeral)").message("medium needs exactly one of hostPath or ephemeral"))]
pub struct CacheMedium {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathMedium>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<EphemeralMedium>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct HostPathMedium {
    /// Directory on the node (created if missing).
    #[schemars(regex(pattern = r"^/[^\x00]*$"), length(max = 4096))]
    pub path: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EphemeralMedium {
    /// StorageClass of the per-pod volume (default: the cluster default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
}

/// Observed state of a CacheGroup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheGroupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_ready: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_desired: Option<i32>,
    /// `ready/desired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<String>,
    /// Cache hits / (hits + misses) over the members, e.g. `0.93` (absent until scraped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hit_ratio: Option<String>,
    /// Bytes in the members' disk caches together (absent until scraped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_bytes: Option<i64>,
    /// `cachedBytes` for people, e.g. `12.5Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached: Option<String>,
    /// Options a client on the group's nodes adds to `strata mount` to use the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_mount_options: Option<String>,
}

/// Longest object name the API server accepts for these resources (a DNS subdomain).
pub const MAX_NAME_LENGTH: i64 = 253;

/// Declare `apiVersion`, `kind` and `metadata.{name,generateName}` (bounded) in the root
/// schema. Without them the API server's CEL cost estimator assumes an unbounded
/// `metadata.name` (the whole request size) and a root rule reading it (`matches`) exceeds
/// the cost budget; with them it uses `maxLength`. Only `name` and `generateName` may be
/// restricted under `metadata` in a structural schema.
fn declare_object_meta(crd: &mut CustomResourceDefinition) {
    let string = |max: Option<i64>| JSONSchemaProps {
        type_: Some("string".into()),
        max_length: max,
        ..Default::default()
    };
    for v in &mut crd.spec.versions {
        let Some(root) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let props = root.properties.get_or_insert_with(Default::default);
        props.insert("apiVersion".into(), string(None));
        props.insert("kind".into(), string(None));
        props.insert(
            "metadata".into(),
            JSONSchemaProps {
                type_: Some("object".into()),
                properties: Some(
                    [
                        ("name".to_string(), string(Some(MAX_NAME_LENGTH))),
                        ("generateName".to_string(), string(Some(MAX_NAME_LENGTH))),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
        );
    }
}

/// Drop the `format`s schemars writes for unsigned integers (`uint16`, `uint32`, `uint64`):
/// the API server does not know them and warns on every apply (`minimum: 0` stays).
fn drop_unknown_formats(s: &mut JSONSchemaProps) {
    if s.format.as_deref().is_some_and(|f| f.starts_with("uint")) {
        s.format = None;
    }
    for p in s.properties.iter_mut().flat_map(|p| p.values_mut()) {
        drop_unknown_formats(p);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(i)) = s.items.as_mut() {
        drop_unknown_formats(i);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = s.additional_properties.as_mut() {
        drop_unknown_formats(a);
    }
}

/// The three CRDs, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![Volume::crd(), Quota::crd(), CacheGroup::crd()];
    for crd in &mut crds {
        declare_object_meta(crd);
        for v in &mut crd.spec.versions {
            if let Some(root) = v
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                drop_unknown_formats(root);
            }
        }
    }
    crds
}

/// Where `crdgen --out` writes the CRDs in the repository (Helm's `crds/` directory: installed
/// before the templates, skipped by `--skip-crds`, never upgraded or deleted by Helm).
pub const CHART_CRDS_PATH: &str = "charts/strata/crds/strata.io.yaml";

/// The CRDs as one multi-document YAML, with a header naming the generator.
pub fn crds_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let mut out = String::from(
        "# Generated by `cargo run -p strata-operator --bin crdgen`; do not edit.\n\
         # Helm installs these before the chart's templates and never upgrades them: on upgrade\n\
         # run `kubectl apply --server-side -f charts/strata/crds/` first (docs/OPERATOR.md).\n",
    );
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

/// Bytes of a Kubernetes quantity string (validated by [`QUANTITY_PATTERN`]).
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mul: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return None,
    };
    if num.is_empty() || num.matches('.').count() > 1 {
        return None;
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let int: u64 = int.parse().ok()?;
    let mut bytes = int.checked_mul(mul)?;
    if !frac.is_empty() {
        let f: f64 = format!("0.{frac}").parse().ok()?;
        bytes = bytes.checked_add((f * mul as f64).round() as u64)?;
    }
    Some(bytes)
}

/// `1.5Gi`-style rendering of a byte count.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if b < 1024 {
        return format!("{b}");
    }
    let mut v = b as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    let s = format!("{v:.1}");
    let s = s.strip_suffix(".0").unwrap_or(&s);
    format!("{s}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_to_bytes() {
        assert_eq!(parse_quantity("0"), Some(0));
        assert_eq!(parse_quantity("100"), Some(100));
        assert_eq!(parse_quantity("100Mi"), Some(100 << 20));
        assert_eq!(parse_quantity("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_quantity("2T"), Some(2_000_000_000_000));
        assert_eq!(parse_quantity("1x"), None);
        assert_eq!(parse_quantity("Gi"), None);
        assert_eq!(parse_quantity("1.2.3Gi"), None);
        assert_eq!(parse_quantity("99999999999Ei"), None);
    }

    #[test]
    fn bytes_render_human_readably() {
        assert_eq!(human_bytes(512), "512");
        assert_eq!(human_bytes(1 << 30), "1Gi");
        assert_eq!(human_bytes(3 << 29), "1.5Gi");
        assert_eq!(human_bytes(10 << 40), "10Ti");
    }

    #[test]
    fn bucket_url_joins_endpoint_and_bucket() {
        let s = StorageSpec {
            type_: StorageType::S3,
            bucket: "models".into(),
            endpoint: Some("https://s3.example.com/".into()),
            region: None,
        };
        assert_eq!(s.bucket_url(), "https://s3.example.com/models");
    }
}
