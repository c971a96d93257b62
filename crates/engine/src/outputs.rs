//! What runs write: the output folder (never replaced without `overwrite`, stale outputs of an
//! earlier run removed with it), unique output names, metrics.json, maps and overlays, and the
//! score tables of `predict`, written row by row as images are scored.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use vigil_core::model_file::write_atomic;

use crate::evaluate::Evaluation;
use crate::model::Model;
use crate::run::{Item, Skipped};

/// Writes a file through a synced temporary sibling. Without `overwrite` the file is created only
/// if absent, atomically (a hard link fails on an existing name), so a file another process
/// created meanwhile is never replaced.
pub fn write_file(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(write_atomic(path, bytes, true)?);
    }
    if path.exists() {
        bail!("{}: already exists; pass --overwrite to replace it", path.display());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    }
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.{}.new", name.to_string_lossy(), std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{}: already exists (created while this run was writing); pass --overwrite to replace it",
                path.display()
            )
        }
        Err(e) => Err(e).with_context(|| path.display().to_string()),
    }
}

/// An output folder a run writes `files` and `folders` into (names relative to it). Any of them
/// existing is refused without `overwrite`; with it they are all removed first, so nothing of an
/// earlier run is left beside the new outputs.
pub fn prepare_output(dir: &Path, files: &[&str], folders: &[&str], overwrite: bool) -> Result<()> {
    let existing: Vec<PathBuf> =
        files.iter().chain(folders).map(|n| dir.join(n)).filter(|p| p.symlink_metadata().is_ok()).collect();
    if !existing.is_empty() && !overwrite {
        bail!(
            "{}: holds outputs of an earlier run ({}); pass --overwrite to replace them, or choose another --out",
            dir.display(),
            existing.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy()).collect::<Vec<_>>().join(", ")
        );
    }
    for path in existing {
        let removed =
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        removed.with_context(|| format!("{}: cannot remove the earlier run's output", path.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    Ok(())
}

/// Output names for images to predict: each file's path relative to the input folder it was found
/// in (without extension), prefixed by that folder's name when several inputs are given; the
/// extension is kept where two files differ only by it, and a counter ends any remaining clash.
pub fn unique_names(files: &[(PathBuf, Option<PathBuf>)], several_inputs: bool) -> Vec<String> {
    let base: Vec<(String, String)> = files
        .iter()
        .map(|(path, root)| {
            let relative = root.as_ref().and_then(|r| path.strip_prefix(r).ok()).unwrap_or(path.as_path());
            let relative = if root.is_some() {
                relative.to_path_buf()
            } else {
                PathBuf::from(relative.file_name().unwrap_or_default())
            };
            let prefix = match (several_inputs, root) {
                (true, Some(r)) => format!("{}/", r.file_name().unwrap_or_default().to_string_lossy()),
                _ => String::new(),
            };
            let stem = relative.with_extension("");
            let ext = relative.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
            (format!("{prefix}{}", stem.to_string_lossy().replace('\\', "/")), ext)
        })
        .collect();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (stem, _) in &base {
        *count.entry(stem.as_str()).or_default() += 1;
    }
    let mut taken: HashMap<String, usize> = HashMap::new();
    base.iter()
        .map(|(stem, ext)| {
            let name = if count[stem.as_str()] > 1 && !ext.is_empty() {
                format!("{stem}_{ext}")
            } else {
                stem.clone()
            };
            let n = taken.entry(name.clone()).or_default();
            *n += 1;
            if *n == 1 {
                name
            } else {
                format!("{name}_{n}")
            }
        })
        .collect()
}

/// The images given to `predict`: files as they are, folders searched recursively (hidden entries
/// left out), with output names that never collide.
pub fn collect_inputs(inputs: &[PathBuf], filter: &crate::run::ImageFilter) -> Result<Vec<Item>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let found = filter.list(input)?;
            files.extend(found.into_iter().map(|p| (p, Some(input.clone()))));
        } else if input.exists() {
            files.push((input.clone(), None));
        } else {
            bail!("{}: no such file or folder", input.display());
        }
    }
    if files.is_empty() {
        bail!("no input image: give image files or folders");
    }
    let names = unique_names(&files, inputs.len() > 1);
    Ok(files
        .into_iter()
        .zip(names)
        .map(|((path, _), name)| Item { path, name, label: None, kind: String::new(), mask: None })
        .collect())
}

/// The outputs of `vigil test`: metrics.json, report.html and, with `save_maps`, maps/ with a map
/// (float TIFF) and an overlay (PNG) per image.
pub const TEST_FILES: [&str; 2] = ["metrics.json", "report.html"];
pub const TEST_FOLDERS: [&str; 1] = ["maps"];

pub fn write_test_outputs(
    out: &Path,
    model: &Model,
    dataset: &str,
    eval: &Evaluation,
    save_maps: bool,
) -> Result<()> {
    let json = serde_json::to_vec_pretty(&serde_json::json!({
        "method": model.method,
        "settings": model.settings,
        "dataset": dataset,
        "image_threshold": eval.image_threshold,
        "pixel_threshold": eval.pixel_threshold,
        "metrics": eval.metrics,
        "skipped": eval.skipped,
        "images": eval.results.iter().map(|r| serde_json::json!({
            "path": r.item.path, "kind": r.item.kind, "label": r.item.label,
            "score": r.image_score, "decided_value": r.decided_value, "verdict": r.verdict, "seconds": r.seconds,
        })).collect::<Vec<_>>(),
    }))?;
    write_atomic(&out.join("metrics.json"), &json, true)?;
    if save_maps {
        // Every image's files are its own: written in parallel; an error stops the writing.
        let maps = out.join("maps");
        eval.results.par_iter().try_for_each(|r| -> Result<()> {
            let map = vigil_core::Map::new(r.width, r.height, r.map.clone())?;
            let path = maps.join(format!("{}.tiff", r.item.name));
            std::fs::create_dir_all(path.parent().unwrap_or(&maps))?;
            vigil_data::io::write_map_tiff(&path, &map)?;
            write_atomic(&maps.join(format!("{}_overlay.png", r.item.name)), &r.thumbnail_png, true)?;
            Ok(())
        })?;
    }
    let report = crate::report::report_data(model, dataset, eval);
    vigil_report::html::write_html(&out.join("report.html"), &report, true)?;
    Ok(())
}

/// Map file format of `predict`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MapFormat {
    /// 32-bit float TIFF with raw values.
    #[default]
    Tiff,
    /// 16-bit PNG scaled between the map's minimum and maximum.
    Png16,
}

impl std::str::FromStr for MapFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiff" => Ok(MapFormat::Tiff),
            "png16" => Ok(MapFormat::Png16),
            _ => bail!("--map-format must be tiff or png16, got '{s}'"),
        }
    }
}

pub const PREDICT_FILES: [&str; 2] = ["scores.csv", "scores.json"];
pub const PREDICT_FOLDERS: [&str; 3] = ["maps", "overlays", "masks"];
const CSV_HEADERS: [&str; 12] = [
    "path",
    "status",
    "score",
    "verdict",
    "threshold",
    "width",
    "height",
    "anomalous_pixels",
    "map",
    "overlay",
    "mask",
    // The value compared with the threshold (a log10 NFA for NFA thresholds); last, so the
    // columns before it keep their places. A resumed run rebuilds scores.json from these rows.
    "decided_value",
];

/// The score tables of `predict`: a CSV row is written (and flushed) as each image is scored, the
/// JSON is rewritten at most every few seconds and at the end, so a crash keeps what was done.
pub struct ScoreTables {
    out: PathBuf,
    csv: File,
    json_head: serde_json::Value,
    rows: Vec<serde_json::Value>,
    last_json: Instant,
    pub flagged: usize,
    /// Scored rows in the table, those of an earlier run that was resumed included.
    pub scored: usize,
    /// Rows kept from an earlier run by [`ScoreTables::resume`].
    pub resumed: usize,
}

const JSON_EVERY: Duration = Duration::from_secs(5);

impl ScoreTables {
    /// Starts the tables in a prepared output folder.
    pub fn create(out: &Path, model_path: &Path, model: &Model) -> Result<ScoreTables> {
        let path = out.join("scores.csv");
        let mut csv = File::create(&path).with_context(|| path.display().to_string())?;
        writeln!(csv, "{}", CSV_HEADERS.join(","))?;
        let mut tables = ScoreTables::create_with(out, model_path, model, csv);
        tables.write_json()?;
        Ok(tables)
    }

    fn create_with(out: &Path, model_path: &Path, model: &Model, csv: File) -> ScoreTables {
        let json_head = serde_json::json!({
            "model": model_path, "method": model.method,
            "image_threshold": model.image_threshold, "pixel_threshold": model.pixel_threshold,
        });
        ScoreTables {
            out: out.to_path_buf(),
            csv,
            json_head,
            rows: Vec::new(),
            last_json: Instant::now(),
            flagged: 0,
            scored: 0,
            resumed: 0,
        }
    }

    /// Continues the tables of an earlier, interrupted run in `out` (or starts them when there
    /// are none): its scored rows are kept, rows of skipped files and a row cut short by a crash
    /// are dropped (those files are tried again), and the paths already scored are returned for
    /// the caller to leave out. Refuses tables written with another threshold (another model).
    pub fn resume(out: &Path, model_path: &Path, model: &Model) -> Result<(ScoreTables, HashSet<PathBuf>)> {
        let path = out.join("scores.csv");
        if !path.exists() {
            std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
            return Ok((ScoreTables::create(out, model_path, model)?, HashSet::new()));
        }
        let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        let mut records = crate::batch::parse_csv(&text).into_iter();
        if records.next().is_none_or(|h| h != CSV_HEADERS) {
            bail!(
                "{}: not a score table of this version of vigil (other columns); pass --overwrite to start again",
                path.display()
            );
        }
        let threshold = decision_threshold(model).to_string();
        let rows: Vec<Vec<String>> =
            records.filter(|r| r.len() == CSV_HEADERS.len() && r[1] == "scored").collect();
        if let Some(other) = rows.iter().find(|r| r[4] != threshold) {
            bail!(
                "{}: its rows were scored with threshold {} but this model's is {threshold}: it was written with \
                 another model; pass --overwrite to start again, or choose another --out",
                path.display(),
                other[4]
            );
        }
        let kept = vigil_report::markdown::csv_string(&CSV_HEADERS, &rows)?;
        write_atomic(&path, kept.as_bytes(), true)?;
        let csv = File::options().append(true).open(&path).with_context(|| path.display().to_string())?;
        let mut tables = ScoreTables::create_with(out, model_path, model, csv);
        let mut done = HashSet::new();
        for r in &rows {
            let number = |i: usize| -> Result<f64> {
                r[i].parse().with_context(|| {
                    format!("{}: row of {}: '{}' is not a number", path.display(), r[0], r[i])
                })
            };
            let verdict = r[3] == "anomalous";
            tables.rows.push(serde_json::json!({
                "path": r[0], "status": "scored", "score": number(2)? as f32, "decided_value": number(11)?,
                "anomalous": verdict, "threshold": number(4)?, "width": number(5)? as usize,
                "height": number(6)? as usize, "anomalous_pixels": number(7)? as usize,
                "map": r[8], "overlay": r[9], "mask": r[10],
            }));
            tables.scored += 1;
            tables.flagged += usize::from(verdict);
            done.insert(PathBuf::from(&r[0]));
        }
        tables.resumed = tables.scored;
        tables.write_json()?;
        Ok((tables, done))
    }

    fn write_csv_row(&mut self, fields: &[String]) -> Result<()> {
        let line = vigil_report::markdown::csv_string(&CSV_HEADERS, &[fields.to_vec()])?;
        // csv_string starts with the header line; keep the row only.
        let row = line.split_once('\n').map(|(_, r)| r).unwrap_or("");
        self.csv.write_all(row.as_bytes())?;
        self.csv.flush()?;
        Ok(())
    }

    fn push_json(&mut self, row: serde_json::Value) -> Result<()> {
        self.rows.push(row);
        if self.last_json.elapsed() >= JSON_EVERY {
            self.write_json()?;
        }
        Ok(())
    }

    fn write_json(&mut self) -> Result<()> {
        let mut doc = self.json_head.clone();
        doc["images"] = serde_json::Value::Array(self.rows.clone());
        write_atomic(&self.out.join("scores.json"), &serde_json::to_vec_pretty(&doc)?, true)?;
        self.last_json = Instant::now();
        Ok(())
    }

    /// One scored image with the files written for it.
    #[allow(clippy::too_many_arguments)]
    pub fn scored(
        &mut self,
        path: &Path,
        score: f32,
        decided: f64,
        verdict: bool,
        threshold: f64,
        (width, height): (usize, usize),
        anomalous_pixels: usize,
        files: [&Path; 3],
    ) -> Result<()> {
        self.scored += 1;
        self.flagged += usize::from(verdict);
        let verdict_text = if verdict { "anomalous" } else { "normal" };
        let [map, overlay, mask] = files.map(|p| p.display().to_string());
        self.write_csv_row(&[
            path.display().to_string(),
            "scored".into(),
            score.to_string(),
            verdict_text.into(),
            threshold.to_string(),
            width.to_string(),
            height.to_string(),
            anomalous_pixels.to_string(),
            map.clone(),
            overlay.clone(),
            mask.clone(),
            decided.to_string(),
        ])?;
        self.push_json(serde_json::json!({
            "path": path, "status": "scored", "score": score, "decided_value": decided, "anomalous": verdict,
            "threshold": threshold, "width": width, "height": height, "anomalous_pixels": anomalous_pixels,
            "map": map, "overlay": overlay, "mask": mask,
        }))
    }

    /// A file skipped under `--skip-bad`.
    pub fn skipped(&mut self, skipped: &Skipped) -> Result<()> {
        let mut fields = vec![String::new(); CSV_HEADERS.len()];
        fields[0] = skipped.path.display().to_string();
        fields[1] = format!("skipped: {}", skipped.reason);
        self.write_csv_row(&fields)?;
        self.push_json(
            serde_json::json!({ "path": skipped.path, "status": "skipped", "reason": skipped.reason }),
        )
    }

    pub fn finish(mut self) -> Result<()> {
        self.write_json()
    }
}

/// The value the decided quantity of an image is compared with: for NFA thresholds a log10 NFA
/// level, else the image threshold.
pub fn decision_threshold(model: &Model) -> f64 {
    model.image_threshold.log10_nfa_level().unwrap_or(model.image_threshold.value)
}
