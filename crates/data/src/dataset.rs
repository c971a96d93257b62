//! Datasets on disk: the MVTec AD layout and a generic set of folders.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vigil_core::{Result, VigilError};

use crate::io::{list_images, list_images_recursive};

/// The defect-type name of normal test images in the MVTec layout.
pub const GOOD: &str = "good";

/// One test image with its label.
#[derive(Clone, Debug, PartialEq)]
pub struct TestItem {
    pub path: PathBuf,
    /// True for an anomalous image.
    pub label: bool,
    /// The defect type (the folder name), or "good".
    pub kind: String,
    /// The image's name in its set: `<kind>/<path under the kind's folder>` without extension
    /// (e.g. `crack/000`, `good/line2/017`), unique except for files that differ only by extension.
    pub name: String,
    /// The ground-truth mask file; None for normal images (all zero) and for defect types that
    /// come without masks.
    pub mask: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    /// Normal images to learn from.
    pub train: Vec<PathBuf>,
    pub test: Vec<TestItem>,
}

fn folder_name(path: &Path) -> String {
    path.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// `path` relative to `root`, without extension, with `/` separators.
fn relative_name(path: &Path, root: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path).with_extension("");
    relative.to_string_lossy().replace('\\', "/")
}

/// The folder of `path` relative to `root` (empty for a file directly in `root`).
fn relative_folder<'a>(path: &'a Path, root: &Path) -> &'a Path {
    path.strip_prefix(root).ok().and_then(Path::parent).unwrap_or(Path::new(""))
}

/// Sub-folders of `dir`, sorted by name, hidden ones left out.
fn subfolders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| VigilError::io(dir, e))? {
        let path = entry.map_err(|e| VigilError::io(dir, e))?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if path.is_dir() && !hidden {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

impl Dataset {
    /// The MVTec AD layout: `<root>/train/good`, `<root>/test/<kind>` ("good" is normal) and
    /// `<root>/ground_truth/<kind>/<stem>_mask.png`. Sub-folders of a kind's folder are read too,
    /// their masks in the same sub-folders under `ground_truth/<kind>`. An anomalous image without its mask is an
    /// error, unless its kind has no ground-truth folder at all (image labels only). A missing
    /// `test` folder gives an empty test set (enough to fit).
    pub fn mvtec(root: &Path) -> Result<Dataset> {
        let train_dir = root.join("train").join(GOOD);
        if !train_dir.is_dir() {
            return Err(VigilError::file(
                root,
                "not an MVTec-layout dataset: the folder train/good is missing \
                 (for other layouts give the normal and test folders separately)",
            ));
        }
        let train = list_images(&train_dir)?;
        let test_dir = root.join("test");
        let mut test = Vec::new();
        if test_dir.is_dir() {
            for kind_dir in subfolders(&test_dir)? {
                let kind = folder_name(&kind_dir);
                let label = kind != GOOD;
                let gt_dir = root.join("ground_truth").join(&kind);
                let with_masks = label && gt_dir.is_dir();
                for path in list_images_recursive(&kind_dir, &[])? {
                    let name = format!("{kind}/{}", relative_name(&path, &kind_dir));
                    let mask = if with_masks {
                        let mask = gt_dir
                            .join(relative_folder(&path, &kind_dir))
                            .join(format!("{}_mask.png", stem(&path)));
                        if !mask.is_file() {
                            return Err(VigilError::file(
                                &path,
                                format!(
                                    "anomalous image has no ground-truth mask (expected {})",
                                    mask.display()
                                ),
                            ));
                        }
                        Some(mask)
                    } else {
                        None
                    };
                    test.push(TestItem { path, label, kind: kind.clone(), name, mask });
                }
            }
        }
        Ok(Dataset { name: folder_name(root), train, test })
    }

    /// A generic layout: optional folders of normal training images (absent when only testing),
    /// of normal and of anomalous test images, and optionally a folder of masks for the anomalous
    /// ones, named by `mask_pattern` where `{stem}` is the image name without extension and
    /// `{name}` the full name (e.g. "{stem}_mask.png"). Anomalous images get their folder's name
    /// as kind. The test folders are read with their sub-folders: an anomalous image in a sub-folder
    /// takes that sub-folder's name as kind, and its mask is looked for in the same sub-folder of
    /// the mask folder (which is left out of the image folders when it lies inside one). The
    /// dataset is named after the first folder given.
    pub fn folders(
        normal_train: Option<&Path>,
        test_normal: Option<&Path>,
        test_anomalous: Option<&Path>,
        mask_dir: Option<&Path>,
        mask_pattern: &str,
    ) -> Result<Dataset> {
        if mask_dir.is_some() && !(mask_pattern.contains("{stem}") || mask_pattern.contains("{name}")) {
            return Err(VigilError::Config(format!(
                "mask pattern '{mask_pattern}' names no image: it must contain {{stem}} or {{name}}"
            )));
        }
        if let Some(dir) = mask_dir.filter(|d| !d.is_dir()) {
            return Err(VigilError::file(dir, "mask folder not found"));
        }
        let Some(first) = normal_train.or(test_normal).or(test_anomalous) else {
            return Err(VigilError::Config("no image folder given (train, normal or anomalous)".into()));
        };
        let train = match normal_train {
            Some(dir) => list_images(dir)?,
            None => Vec::new(),
        };
        let mut test = Vec::new();
        let exclude: Vec<&Path> = mask_dir.into_iter().collect();
        if let Some(dir) = test_normal {
            test.extend(list_images_recursive(dir, &exclude)?.into_iter().map(|path| TestItem {
                name: format!("{GOOD}/{}", relative_name(&path, dir)),
                path,
                label: false,
                kind: GOOD.to_string(),
                mask: None,
            }));
        }
        if let Some(dir) = test_anomalous {
            let folder_kind = folder_name(dir);
            for path in list_images_recursive(dir, &exclude)? {
                let sub_folder = relative_folder(&path, dir);
                let (kind, name) = match sub_folder.components().next() {
                    Some(first) => {
                        (first.as_os_str().to_string_lossy().into_owned(), relative_name(&path, dir))
                    }
                    None => (folder_kind.clone(), format!("{folder_kind}/{}", relative_name(&path, dir))),
                };
                let mask = match mask_dir {
                    None => None,
                    Some(mask_dir) => {
                        let file = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
                        let mask = mask_dir
                            .join(sub_folder)
                            .join(mask_pattern.replace("{stem}", &stem(&path)).replace("{name}", &file));
                        if !mask.is_file() {
                            return Err(VigilError::file(
                                &path,
                                format!("anomalous image has no mask (expected {})", mask.display()),
                            ));
                        }
                        Some(mask)
                    }
                };
                test.push(TestItem { path, label: true, kind, name, mask });
            }
        }
        Ok(Dataset { name: folder_name(first), train, test })
    }

    /// Opens a dataset by recognising its layout; today the MVTec layout (`<root>/train/good`).
    pub fn discover(root: &Path) -> Result<Dataset> {
        if !root.is_dir() {
            return Err(VigilError::file(root, "dataset folder not found"));
        }
        if root.join("train").join(GOOD).is_dir() {
            return Dataset::mvtec(root);
        }
        let classes = list_classes(root)?;
        let hint = if classes.is_empty() {
            String::new()
        } else {
            format!(
                " It holds {} classes in that layout: give one of them, e.g. {}.",
                classes.len(),
                classes[0].display()
            )
        };
        Err(VigilError::file(
            root,
            format!("no dataset layout recognised: expected train/good inside (MVTec layout).{hint}"),
        ))
    }

    /// Counts for messages: (train, normal test, anomalous test).
    pub fn counts(&self) -> (usize, usize, usize) {
        let anomalous = self.test.iter().filter(|t| t.label).count();
        (self.train.len(), self.test.len() - anomalous, anomalous)
    }
}

/// The sub-folders of a multi-class root (such as MVTec AD or piped/) that are MVTec-layout
/// classes, sorted by name. Empty when there are none; an error only if `root` is not a folder.
pub fn list_classes(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        return Err(VigilError::file(root, "dataset folder not found"));
    }
    Ok(subfolders(root)?.into_iter().filter(|d| d.join("train").join(GOOD).is_dir()).collect())
}

/// Splits normal images into (fit, held out) deterministically for a seed. The held-out share is
/// `round(fraction · n)`, at least 1 when `fraction > 0` and there are 2 images or more, and never
/// all of them (at least one image is left to fit). `fraction` is clamped to [0, 1]; NaN means 0.
/// Both parts keep the input order.
pub fn validation_split(train: &[PathBuf], fraction: f64, seed: u64) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let n = train.len();
    let fraction = if fraction.is_nan() { 0.0 } else { fraction.clamp(0.0, 1.0) };
    if fraction == 0.0 || n < 2 {
        return (train.to_vec(), Vec::new());
    }
    let held = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let mut is_held = vec![false; n];
    for &i in &order[..held] {
        is_held[i] = true;
    }
    let (mut fit, mut val) = (Vec::with_capacity(n - held), Vec::with_capacity(held));
    for (path, held) in train.iter().zip(is_held) {
        if held {
            val.push(path.clone());
        } else {
            fit.push(path.clone());
        }
    }
    (fit, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{load_image, load_mask};
    use crate::source::{FileSource, SourceOptions};
    use crate::testutil::{piped_class, write_rgb8};
    use vigil_core::{ChannelMode, ImageSource};

    fn paths(n: usize) -> Vec<PathBuf> {
        (0..n).map(|i| PathBuf::from(format!("{i:03}.png"))).collect()
    }

    #[test]
    fn validation_split_is_deterministic_and_bounded() {
        let all = paths(10);
        let (fit, val) = validation_split(&all, 0.2, 7);
        assert_eq!((fit.len(), val.len()), (8, 2));
        assert_eq!(validation_split(&all, 0.2, 7), (fit.clone(), val.clone()));
        assert_ne!(validation_split(&all, 0.5, 1).1, validation_split(&all, 0.5, 2).1);
        let mut joined: Vec<_> = fit.iter().chain(&val).cloned().collect();
        joined.sort();
        assert_eq!(joined, all);
        assert_eq!(validation_split(&paths(2), 0.01, 0).1.len(), 1);
        assert_eq!(validation_split(&paths(5), 1.0, 0).0.len(), 1);
        assert!(validation_split(&paths(1), 0.5, 0).1.is_empty());
        assert!(validation_split(&all, 0.0, 0).1.is_empty());
    }

    fn mvtec_tree(root: &Path, with_gt: bool, drop_mask: bool) {
        for (dir, names) in
            [("train/good", vec!["a", "b"]), ("test/good", vec!["c"]), ("test/crack", vec!["d", "e"])]
        {
            for n in names {
                write_rgb8(&root.join(dir).join(format!("{n}.png")), 4, 4, 10);
            }
        }
        if with_gt {
            write_rgb8(&root.join("ground_truth/crack/d_mask.png"), 4, 4, 255);
            if !drop_mask {
                write_rgb8(&root.join("ground_truth/crack/e_mask.png"), 4, 4, 255);
            }
        }
    }

    #[test]
    fn mvtec_layout_with_and_without_ground_truth() {
        let dir = tempfile::tempdir().unwrap();
        mvtec_tree(dir.path(), true, false);
        let ds = Dataset::discover(dir.path()).unwrap();
        assert_eq!(ds.counts(), (2, 1, 2));
        let d = ds.test.iter().find(|t| t.path.ends_with("d.png")).unwrap();
        assert!(d.label && d.kind == "crack" && d.mask.as_ref().unwrap().ends_with("crack/d_mask.png"));
        assert!(ds.test.iter().find(|t| t.kind == GOOD).unwrap().mask.is_none());

        let no_gt = tempfile::tempdir().unwrap();
        mvtec_tree(no_gt.path(), false, false);
        assert!(Dataset::mvtec(no_gt.path()).unwrap().test.iter().all(|t| t.mask.is_none()));

        let missing = tempfile::tempdir().unwrap();
        mvtec_tree(missing.path(), true, true);
        let err = Dataset::mvtec(missing.path()).unwrap_err().to_string();
        assert!(err.contains("e.png") && err.contains("e_mask.png"), "{err}");
    }

    #[test]
    fn discover_explains_unknown_layouts_and_lists_classes() {
        let dir = tempfile::tempdir().unwrap();
        mvtec_tree(&dir.path().join("bottle"), false, false);
        std::fs::create_dir(dir.path().join("notes")).unwrap();
        assert_eq!(list_classes(dir.path()).unwrap(), vec![dir.path().join("bottle")]);
        let err = Dataset::discover(dir.path()).unwrap_err().to_string();
        assert!(err.contains("train/good") && err.contains("bottle"), "{err}");
        assert!(Dataset::discover(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn generic_folders_with_mask_pattern() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        write_rgb8(&p.join("normal/n1.png"), 4, 4, 1);
        write_rgb8(&p.join("ok/t1.png"), 4, 4, 1);
        write_rgb8(&p.join("defect/x1.png"), 4, 4, 1);
        write_rgb8(&p.join("masks/x1_gt.png"), 4, 4, 255);
        let (normal, ok, defect, masks) = (p.join("normal"), p.join("ok"), p.join("defect"), p.join("masks"));
        let ds =
            Dataset::folders(Some(&normal), Some(&ok), Some(&defect), Some(&masks), "{stem}_gt.png").unwrap();
        assert_eq!(ds.counts(), (1, 1, 1));
        let x = &ds.test[1];
        assert_eq!((x.kind.as_str(), x.mask.clone()), ("defect", Some(masks.join("x1_gt.png"))));
        let err =
            Dataset::folders(Some(&normal), None, Some(&defect), Some(&masks), "{stem}.png").unwrap_err();
        assert!(err.to_string().contains("x1.png"), "{err}");
        assert!(Dataset::folders(Some(&normal), None, Some(&defect), Some(&masks), "gt.png").is_err());
        let test_only = Dataset::folders(None, None, Some(&defect), None, "{stem}_gt.png").unwrap();
        assert_eq!((test_only.name.as_str(), test_only.counts()), ("defect", (0, 0, 1)));
        assert!(test_only.test[0].mask.is_none());
        assert!(Dataset::folders(None, None, None, None, "{stem}").is_err());
    }

    #[test]
    fn test_folders_are_read_with_their_sub_folders() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for f in ["normal/line1/a.png", "normal/b.png", "defects/crack/a.png", "defects/hole/deep/a.png"] {
            write_rgb8(&p.join(f), 4, 4, 1);
        }
        // The mask folder lies inside the anomalous folder and mirrors its sub-folders.
        for f in ["defects/gt/crack/a_mask.png", "defects/gt/hole/deep/a_mask.png"] {
            write_rgb8(&p.join(f), 4, 4, 255);
        }
        let (normal, defects, gt) = (p.join("normal"), p.join("defects"), p.join("defects/gt"));
        let ds = Dataset::folders(None, Some(&normal), Some(&defects), Some(&gt), "{stem}_mask.png").unwrap();
        let found: Vec<(&str, &str, bool)> =
            ds.test.iter().map(|t| (t.name.as_str(), t.kind.as_str(), t.mask.is_some())).collect();
        assert_eq!(
            found,
            [
                ("good/b", "good", false),
                ("good/line1/a", "good", false),
                ("crack/a", "crack", true),
                ("hole/deep/a", "hole", true)
            ]
        );
        assert!(ds.test[3].mask.as_ref().unwrap().ends_with("gt/hole/deep/a_mask.png"));

        // MVTec: file names repeat across kinds; a nested folder keeps its path and mask folder.
        mvtec_tree(&p.join("cls"), true, false);
        write_rgb8(&p.join("cls/test/crack/side/d.png"), 4, 4, 1);
        let missing = Dataset::mvtec(&p.join("cls")).unwrap_err().to_string();
        assert!(missing.contains("ground_truth/crack/side/d_mask.png"), "{missing}");
        write_rgb8(&p.join("cls/ground_truth/crack/side/d_mask.png"), 4, 4, 255);
        write_rgb8(&p.join("cls/test/good/d.png"), 4, 4, 1);
        let names: Vec<String> =
            Dataset::mvtec(&p.join("cls")).unwrap().test.into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["crack/d", "crack/e", "crack/side/d", "good/c", "good/d"]);
    }

    #[test]
    fn piped_class_has_mvtec_layout() {
        let Some(root) = piped_class("PA_BDP01_TL") else { return };
        let ds = Dataset::mvtec(&root).unwrap();
        assert_eq!(ds.name, "PA_BDP01_TL");
        assert_eq!(ds.counts(), (32, 16, 48));
        assert!(ds.test.iter().filter(|t| t.label).all(|t| t.kind == "impurity" && t.mask.is_some()));
        let source = FileSource::open(&ds.train, SourceOptions::new(ChannelMode::Rgb)).unwrap();
        assert_eq!((source.len(), source.size(0)), (32, (128, 128)));
    }

    #[test]
    fn piped_odd_sized_image_has_a_matching_mask() {
        // PA_BTN01_RL_S_D_07_2 is 127x128 (width x height); its mask has the same size, so it loads
        // strictly, without resizing.
        let Some(root) = piped_class("PA_BTN01_RL") else { return };
        let ds = Dataset::mvtec(&root).unwrap();
        let item = ds.test.iter().find(|t| t.path.ends_with("PA_BTN01_RL_S_D_07_2.png")).unwrap();
        let image = load_image(&item.path).unwrap();
        assert_eq!((image.width, image.height, image.channels), (127, 128, 3));
        let mask = load_mask(item.mask.as_ref().unwrap(), Some((127, 128)), false).unwrap();
        assert!(mask.count() > 0);
        assert!(load_mask(item.mask.as_ref().unwrap(), Some((128, 128)), false).is_err());
    }
}
