//! The one per-image loop of vigil: load → (skip a bad file) → score → hand over. Validation,
//! evaluation and prediction all go through [`score_items`]. Decoding the next images overlaps
//! with scoring the current one (a bounded queue), so the method is not kept waiting on files.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vigil_core::{Detector, Image, Mask, VigilError};
use vigil_data::dataset::TestItem;
use vigil_data::source::BadFilePolicy;

use crate::pipeline::{Pipeline, Scored};
use crate::progress::Progress;

/// One image to score, with what is known about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub path: PathBuf,
    /// A name unique within the run, used for output files (a relative path without extension).
    pub name: String,
    /// True for a known anomalous image, false for a known normal one, None when unknown.
    pub label: Option<bool>,
    /// The defect kind (folder name) when known.
    pub kind: String,
    /// The ground-truth mask file, when there is one.
    pub mask: Option<PathBuf>,
}

impl Item {
    /// A labelled test image, named as in its set (`<kind>/<path under the kind's folder>`).
    pub fn from_test(t: &TestItem) -> Item {
        Item {
            path: t.path.clone(),
            name: t.name.clone(),
            label: Some(t.label),
            kind: t.kind.clone(),
            mask: t.mask.clone(),
        }
    }
}

/// A file left out under `--skip-bad`, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// An image as scored, handed to the caller of [`score_items`].
pub struct ScoredItem<'a> {
    pub item: &'a Item,
    pub image: Image,
    /// Ground truth: the mask when there is one, all-zero for a known normal image.
    pub truth: Option<Mask>,
    pub scored: Scored,
    /// Time the pipeline took to score the image (not decoding).
    pub seconds: f64,
}

/// What the loop hands over: a scored image, or a file skipped under `--skip-bad`.
pub enum Event<'a> {
    Scored(ScoredItem<'a>),
    Skipped(&'a Skipped),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LoopOptions {
    /// Resample ground-truth masks whose size differs from their image instead of stopping.
    pub resize_masks: bool,
}

/// How many decoded images may wait for the scorer.
const QUEUE: usize = 2;

type Loaded = std::result::Result<(Image, Option<Truth>), VigilError>;

/// Scores every item with the pipeline and calls `visit` on each, in order. Unreadable files
/// (image or mask) stop the run, or are skipped and returned under [`BadFilePolicy::Skip`].
/// A run in which items were given but none could be scored is an error.
pub fn score_items(
    det: &dyn Detector,
    pipeline: &Pipeline,
    items: &[Item],
    options: LoopOptions,
    label: &str,
    mut visit: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<Vec<Skipped>> {
    let mut skipped = Vec::new();
    let mut scored_any = false;
    let mut truth_notes = TruthNotes::default();
    std::thread::scope(|scope| -> Result<()> {
        let (send, receive) = mpsc::sync_channel::<Loaded>(QUEUE);
        scope.spawn(move || {
            for item in items {
                if send.send(load(item, options)).is_err() {
                    return; // the scorer stopped
                }
            }
        });
        let mut progress = Progress::new(items.len(), label);
        for (item, loaded) in items.iter().zip(receive.iter()) {
            let (image, truth) = match loaded {
                Ok(x) => x,
                Err(e) if pipeline.policy == BadFilePolicy::Skip => {
                    crate::warn(format!("skipped {}: {e}", item.path.display()));
                    let skip = Skipped { path: item.path.clone(), reason: e.to_string() };
                    visit(Event::Skipped(&skip))?;
                    skipped.push(skip);
                    progress.inc();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            truth_notes.check(item, truth.as_ref());
            let truth = match (truth.map(Mask::from), item.label) {
                (Some(t), _) => Some(t),
                // A normal image's ground truth is all zero.
                (None, Some(false)) => Some(Mask::empty(image.width, image.height)),
                (None, _) => None,
            };
            let start = Instant::now();
            let scored = pipeline.score(det, &image, &item.path.display().to_string())?;
            let seconds = start.elapsed().as_secs_f64();
            visit(Event::Scored(ScoredItem { item, image, truth, scored, seconds }))?;
            scored_any = true;
            progress.inc();
        }
        Ok(())
    })?;
    truth_notes.report();
    if !items.is_empty() && !scored_any {
        bail!(
            "no image could be scored: all {} files were skipped (first: {}: {})",
            items.len(),
            skipped[0].path.display(),
            skipped[0].reason
        );
    }
    Ok(skipped)
}

fn load(item: &Item, options: LoopOptions) -> Loaded {
    let image = vigil_data::io::load_image(&item.path)?;
    let truth = match &item.mask {
        Some(m) => Some(load_truth(m, (image.width, image.height), options.resize_masks)?),
        None => None,
    };
    Ok((image, truth))
}

/// A ground-truth mask with a note of whether its file was binary.
struct Truth {
    mask: Mask,
    binary: bool,
}

fn load_truth(path: &Path, (w, h): (usize, usize), resize: bool) -> std::result::Result<Truth, VigilError> {
    let image = vigil_data::io::load_image(path)?;
    let binary = image.data.iter().all(|&v| v == 0.0 || v == 1.0);
    let n = image.plane_len();
    let data = (0..n).map(|i| (0..image.channels).any(|c| image.channel(c)[i] > 0.0)).collect();
    let mask =
        Mask::new(image.width, image.height, data).map_err(|e| VigilError::file(path, e.to_string()))?;
    let mask = match (mask.width, mask.height) {
        (mw, mh) if (mw, mh) == (w, h) => mask,
        _ if resize => mask.resize_nearest(w, h),
        (mw, mh) => {
            return Err(VigilError::file(
                path,
                format!(
                    "mask is {mw}x{mh} but the image is {w}x{h} (width x height); give a mask of the image's \
                     size or allow resizing (--resize-masks)"
                ),
            ))
        }
    };
    Ok(Truth { mask, binary })
}

impl From<Truth> for Mask {
    fn from(t: Truth) -> Mask {
        t.mask
    }
}

/// Ground-truth problems, reported once per run rather than once per image.
#[derive(Default)]
struct TruthNotes {
    all_zero: Vec<PathBuf>,
    not_binary: Vec<PathBuf>,
}

impl TruthNotes {
    fn check(&mut self, item: &Item, truth: Option<&Truth>) {
        let Some(t) = truth else { return };
        let mask_path = item.mask.clone().unwrap_or_default();
        if item.label == Some(true) && t.mask.count() == 0 {
            self.all_zero.push(mask_path.clone());
        }
        if !t.binary {
            self.not_binary.push(mask_path);
        }
    }

    fn report(&self) {
        if let Some(first) = self.all_zero.first() {
            crate::warn(format!(
                "{} ground-truth mask(s) of anomalous images are all zero (first: {}): pixel metrics count \
                 those images as defect-free",
                self.all_zero.len(),
                first.display()
            ));
        }
        if let Some(first) = self.not_binary.first() {
            crate::warn(format!(
                "{} ground-truth mask(s) are not binary (first: {}): every non-zero pixel counts as defect",
                self.not_binary.len(),
                first.display()
            ));
        }
    }
}

/// Which files of a folder are images to score: by extension, optionally matching a `--glob`
/// pattern on the file name (`*` and `?`), optionally in sub-folders too. Hidden entries are left out.
#[derive(Clone, Debug, Default)]
pub struct ImageFilter {
    pub glob: Option<String>,
    pub recursive: bool,
}

impl ImageFilter {
    pub fn accepts(&self, path: &Path) -> bool {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        vigil_data::io::has_image_extension(path) && self.glob.as_deref().is_none_or(|g| glob_match(g, &name))
    }

    /// The image files under `dir`, sorted by their path relative to it.
    pub fn list(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        if !dir.is_dir() {
            bail!("{}: folder not found; check the path", dir.display());
        }
        let mut files = Vec::new();
        let mut folders = vec![dir.to_path_buf()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).with_context(|| folder.display().to_string())? {
                let path = entry.with_context(|| folder.display().to_string())?.path();
                if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                    continue;
                }
                if path.is_dir() && self.recursive {
                    folders.push(path);
                } else if path.is_file() && self.accepts(&path) {
                    files.push(path);
                }
            }
        }
        if files.is_empty() {
            let what =
                if self.recursive { "nor in its sub-folders" } else { "(sub-folders are not searched)" };
            let glob = self.glob.as_deref().map(|g| format!(" matching '{g}'")).unwrap_or_default();
            bail!("{}: empty folder: no image file{glob} in it {what}", dir.display());
        }
        files.sort();
        Ok(files)
    }
}

/// Shell-style match of a whole file name: `*` any run of characters, `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Test items of a dataset, leaving out files that are the ground-truth mask of another item
/// (masks kept beside their images) and files the filter does not accept. Files that differ only
/// by extension (`x.png`, `x.jpg`) keep it in their names, so every output name is unique.
pub fn test_items(dataset: &vigil_data::Dataset, filter: &ImageFilter) -> Vec<Item> {
    let masks: std::collections::HashSet<&PathBuf> =
        dataset.test.iter().filter_map(|t| t.mask.as_ref()).collect();
    let mut items: Vec<Item> = dataset
        .test
        .iter()
        .filter(|t| !masks.contains(&t.path) && filter.accepts(&t.path))
        .map(Item::from_test)
        .collect();
    let mut count = std::collections::HashMap::<String, usize>::new();
    for item in &items {
        *count.entry(item.name.clone()).or_default() += 1;
    }
    let mut taken = std::collections::HashSet::new();
    for item in &mut items {
        if count[&item.name] > 1 {
            let ext = item.path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
            item.name = format!("{}_{ext}", item.name);
        }
        let base = item.name.clone();
        for n in 2.. {
            if taken.insert(item.name.clone()) {
                break;
            }
            item.name = format!("{base}_{n}");
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_whole_names() {
        assert!(glob_match("*.png", "a.png"));
        assert!(!glob_match("*.png", "a.png.jpg"));
        assert!(glob_match("img_??.jp*g", "img_01.jpeg"));
        assert!(!glob_match("img_?.png", "img_10.png"));
        assert!(glob_match("*", ""));
    }
}
