//! Conformance test in the spirit of csi-sanity: drives the real `strata-csi` binary over its
//! unix socket the way kubelet and the external provisioner/resizer do, with real FUSE mounts
//! in process mode: Identity; Controller create/validate/expand/capacity/delete with
//! idempotency and bad arguments; Node stage/publish/stats/unpublish/unstage with
//! idempotency and bad arguments; and a mount client killed under a published volume.

mod common;

use std::collections::HashMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use strata_csi::csi::controller_client::ControllerClient;
use strata_csi::csi::identity_client::IdentityClient;
use strata_csi::csi::node_client::NodeClient;
use strata_csi::csi::{self, volume_capability};
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_sanity_groups_with_real_mounts() {
    let Some((_dir, root, meta)) = mount_test("csivol") else {
        return;
    };
    let sock = root.join("csi.sock");
    let state = root.join("state");
    let metaurl_file = root.join("metaurl");
    fs::write(&metaurl_file, format!("{meta}\n")).unwrap();
    let mut g = Guard {
        plugin: None,
        dir: root.clone(),
    };
    g.plugin = Some(
        plugin_command(&root)
            .args([
                "--controller",
                "--node",
                "--node-id",
                "node-1",
                "--topology",
                "topology.strata.io/region=r1",
            ])
            .arg("--default-metaurl-file")
            .arg(&metaurl_file)
            .spawn()
            .unwrap(),
    );
    let ch = channel(&sock, &root.join("plugin.log")).await;
    let mut id = IdentityClient::new(ch.clone());
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());
    use volume_capability::access_mode::Mode;
    let caps = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    let secrets: HashMap<String, String> = HashMap::from([("metaurl".into(), meta.clone())]);

    // ---- Identity
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.strata.io");
    assert!(!info.vendor_version.is_empty());
    let p = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(p.ready, Some(true));
    let pc = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pc.capabilities.len(), 2);

    // ---- Controller: bad arguments
    let base = csi::CreateVolumeRequest {
        name: "pvc-1".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: caps.clone(),
        parameters: HashMap::from([("csi.storage.k8s.io/pvc/namespace".into(), "team-a".into())]),
        secrets: secrets.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(
            ctl.create_volume(csi::CreateVolumeRequest {
                name: String::new(),
                ..base.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(csi::CreateVolumeRequest {
                volume_capabilities: vec![],
                ..base.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.create_volume(csi::CreateVolumeRequest {
                secrets: HashMap::new(),
                ..base.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let mut bad = base.clone();
    bad.parameters
        .insert("mountOptions".into(), "cache-size=10,bogus-flag=1".into());
    let e = ctl.create_volume(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("bogus-flag"), "{}", e.message());
    // The StorageClass's `mountOptions:` list (the capability's mount_flags), checked with
    // the parameter when the PV is provisioned.
    let mut bad = base.clone();
    bad.volume_capabilities = vec![mount_cap_with_flags(
        Mode::MultiNodeMultiWriter,
        &["--nope=1"],
    )];
    let e = ctl.create_volume(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"nope\""), "{}", e.message());
    let block = csi::VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(Default::default())),
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    };
    assert_eq!(
        code(
            ctl.create_volume(csi::CreateVolumeRequest {
                volume_capabilities: vec![block],
                ..base.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // ---- Controller: create, idempotency, incompatible size
    let v = ctl
        .create_volume(base.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "csivol/tenants/team-a/pvc-1");
    assert_eq!(v.capacity_bytes, 1 << 20);
    // The node-side parameters reach NodeStageVolume through the volume context.
    let with_opts = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "pvc-opts".into(),
            parameters: HashMap::from([
                ("csi.storage.k8s.io/pvc/namespace".into(), "team-a".into()),
                ("mountOptions".into(), "writeback,cache-size=64".into()),
                ("cacheDir".into(), "/var/cache/strata".into()),
            ]),
            ..base.clone()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        with_opts
            .volume_context
            .get("mountOptions")
            .map(String::as_str),
        Some("writeback,cache-size=64")
    );
    assert_eq!(
        with_opts.volume_context.get("cacheDir").map(String::as_str),
        Some("/var/cache/strata")
    );
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: with_opts.volume_id.clone(),
        secrets: secrets.clone(),
    })
    .await
    .unwrap();
    let v2 = ctl
        .create_volume(base.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v2.volume_id, v.volume_id);
    // ListVolumes (the volume of --default-metaurl-file): the new volume, with its size.
    let listed = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, vec![v.volume_id.clone()]);
    assert_eq!(
        listed.entries[0].volume.as_ref().unwrap().capacity_bytes,
        1 << 20
    );
    assert_eq!(
        code(
            ctl.list_volumes(csi::ListVolumesRequest {
                starting_token: "invalid-token".into(),
                ..Default::default()
            })
            .await
        ),
        Code::Aborted
    );
    let mut other = base.clone();
    other.capacity_range = Some(csi::CapacityRange {
        required_bytes: 5 << 20,
        limit_bytes: 0,
    });
    assert_eq!(code(ctl.create_volume(other).await), Code::AlreadyExists);

    // ---- Controller: validate, capacity, capabilities
    let vr = ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_context: v.volume_context.clone(),
            volume_capabilities: caps.clone(),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(vr.confirmed.is_some());
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: "csivol/volumes/missing".into(),
                volume_capabilities: caps.clone(),
                secrets: secrets.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                secrets: secrets.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    ctl.get_capacity(csi::GetCapacityRequest {
        volume_capabilities: caps.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let cc = ctl
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(cc.capabilities.len() >= 3);
    assert_eq!(
        code(
            ctl.list_snapshots(csi::ListSnapshotsRequest::default())
                .await
        ),
        Code::Unimplemented
    );

    // ---- Node: info, capabilities, bad arguments
    let ni = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "node-1");
    assert_eq!(
        ni.accessible_topology.unwrap().segments["topology.strata.io/region"],
        "r1"
    );
    let nc = node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(nc.capabilities.len() >= 4);
    let staging = root.join("kubelet/staging/pv1");
    let target = root.join("kubelet/pods/p1/volumes/pv1");
    fs::create_dir_all(&staging).unwrap();
    let stage = csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(caps[0].clone()),
        secrets: secrets.clone(),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: String::new(),
                ..stage.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..stage.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_capability: None,
                ..stage.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let publish = csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(caps[0].clone()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(node.node_publish_volume(publish.clone()).await),
        Code::FailedPrecondition,
        "publish before stage"
    );
    assert_eq!(
        code(
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                target_path: String::new(),
                ..publish.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // ---- A stage that fails (a directory the volume does not have) leaves nothing: no
    // staging bind mount, no shared mount, no client, no spec.json with the META_URL.
    let bad_staging = root.join("kubelet/staging/missing");
    fs::create_dir_all(&bad_staging).unwrap();
    let e = node
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "static-missing".into(),
            staging_target_path: bad_staging.to_string_lossy().into(),
            volume_context: HashMap::from([("subdir".into(), "does/not/exist".into())]),
            ..stage.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root_s = root.to_string_lossy().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&root_s)),
        "a failed stage left a mount: {mounts}"
    );
    assert_eq!(fs::read_dir(state.join("volumes")).unwrap().count(), 0);
    let t = Instant::now();
    while !client_pids(&state).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "client left running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ---- Node: stage, publish (twice each), I/O through the target
    node.node_stage_volume(stage.clone()).await.unwrap();
    node.node_stage_volume(stage.clone()).await.unwrap();
    node.node_publish_volume(publish.clone()).await.unwrap();
    node.node_publish_volume(publish.clone()).await.unwrap();
    fs::write(target.join("hello.txt"), b"through the target").unwrap();
    assert_eq!(
        fs::read(target.join("hello.txt")).unwrap(),
        b"through the target"
    );
    // The mount reads ahead 4 MiB, not the kernel's 128 KiB (its backing device in sysfs).
    assert_eq!(read_ahead_kib(&target, "4096"), "4096");
    // A read-only publication of the same staged volume.
    let ro_target = root.join("kubelet/pods/p2/volumes/pv1");
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        target_path: ro_target.to_string_lossy().into(),
        readonly: true,
        ..publish.clone()
    })
    .await
    .unwrap();
    assert_eq!(
        fs::read(ro_target.join("hello.txt")).unwrap(),
        b"through the target"
    );
    assert!(
        fs::write(ro_target.join("no.txt"), b"x").is_err(),
        "read-only target accepted a write"
    );

    // ---- Node: stats (quota) and expansion
    let stats = |node: &mut NodeClient<Channel>| {
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            ..Default::default()
        };
        let mut n = node.clone();
        async move { n.node_get_volume_stats(req).await }
    };
    let s = stats(&mut node).await.unwrap().into_inner();
    assert!(!s.volume_condition.as_ref().unwrap().abnormal);
    let bytes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert_eq!(bytes.total, 1 << 20, "{s:?}");
    let inodes = s
        .usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32)
        .unwrap();
    assert!(inodes.used >= 1);
    assert_eq!(
        code(
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: root.join("nowhere").to_string_lossy().into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let ex = ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 4 << 20,
                limit_bytes: 0,
            }),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.capacity_bytes, 4 << 20);
    assert!(!ex.node_expansion_required);
    assert_eq!(
        code(
            ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: secrets.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: "csivol/volumes/none".into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 1,
                    limit_bytes: 0
                }),
                secrets: secrets.clone(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    // The quota cache of the statfs path is re-read within about 2 s.
    let t = Instant::now();
    loop {
        let s = stats(&mut node).await.unwrap().into_inner();
        if s.usage[0].total == 4 << 20 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "expanded capacity not visible: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // ---- Kill the mount client under the published volume
    let pids = client_pids(&state);
    assert_eq!(pids.len(), 1, "one shared mount client expected: {pids:?}");
    // SAFETY: kill of a pid we found.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    let killed = Instant::now();
    let got = read_within(target.join("hello.txt"), Duration::from_secs(5));
    assert_eq!(
        got.as_deref(),
        Some(&b"through the target"[..]),
        "target not readable within 5 s of SIGKILL: {}",
        fs::read_to_string(root.join("plugin.log")).unwrap_or_default()
    );
    // A new file (no cache can answer that): the restarted client serves within 5 s.
    assert!(
        write_read_within(
            target.join("new-after-kill.txt"),
            b"served by the new client",
            Duration::from_secs(5).saturating_sub(killed.elapsed())
        ),
        "no new file through the target within 5 s of SIGKILL: {}",
        fs::read_to_string(root.join("plugin.log")).unwrap_or_default()
    );
    let took = killed.elapsed();
    eprintln!(
        "a new file through the target succeeded {:.3} s after the client was killed",
        took.as_secs_f64()
    );
    fs::write(target.join("after.txt"), b"still writable").unwrap();
    assert_eq!(
        fs::read(target.join("after.txt")).unwrap(),
        b"still writable"
    );
    assert_ne!(client_pids(&state), pids, "a new client serves the mount");

    // ---- Unpublish / unstage (twice each), delete (twice), fake ids
    for t in [&target, &ro_target] {
        let r = csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: t.to_string_lossy().into(),
        };
        node.node_unpublish_volume(r.clone()).await.unwrap();
        node.node_unpublish_volume(r).await.unwrap();
        assert!(!t.exists());
    }
    assert_eq!(
        code(
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                target_path: String::new()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // ---- SINGLE_NODE_SINGLE_WRITER: one target only; the refused publish leaves neither a
    // mount nor a directory (csi-sanity: "should fail when volume with single node single
    // writer access mode is already mounted at a different target path").
    let snsw = mount_cap(Mode::SingleNodeSingleWriter);
    let other = root.join("kubelet/pods/p3/volumes/pv1");
    let sw = csi::NodePublishVolumeRequest {
        volume_capability: Some(snsw.clone()),
        ..publish.clone()
    };
    node.node_publish_volume(sw.clone()).await.unwrap();
    node.node_publish_volume(sw.clone()).await.unwrap();
    for cap in [snsw.clone(), caps[0].clone()] {
        let e = node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                target_path: other.to_string_lossy().into(),
                volume_capability: Some(cap),
                ..publish.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(
            !other.exists(),
            "the refused publish left {}",
            other.display()
        );
    }
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
    })
    .await
    .unwrap();
    assert!(!target.exists());

    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
    };
    node.node_unstage_volume(unstage.clone()).await.unwrap();
    node.node_unstage_volume(unstage).await.unwrap();
    // The shared mount is released: no META_URL or keys stay on the node.
    let volumes: Vec<_> = fs::read_dir(state.join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(volumes.is_empty(), "left behind: {volumes:?}");
    let t = Instant::now();
    while !client_pids(&state).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "client still running after the last unstage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let del = csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: secrets.clone(),
    };
    ctl.delete_volume(del.clone()).await.unwrap();
    ctl.delete_volume(del).await.unwrap();
    let listed = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "reallyfakevolumeid".into(),
        secrets: secrets.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        code(
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: String::new(),
                secrets: secrets.clone()
            })
            .await
        ),
        Code::InvalidArgument
    );
    // The directory is gone from the volume.
    let v3 = ctl
        .create_volume(base.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v3.volume_id, v.volume_id);
    drop(g);
}

/// PVs of one Strata volume staged at the same moment (different volume ids, one META_URL)
/// share one FUSE mount: the second stage waits for the first one's mount instead of mounting
/// the volume a second time on top of it; unstaging both releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stages_of_one_volume_share_one_mount() {
    let Some((_dir, root, meta)) = mount_test("racevol") else {
        return;
    };
    let state = root.join("state");
    let _g = node_plugin(&root);
    let ch = channel(&root.join("csi.sock"), &root.join("plugin.log")).await;
    let secrets: HashMap<String, String> = HashMap::from([("metaurl".into(), meta.clone())]);
    let fuse_mounts = || {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(" - fuse.strata ") && l.contains(&*state.to_string_lossy()))
            .count()
    };
    for round in 0..3 {
        let stages: Vec<csi::NodeStageVolumeRequest> = (0..2)
            .map(|i| {
                let staging = root.join(format!("kubelet/staging/r{round}-{i}"));
                fs::create_dir_all(&staging).unwrap();
                csi::NodeStageVolumeRequest {
                    volume_id: format!("static-pv-{round}-{i}"),
                    staging_target_path: staging.to_string_lossy().into(),
                    volume_capability: Some(mount_cap(
                        volume_capability::access_mode::Mode::MultiNodeMultiWriter,
                    )),
                    secrets: secrets.clone(),
                    ..Default::default()
                }
            })
            .collect();
        // Both requests are in flight before either is awaited.
        let calls: Vec<_> = stages
            .iter()
            .cloned()
            .map(|r| {
                let mut node = NodeClient::new(ch.clone());
                tokio::spawn(async move { node.node_stage_volume(r).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        assert_eq!(
            fuse_mounts(),
            1,
            "round {round}: two stages of one volume mounted it twice: {}",
            fs::read_to_string(root.join("plugin.log")).unwrap_or_default()
        );
        // Both staging paths show the same file system.
        fs::write(
            std::path::Path::new(&stages[0].staging_target_path).join(format!("f{round}")),
            b"x",
        )
        .unwrap();
        assert!(
            std::path::Path::new(&stages[1].staging_target_path)
                .join(format!("f{round}"))
                .exists()
        );
        let unstages: Vec<_> = stages
            .iter()
            .map(|r| {
                let mut node = NodeClient::new(ch.clone());
                let u = csi::NodeUnstageVolumeRequest {
                    volume_id: r.volume_id.clone(),
                    staging_target_path: r.staging_target_path.clone(),
                };
                tokio::spawn(async move { node.node_unstage_volume(u).await })
            })
            .collect();
        for u in unstages {
            u.await.unwrap().unwrap();
        }
        assert_eq!(
            fuse_mounts(),
            0,
            "round {round}: the shared mount outlived its stages"
        );
    }
}

/// PVs of one Strata volume whose StorageClasses ask for other client flags (here through
/// the Kubernetes `mountOptions:` list, the capability's mount_flags) get a mount and a
/// client of their own; PVs asking for the same flags share one. Found on review: every PV
/// of a volume used to get the flags of the first one staged on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_mount_options_get_a_mount_of_their_own() {
    use std::os::unix::fs::MetadataExt;
    use volume_capability::access_mode::Mode;
    let Some((_dir, root, meta)) = mount_test("optvol") else {
        return;
    };
    let volumes = root.join("state/volumes");
    let _g = node_plugin(&root);
    let ch = channel(&root.join("csi.sock"), &root.join("plugin.log")).await;
    let mut node = NodeClient::new(ch);
    let secrets: HashMap<String, String> = HashMap::from([("metaurl".into(), meta.clone())]);
    let stage = |name: &str, flags: &[&str]| {
        let staging = root.join("kubelet/staging").join(name);
        fs::create_dir_all(&staging).unwrap();
        csi::NodeStageVolumeRequest {
            volume_id: format!("static-{name}"),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(mount_cap_with_flags(Mode::MultiNodeMultiWriter, flags)),
            secrets: secrets.clone(),
            ..Default::default()
        }
    };
    let unstage = |r: &csi::NodeStageVolumeRequest| csi::NodeUnstageVolumeRequest {
        volume_id: r.volume_id.clone(),
        staging_target_path: r.staging_target_path.clone(),
    };
    let keys = || {
        let mut k: Vec<String> = fs::read_dir(&volumes)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        k.sort();
        k
    };
    let dev = |r: &csi::NodeStageVolumeRequest| fs::metadata(&r.staging_target_path).unwrap().dev();
    let log = || fs::read_to_string(root.join("plugin.log")).unwrap_or_default();

    let plain = stage("plain", &[]);
    let big = stage("big", &["kernel-readahead=8"]);
    let same = stage("same", &["--kernel-readahead=8"]);
    for r in [&plain, &big, &same] {
        node.node_stage_volume(r.clone()).await.unwrap();
    }
    let k = keys();
    assert_eq!(k.len(), 2, "{k:?}\n{}", log());
    assert!(k[1].starts_with(&format!("{}-", k[0])), "{k:?}");
    assert_eq!(dev(&big), dev(&same), "the same flags share one mount");
    assert_ne!(
        dev(&plain),
        dev(&big),
        "other flags get a mount of their own"
    );
    // Each mount has its own flags: the kernel readahead each asked for.
    let staging =
        |r: &csi::NodeStageVolumeRequest| std::path::PathBuf::from(&r.staging_target_path);
    assert_eq!(read_ahead_kib(&staging(&plain), "4096"), "4096");
    assert_eq!(read_ahead_kib(&staging(&same), "8192"), "8192");
    // And the same volume: a file written through one is read through the other.
    fs::write(staging(&plain).join("f"), b"one volume").unwrap();
    assert_eq!(fs::read(staging(&big).join("f")).unwrap(), b"one volume");
    // Staging again changes nothing; a flag the client does not have is refused by name.
    node.node_stage_volume(big.clone()).await.unwrap();
    assert_eq!(keys(), k);
    let e = node
        .node_stage_volume(stage("bad", &["ro"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("\"ro\""), "{}", e.message());
    assert_eq!(keys(), k);
    // A mount goes with the last PV that uses it.
    node.node_unstage_volume(unstage(&big)).await.unwrap();
    assert_eq!(keys(), k);
    node.node_unstage_volume(unstage(&same)).await.unwrap();
    assert_eq!(keys(), vec![k[0].clone()]);
    assert_eq!(fs::read(staging(&plain).join("f")).unwrap(), b"one volume");
    node.node_unstage_volume(unstage(&plain)).await.unwrap();
    assert!(keys().is_empty(), "{:?}", keys());
}

/// The controller over a PostgreSQL volume (a real server): CreateVolume, expand, capacity
/// and DeleteVolume. Opening a PostgreSQL engine blocks; done on an RPC's async worker it
/// panicked the runtime ("Cannot start a runtime from within a runtime") and every
/// CreateVolume of such a volume timed out (found on the test bed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_on_a_postgresql_volume() {
    assert_strata_bin();
    // The harness talks to the server synchronously: not on this test's async worker.
    let (pg, meta) = tokio::task::spawn_blocking(|| {
        let pg = strata::testing::postgres::PgServer::start().unwrap_or_else(|e| panic!("{e}"));
        let meta = pg.new_database();
        (pg, meta)
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    strata::testing::mount::format(
        &strata_bin().to_string_lossy(),
        &[
            "--storage",
            "file",
            "--bucket",
            &root.join("objects").to_string_lossy(),
            &meta,
            "pgvol",
        ],
    );
    let sock = root.join("csi.sock");
    let _g = Guard {
        plugin: Some(
            Command::new(CSI)
                .args(["--controller", "--node-id", "node-1"])
                .arg("--endpoint")
                .arg(format!("unix://{}", sock.display()))
                .stdout(Stdio::null())
                .stderr(fs::File::create(root.join("plugin.log")).unwrap())
                .spawn()
                .unwrap(),
        ),
        dir: root.clone(),
    };
    let ch = channel(&sock, &root.join("plugin.log")).await;
    let mut ctl = ControllerClient::new(ch);
    let secrets: HashMap<String, String> = HashMap::from([("metaurl".into(), meta.clone())]);
    let log = || fs::read_to_string(root.join("plugin.log")).unwrap_or_default();
    let created = tokio::time::timeout(
        Duration::from_secs(30),
        ctl.create_volume(csi::CreateVolumeRequest {
            name: "pvc-pg".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap(
                volume_capability::access_mode::Mode::MultiNodeMultiWriter,
            )],
            parameters: HashMap::from([(
                "csi.storage.k8s.io/pvc/namespace".into(),
                "team-a".into(),
            )]),
            secrets: secrets.clone(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("CreateVolume hung: {}", log()))
    .unwrap_or_else(|e| panic!("CreateVolume: {e}: {}", log()))
    .into_inner()
    .volume
    .unwrap();
    assert!(
        created.volume_id.starts_with("pgvol/"),
        "{}",
        created.volume_id
    );
    let expanded = ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: created.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 << 30,
                limit_bytes: 0,
            }),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("ControllerExpandVolume: {e}: {}", log()))
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 2 << 30);
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: created.volume_id,
        secrets,
    })
    .await
    .unwrap_or_else(|e| panic!("DeleteVolume: {e}: {}", log()));
    assert!(!log().contains("panicked"), "{}", log());
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
}
