//! vigil for Python: the native half of the `vigil` package (`python/vigil`), built by maturin
//! with the `python` feature. [`api`] is the plain-Rust part (settings, arrays to images, scoring
//! through vigil-engine as `vigil predict` does); the PyO3 wrappers are behind the feature, so a
//! plain `cargo build --workspace` needs no Python.

pub mod api;
#[cfg(feature = "python")]
mod python;
