//! Where tests find the project's shared reference data (real PIPED images, textures,
//! pretrained weights and their reference activations), which lives outside the repository in
//! `<workspace>/../shared`.
//!
//! A test that needs it calls [`shared_path`]. When the data is absent the test is skipped with a
//! message, so the repository's own tests run anywhere; with `VIGIL_REQUIRE_SHARED=1` (set by
//! `.ci/run`) the test fails instead, so a machine that should have the data cannot pass by
//! skipping the checks that matter most.

use std::path::PathBuf;

/// Overrides the shared folder's location (default: `<workspace>/../shared`).
pub const SHARED_DIR_VAR: &str = "VIGIL_SHARED_DIR";
/// When "1", a missing shared path fails the test that asked for it.
pub const REQUIRE_SHARED_VAR: &str = "VIGIL_REQUIRE_SHARED";

/// The shared folder: `$VIGIL_SHARED_DIR` when set, else `shared` beside the workspace.
pub fn shared_root() -> PathBuf {
    match std::env::var_os(SHARED_DIR_VAR) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

/// `<shared root>/<relative>` if it exists. Otherwise `None` after printing that the caller is
/// skipped, or, with `VIGIL_REQUIRE_SHARED=1`, a panic naming the missing path: this is for
/// tests, where a panic is the failure.
pub fn shared_path(relative: &str) -> Option<PathBuf> {
    let path = shared_root().join(relative);
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os(REQUIRE_SHARED_VAR).is_some_and(|v| v == "1") {
        panic!("{} is absent and {REQUIRE_SHARED_VAR}=1 requires it", path.display());
    }
    println!("skipped: {} is absent", path.display());
    None
}
