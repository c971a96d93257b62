//! TOML configuration files: any long option can be written in the file; flags override it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Overlay the options given on the command line onto those of the config file (if any).
/// A flag counts as given when it is set (Some, true, or a non-empty list). A name in the file that
/// is no option of the command is an error: the option structs flatten the shared fit options,
/// through which serde's `deny_unknown_fields` cannot see, so the names are checked here against
/// those the command's options serialize to.
pub fn merge_with_file<T: Serialize + DeserializeOwned + Default>(cli: T, file: Option<&Path>) -> Result<T> {
    let Some(path) = file else { return Ok(cli) };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read config", path.display()))?;
    let from_file: toml::Value =
        toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
    let mut merged = serde_json::to_value(from_file)?;
    let mut unknown = Vec::new();
    unknown_names(&merged, &serde_json::to_value(T::default())?, "", &mut unknown);
    if !unknown.is_empty() {
        bail!(
            "{}: unknown option(s) {} (option names are the long flags, e.g. val-fraction; the image-pipeline \
             options go in a [pipeline] table)",
            path.display(),
            unknown.join(", ")
        );
    }
    let given = serde_json::to_value(&cli)?;
    overlay(&mut merged, given);
    serde_json::from_value(merged).with_context(|| {
        format!(
            "{}: unknown or mistyped option (option names are the long flags, e.g. val-fraction)",
            path.display()
        )
    })
}

/// The names in `file` (tables included) that `known` does not have, as `table.name`.
fn unknown_names(file: &serde_json::Value, known: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    let serde_json::Value::Object(entries) = file else { return };
    for (name, value) in entries {
        match known.get(name) {
            None => out.push(format!("'{prefix}{name}'")),
            Some(table @ serde_json::Value::Object(_)) => {
                unknown_names(value, table, &format!("{prefix}{name}."), out)
            }
            Some(_) => {}
        }
    }
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
    use crate::args::{BenchmarkArgs, FitArgs, FitOptionArgs};

    #[test]
    fn flags_override_file_and_file_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "method = \"acontrario\"\nval-fraction = 0.3\nseed = 7\n[pipeline]\ntile = 64\n",
        )
        .unwrap();
        let cli =
            FitArgs { fit: FitOptionArgs { seed: Some(1), ..Default::default() }, ..Default::default() };
        let merged = merge_with_file(cli, Some(&cfg)).unwrap();
        assert_eq!(merged.fit.seed, Some(1));
        assert_eq!(merged.fit.val_fraction, Some(0.3));
        assert_eq!(merged.method.as_deref(), Some("acontrario"));
        assert_eq!(merged.pipeline.tile, Some(64));
    }

    #[test]
    fn unknown_option_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "no-such-option = 1\n").unwrap();
        let err = merge_with_file(FitArgs::default(), Some(&cfg)).unwrap_err();
        assert!(format!("{err:#}").contains("c.toml") && format!("{err:#}").contains("'no-such-option'"));
        std::fs::write(&cfg, "[pipeline]\ntiles = 64\n").unwrap();
        let err = format!("{:#}", merge_with_file(FitArgs::default(), Some(&cfg)).unwrap_err());
        assert!(err.contains("'pipeline.tiles'"), "{err}");
        // An option of another command is unknown here, a fit option is known to benchmark.
        std::fs::write(&cfg, "classes = \"a\"\n").unwrap();
        assert!(merge_with_file(FitArgs::default(), Some(&cfg)).is_err());
        let merged = merge_with_file(BenchmarkArgs::default(), Some(&cfg)).unwrap();
        assert_eq!(merged.classes.as_deref(), Some("a"));
    }

    #[test]
    fn shared_fit_options_come_from_the_file_for_fit_and_benchmark() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "val-anomalous = \"defects\"\nmask-pattern = \"{stem}.png\"\nparams = [\"epochs=2\"]\nfit-on-all = true\n",
        )
        .unwrap();
        let fit = merge_with_file(FitArgs::default(), Some(&cfg)).unwrap().fit;
        let bench = merge_with_file(BenchmarkArgs::default(), Some(&cfg)).unwrap().fit;
        for f in [fit, bench] {
            assert_eq!(f.val_anomalous.as_deref(), Some(Path::new("defects")));
            assert_eq!(f.mask_pattern.as_deref(), Some("{stem}.png"));
            assert_eq!(f.params, ["epochs=2"]);
            assert!(f.fit_on_all);
        }
    }
}
