//! The bench harness's smoke mode (`--quick`) runs end to end, so that the
//! harness never rots: every scenario produces figures for wasmhive, and the
//! Markdown, JSON and SVG results are written; and the soak command's
//! 20-second form.

use std::path::PathBuf;
use std::process::Command;

/// `wasmhive` built by this same `cargo test` (the CLI's e2e tests need it).
fn wasmhive_binary() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let binary = deps
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join(format!("wasmhive{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} not built: run the whole workspace (`cargo test --workspace`) or `cargo build -p wasmhive-cli` first",
        binary.display()
    );
    binary
}

/// The two tests load the machine; they take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn quick_mode_runs_every_scenario() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::env::temp_dir().join(format!("wasmhive-bench-smoke-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_wasmhive-bench"))
        .arg("--quick")
        .arg("--wasmhive")
        .arg(wasmhive_binary())
        .arg("--out")
        .arg(&out)
        .args(["--set", "smoke"])
        .output()
        .expect("harness runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("failed in round"), "{stderr}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("smoke.json")).unwrap()).unwrap();
    let rounds = json["rounds"].as_array().unwrap();
    let figure = |scenario: &str, server: &str, name: &str| -> f64 {
        rounds
            .iter()
            .find(|r| r["scenario"] == scenario && r["server"] == server)
            .and_then(|r| r["figures"][name].as_f64())
            .unwrap_or_else(|| panic!("no {name} for {scenario} on {server}"))
    };
    for scenario in ["hello-p2", "hello-p3", "echo-64k", "cpu", "sleep-io"] {
        for server in ["wasmhive", "native"] {
            assert!(figure(scenario, server, "rps") > 0.0, "{scenario} {server}");
            assert_eq!(
                figure(scenario, server, "failed"),
                0.0,
                "{scenario} {server}"
            );
        }
    }
    assert!(figure("overload", "wasmhive", "admitted_rps") > 0.0);
    assert!(figure("cold-start", "wasmhive", "start_to_first_ok_ms") > 0.0);
    assert!(figure("memory", "wasmhive", "rss_50_idle_mib") > 0.0);

    let markdown = std::fs::read_to_string(out.join("smoke.md")).unwrap();
    assert!(
        markdown.contains("| hello-p2 | defaults | wasmhive |"),
        "{markdown}"
    );
    let svg = std::fs::read_to_string(out.join("smoke.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("wasmhive"),
        "{svg:.200}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// The soak's short form: 20 seconds of mixed requests, every answer as
/// expected and RSS growth after warm-up under 5%.
#[test]
fn soak_for_twenty_seconds() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let output = Command::new(env!("CARGO_BIN_EXE_wasmhive-bench"))
        .args([
            "soak",
            "--duration",
            "20",
            "--connections",
            "16",
            "--wasmhive",
        ])
        .arg(wasmhive_binary())
        .output()
        .expect("harness runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("every answer as expected"), "{stdout}");
}
