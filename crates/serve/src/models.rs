//! The models in service: loaded once at start, replaced whole on reload. A request takes an
//! `Arc` of its model and keeps it to the end, so a reload never changes a request half-way, and
//! a reload that fails leaves the model in service as it was.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use vigil_engine::model::LoadOptions;
use vigil_engine::Model;

/// `NAME=path.vigil` from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSource {
    pub name: String,
    pub path: PathBuf,
}

impl FromStr for ModelSource {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<ModelSource> {
        let Some((name, path)) = s.split_once('=') else {
            bail!("--model '{s}': give NAME=path.vigil (the name is the one in /v1/models/NAME/score)");
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            bail!("--model '{s}': the name '{name}' may use only letters, digits, '-', '_' and '.'");
        }
        if path.is_empty() {
            bail!("--model '{s}': the path of the model file is missing");
        }
        Ok(ModelSource { name: name.to_string(), path: PathBuf::from(path) })
    }
}

/// A model in service with what was read about its file.
pub struct Served {
    pub model: Model,
    pub path: PathBuf,
    /// SHA-256 of the whole model file as loaded.
    pub file_sha256: String,
    /// Seconds since the Unix epoch when it was loaded.
    pub loaded_at: u64,
}

impl Served {
    pub fn load(path: &std::path::Path, allow_other_weights: bool) -> Result<Served> {
        let file_sha256 = vigil_core::fingerprint::sha256_file(path)?;
        let model = Model::load(path, &LoadOptions { allow_other_weights, ..Default::default() })?;
        let loaded_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(Served { model, path: path.to_path_buf(), file_sha256, loaded_at })
    }

    /// What `GET /v1/models` says of it.
    pub fn describe(&self, name: &str) -> Value {
        let m = &self.model;
        json!({
            "name": name,
            "path": crate::display(&self.path),
            "method": m.method,
            "settings": m.settings,
            "pipeline": m.pipeline.settings,
            "image_threshold": m.image_threshold,
            "pixel_threshold": m.pixel_threshold,
            "fit": m.fit_info,
            "weights": m.weights,
            "file_sha256": self.file_sha256,
            "loaded_at_unix": self.loaded_at,
        })
    }
}

pub struct Models {
    sources: Vec<ModelSource>,
    allow_other_weights: bool,
    serving: RwLock<BTreeMap<String, Arc<Served>>>,
}

impl Models {
    /// Loads every model; any that fails stops the start with an error naming it.
    pub fn load(sources: &[ModelSource], allow_other_weights: bool) -> Result<Models> {
        let mut serving = BTreeMap::new();
        for s in sources {
            let served = Served::load(&s.path, allow_other_weights)
                .with_context(|| format!("cannot load model '{}'", s.name))?;
            serving.insert(s.name.clone(), Arc::new(served));
        }
        Ok(Models { sources: sources.to_vec(), allow_other_weights, serving: RwLock::new(serving) })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.read().get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    pub fn all(&self) -> Vec<(String, Arc<Served>)> {
        self.read().iter().map(|(n, s)| (n.clone(), s.clone())).collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Served>>> {
        // A panic while holding the lock cannot leave the map half-changed (it only swaps Arcs).
        self.serving.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the named models again from their files (blocking; call off the async threads) and
    /// puts them in service together, or none of them if any fails to load.
    pub fn reload(&self, names: &[String]) -> Result<()> {
        let mut loaded = Vec::new();
        for name in names {
            let source = self
                .sources
                .iter()
                .find(|s| &s.name == name)
                .with_context(|| format!("unknown model '{name}'"))?;
            let served = Served::load(&source.path, self.allow_other_weights)
                .with_context(|| format!("cannot reload model '{name}'; the model in service is kept"))?;
            loaded.push((name.clone(), Arc::new(served)));
        }
        let mut serving = self.serving.write().unwrap_or_else(|e| e.into_inner());
        serving.extend(loaded);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_sources_parse_and_name_their_problem() {
        let s: ModelSource = "demo=runs/demo/model.vigil".parse().unwrap();
        assert_eq!(s, ModelSource { name: "demo".into(), path: "runs/demo/model.vigil".into() });
        assert!("model.vigil".parse::<ModelSource>().unwrap_err().to_string().contains("NAME=path"));
        assert!("a/b=m.vigil".parse::<ModelSource>().unwrap_err().to_string().contains("only letters"));
        assert!("demo=".parse::<ModelSource>().unwrap_err().to_string().contains("missing"));
    }
}
