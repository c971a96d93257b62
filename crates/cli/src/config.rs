//! TOML configuration files: any long option can be written in the file; flags override it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Overlay the options given on the command line onto those of the config file (if any).
/// A flag counts as given when it is set (Some, true, or a non-empty list).
pub fn merge_with_file<T: Serialize + DeserializeOwned>(cli: T, file: Option<&Path>) -> Result<T> {
    let Some(path) = file else { return Ok(cli) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
    let from_file: toml::Value =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut merged = serde_json::to_value(from_file)?;
    let given = serde_json::to_value(&cli)?;
    overlay(&mut merged, given);
    serde_json::from_value(merged).with_context(|| {
        format!(
            "{}: unknown or mistyped option (option names are the long flags, e.g. val-fraction)",
            path.display()
        )
    })
}

fn overlay(base: &mut serde_json::Value, given: serde_json::Value) {
    use serde_json::Value;
    let (Value::Object(base), Value::Object(given)) = (base, given) else { return };
    for (key, value) in given {
        let set = match &value {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Array(a) => !a.is_empty(),
            _ => true,
        };
        if let (Some(existing @ Value::Object(_)), Value::Object(_)) = (base.get_mut(&key), &value) {
            overlay(existing, value);
        } else if set {
            base.insert(key, value);
        } else {
            base.entry(key).or_insert(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::FitArgs;

    #[test]
    fn flags_override_file_and_file_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "method = \"acontrario\"\nval-fraction = 0.3\nseed = 7\n[pipeline]\ntile = 64\n",
        )
        .unwrap();
        let cli = FitArgs { seed: Some(1), ..Default::default() };
        let merged = merge_with_file(cli, Some(&cfg)).unwrap();
        assert_eq!(merged.seed, Some(1));
        assert_eq!(merged.val_fraction, Some(0.3));
        assert_eq!(merged.method.as_deref(), Some("acontrario"));
        assert_eq!(merged.pipeline.tile, Some(64));
    }

    #[test]
    fn unknown_option_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "no-such-option = 1\n").unwrap();
        let err = merge_with_file(FitArgs::default(), Some(&cfg)).unwrap_err();
        assert!(format!("{err:#}").contains("c.toml"));
    }
}
