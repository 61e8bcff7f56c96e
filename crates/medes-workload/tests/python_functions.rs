//! Runs `functions/test_functions.py` (the ten actions in-process, checked against the manifest)
//! with the platform's venv. Skips, saying why, when the venv is missing, unless `CI=true`.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_ten_functions_pass_their_manifest_checks() {
    let venv = std::env::var("MEDES_VENV").unwrap_or_else(|_| "/opt/medes/venv".into());
    let python = PathBuf::from(&venv).join("bin/python3");
    if !python.exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} missing: run scripts/setup.sh",
            python.display()
        );
        eprintln!(
            "skipping: {} missing (run scripts/setup.sh)",
            python.display()
        );
        return;
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../functions/test_functions.py");
    let out = Command::new(&python)
        .arg(&script)
        .output()
        .expect("running test_functions.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "test_functions.py failed");
    assert!(stdout.contains("36 passed, 0 failed"), "unexpected summary");
}

/// Every action, warm (imported and run once), checkpointed with CRIU and restored, answers the
/// same; mapreduce's pool workers are restored with it. Needs root and CRIU.
#[test]
fn warm_functions_survive_criu_checkpoint_and_restore() {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let venv = std::env::var("MEDES_VENV").unwrap_or_else(|_| "/opt/medes/venv".into());
    let python = PathBuf::from(&venv).join("bin/python3");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let criu = Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let inputs = std::env::var("MEDES_INPUTS").unwrap_or_else(|_| "/opt/medes/inputs".into());
    let have_inputs = PathBuf::from(&inputs).join("inputs.json").is_file();
    if !(python.exists() && root && criu && have_inputs) {
        let why = format!(
            "needs {} ({}), root ({root}), criu ({criu}) and {inputs}/inputs.json ({have_inputs}): run scripts/setup.sh as root",
            python.display(),
            python.exists()
        );
        assert!(!ci, "{why}");
        eprintln!("skipping: {why}");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../functions/criu_check.py");
    let names = [
        "vanilla",
        "linalg",
        "imagepro",
        "videopro",
        "mapreduce",
        "htmlserve",
        "authenc",
        "featuregen",
        "modelserve",
        "modeltrain",
    ];
    let out = Command::new(&python)
        .arg(&script)
        .arg("--inputs")
        .arg(&inputs)
        .args(names)
        .output()
        .expect("running criu_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "criu_check.py failed");
    assert!(stdout.contains("10 passed, 0 failed"), "unexpected summary");
}
