//! The plugin's log, as a container runtime stores it (stderr is a file, not a terminal),
//! is plain text: no ANSI colour codes.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::CSI;

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("plugin.log");
    let mut child = Command::new(CSI)
        .args(["--controller", "--log-level", "debug"])
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait for its first lines (it logs where it serves once the socket is up).
    let t = Instant::now();
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("serving csi.strata.io")
    {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!(
                "no log line within 20 s: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("INFO"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in the log: {text:?}"
    );
}
