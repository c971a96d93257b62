//! The one per-image loop of vigil: load → (skip a bad file) → score → hand over. Validation,
//! evaluation and prediction all go through [`score_items`] or [`process_items`].
//!
//! The loop is a bounded pipeline of threads: a decoder reads the next files, the scorer runs the
//! method, workers turn scored images into what the caller keeps (encoded maps, files written) in
//! parallel, and the calling thread receives the results in input order. Whatever the threads'
//! timing, the caller sees the same sequence of events (rows, errors, skipped files) as a plain
//! loop would give, and at most [`in_flight`] scored images wait anywhere, so memory stays bounded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
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

/// What the loop hands over, in input order: a scored image (or what `prepare` made of it, for
/// [`process_items`]), or a file skipped under `--skip-bad`.
pub enum Event<'a, T = ScoredItem<'a>> {
    Scored(T),
    Skipped(&'a Skipped),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LoopOptions {
    /// Resample ground-truth masks whose size differs from their image instead of stopping.
    pub resize_masks: bool,
}

/// How many decoded images may wait for the scorer.
const DECODED_QUEUE: usize = 2;

/// Threads that run `prepare` of [`process_items`]: one per rayon thread (the run's thread budget),
/// at most 4; beyond that writing is limited by the disk, not the CPU.
fn workers() -> usize {
    rayon::current_num_threads().clamp(1, 4)
}

/// At most this many images are between the scorer and the caller (scored and not yet handed
/// over): enough to keep every worker busy and the scorer running while one image is slow.
pub fn in_flight() -> usize {
    2 * workers()
}

type Loaded = std::result::Result<(Image, Option<Truth>), VigilError>;

/// Scores every item with the pipeline and calls `visit` on each, in order. Unreadable files
/// (image or mask) stop the run, or are skipped and returned under [`BadFilePolicy::Skip`].
/// A run in which items were given but none could be scored is an error. `visit` runs on the
/// calling thread while the next images are decoded and scored.
pub fn score_items<'i>(
    det: &dyn Detector,
    pipeline: &Pipeline,
    items: &'i [Item],
    options: LoopOptions,
    label: &str,
    mut visit: impl FnMut(Event<'_>) -> Result<()>,
) -> Result<Vec<Skipped>> {
    process_items(det, pipeline, items, options, label, Ok, |event: Event<'_, ScoredItem<'i>>| {
        visit(match event {
            Event::Scored(s) => Event::Scored(s),
            Event::Skipped(k) => Event::Skipped(k),
        })
    })
}

/// [`score_items`] with a `prepare` step that runs on worker threads, several images at a time
/// and in any order (encoding and writing each image's own files), while `visit` receives the
/// prepared results on the calling thread in input order (rows of a table). An error of any step
/// is returned when its image's turn comes, after every earlier image was visited, as in a
/// sequential loop; later images may by then have been prepared (at most [`in_flight`]).
pub fn process_items<'i, T: Send>(
    det: &dyn Detector,
    pipeline: &Pipeline,
    items: &'i [Item],
    options: LoopOptions,
    label: &str,
    prepare: impl Fn(ScoredItem<'i>) -> Result<T> + Sync,
    mut visit: impl FnMut(Event<'_, T>) -> Result<()>,
) -> Result<Vec<Skipped>> {
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut scored_any = false;
    let stop = AtomicBool::new(false);
    let (job_send, jobs) = mpsc::sync_channel::<(usize, Job<'i>)>(workers());
    let jobs = Mutex::new(jobs);
    let truth_notes = std::thread::scope(|scope| -> Result<TruthNotes> {
        let (decoded_send, decoded) = mpsc::sync_channel::<(usize, Loaded)>(DECODED_QUEUE);
        let (done_send, done) = mpsc::channel::<(usize, Outcome<T>)>();
        // Tokens bounding the images between the scorer and the caller: the scorer takes one per
        // image, the caller gives it back once the image is handed over.
        let (token_back, tokens) = mpsc::sync_channel::<()>(in_flight());
        for _ in 0..in_flight() {
            token_back.send(()).expect("the token queue holds in_flight() tokens");
        }
        let stop = &stop;
        scope.spawn(move || {
            for (index, item) in items.iter().enumerate() {
                if stop.load(Ordering::Relaxed) || decoded_send.send((index, load(item, options))).is_err() {
                    return;
                }
            }
        });
        let scorer = scope.spawn(move || score_stage(det, pipeline, items, decoded, tokens, job_send, stop));
        let (jobs, prepare) = (&jobs, &prepare);
        for _ in 0..workers() {
            let done_send = done_send.clone();
            // A worker ends only when the scorer has ended (the job queue is closed); after a
            // stop it drains the queue without preparing, so the scorer is never left blocked.
            scope.spawn(move || loop {
                // The lock is held only to take the next job, not while preparing it.
                let next = jobs.lock().map_err(|_| ()).and_then(|j| j.recv().map_err(|_| ()));
                let Ok((index, job)) = next else { return };
                if stop.load(Ordering::Relaxed) {
                    continue;
                }
                let outcome = match job {
                    Job::Scored(s) => match prepare(s) {
                        Ok(t) => Outcome::Prepared(t),
                        Err(e) => Outcome::Failed(e),
                    },
                    Job::Skipped(k) => Outcome::Skipped(k),
                    Job::Failed(e) => Outcome::Failed(e),
                };
                // The caller may have stopped; the job queue is still drained.
                let _ = done_send.send((index, outcome));
            });
        }
        drop(done_send);
        let mut progress = Progress::new(items.len(), label);
        let mut waiting: BTreeMap<usize, Outcome<T>> = BTreeMap::new();
        let mut next = 0;
        let handed_over = (|| -> Result<()> {
            for (index, outcome) in done {
                waiting.insert(index, outcome);
                while let Some(outcome) = waiting.remove(&next) {
                    match outcome {
                        Outcome::Prepared(t) => {
                            visit(Event::Scored(t))?;
                            scored_any = true;
                        }
                        Outcome::Skipped(skip) => {
                            crate::warn(format!("skipped {}: {}", skip.path.display(), skip.reason));
                            visit(Event::Skipped(&skip))?;
                            skipped.push(skip);
                        }
                        Outcome::Failed(e) => return Err(e),
                    }
                    progress.inc();
                    next += 1;
                    // The scorer may be gone (all items scored); a token nobody takes is harmless.
                    let _ = token_back.try_send(());
                }
            }
            Ok(())
        })();
        // On an error, the other stages stop at their next step instead of finishing the run.
        stop.store(true, Ordering::Relaxed);
        drop(token_back);
        let notes = scorer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        handed_over?;
        if next < items.len() {
            bail!(
                "the image loop ended after {next} of {} images without an error; this is a bug",
                items.len()
            );
        }
        Ok(notes)
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

/// What the scorer hands to the workers.
enum Job<'i> {
    Scored(ScoredItem<'i>),
    Skipped(Skipped),
    Failed(anyhow::Error),
}

/// What the workers hand to the caller.
enum Outcome<T> {
    Prepared(T),
    Skipped(Skipped),
    Failed(anyhow::Error),
}

/// The scorer: images in input order, one at a time (the method parallelises inside), each
/// after taking a token. Stops after the first error, which it passes on in its image's place.
fn score_stage<'i>(
    det: &dyn Detector,
    pipeline: &Pipeline,
    items: &'i [Item],
    decoded: mpsc::Receiver<(usize, Loaded)>,
    tokens: mpsc::Receiver<()>,
    jobs: mpsc::SyncSender<(usize, Job<'i>)>,
    stop: &AtomicBool,
) -> TruthNotes {
    let mut truth_notes = TruthNotes::default();
    for (index, loaded) in decoded {
        if tokens.recv().is_err() || stop.load(Ordering::Relaxed) {
            break;
        }
        let item = &items[index];
        let job = match loaded {
            Ok((image, truth)) => {
                truth_notes.check(item, truth.as_ref());
                let truth = match (truth.map(Mask::from), item.label) {
                    (Some(t), _) => Some(t),
                    // A normal image's ground truth is all zero.
                    (None, Some(false)) => Some(Mask::empty(image.width, image.height)),
                    (None, _) => None,
                };
                let start = Instant::now();
                match pipeline.score(det, &image, &item.path.display().to_string()) {
                    Ok(scored) => {
                        let seconds = start.elapsed().as_secs_f64();
                        Job::Scored(ScoredItem { item, image, truth, scored, seconds })
                    }
                    Err(e) => Job::Failed(e),
                }
            }
            Err(e) if pipeline.policy == BadFilePolicy::Skip => {
                Job::Skipped(Skipped { path: item.path.clone(), reason: e.to_string() })
            }
            Err(e) => Job::Failed(e.into()),
        };
        let last = matches!(job, Job::Failed(_));
        if jobs.send((index, job)).is_err() || last {
            break;
        }
    }
    truth_notes
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
