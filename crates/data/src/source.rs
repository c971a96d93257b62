//! Image files as a [`vigil_core::ImageSource`]: channel conversion, optional resize, an optional
//! ignore mask, and a policy for unreadable files decided before any method runs.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use vigil_core::fingerprint::{sha256_file, sha256_hex};
use vigil_core::{ChannelMode, DataFingerprint, Image, ImageSource, Mask, Result, VigilError};

use crate::io::load_image;

/// What to do with a file that cannot be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BadFilePolicy {
    /// The first bad file (in list order) is the error.
    #[default]
    Stop,
    /// Bad files are left out and listed in [`FileSource::skipped`].
    Skip,
}

#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub channel_mode: ChannelMode,
    /// Resample every image to (width, height) with bilinear interpolation.
    pub resize: Option<(usize, usize)>,
    /// Pixels to leave out of the statistics (the "before" ignore mode), at the images' original
    /// size; it is resized with them (nearest neighbour) when `resize` is set.
    pub ignore: Option<Mask>,
    pub bad_files: BadFilePolicy,
}

impl SourceOptions {
    pub fn new(channel_mode: ChannelMode) -> Self {
        SourceOptions { channel_mode, resize: None, ignore: None, bad_files: BadFilePolicy::Stop }
    }
}

/// Image files loaded on demand. Every file is decoded once in [`FileSource::open`], so that a
/// method fitting on it never meets an unreadable file half-way through a long fit.
#[derive(Debug)]
pub struct FileSource {
    paths: Vec<PathBuf>,
    /// (width, height) of each file as decoded, before any resizing.
    file_sizes: Vec<(usize, usize)>,
    options: SourceOptions,
    /// The ignore mask at the delivered size.
    ignore: Option<Mask>,
    skipped: Vec<(PathBuf, VigilError)>,
}

impl FileSource {
    /// Checks every file (in parallel) and keeps the readable ones. An image whose size differs
    /// from the ignore mask counts as a bad file. Errors when no file is left.
    pub fn open(paths: &[PathBuf], options: SourceOptions) -> Result<FileSource> {
        if paths.is_empty() {
            return Err(VigilError::invalid("no image files were given"));
        }
        if let Some((w, h)) = options.resize {
            if w == 0 || h == 0 {
                return Err(VigilError::Config(format!("resize target {w}x{h} is empty")));
            }
        }
        let checked: Vec<Result<(usize, usize)>> =
            paths.par_iter().map(|p| check_file(p, options.ignore.as_ref())).collect();
        let (mut kept, mut file_sizes, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        for (path, outcome) in paths.iter().zip(checked) {
            match outcome {
                Ok(size) => {
                    kept.push(path.clone());
                    file_sizes.push(size);
                }
                Err(e) if options.bad_files == BadFilePolicy::Skip => skipped.push((path.clone(), e)),
                Err(e) => return Err(e),
            }
        }
        if kept.is_empty() {
            return Err(VigilError::invalid(format!(
                "none of the {} image files could be read (first: {})",
                paths.len(),
                skipped[0].1
            )));
        }
        let ignore = options.ignore.as_ref().map(|m| match options.resize {
            Some((w, h)) => m.resize_nearest(w, h),
            None => m.clone(),
        });
        Ok(FileSource { paths: kept, file_sizes, options, ignore, skipped })
    }

    /// The files that are used, in order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// (width, height) of image `index` as [`ImageSource::load`] returns it.
    pub fn size(&self, index: usize) -> (usize, usize) {
        self.options.resize.unwrap_or(self.file_sizes[index])
    }

    /// Files left out under [`BadFilePolicy::Skip`], with why, for the caller to report.
    pub fn skipped(&self) -> &[(PathBuf, VigilError)] {
        &self.skipped
    }

    pub fn options(&self) -> &SourceOptions {
        &self.options
    }

    /// Converts and resizes a loaded image the way [`ImageSource::load`] delivers it; the caller
    /// applies it to test images so they match what the method was fitted on.
    pub fn prepare(&self, image: &Image) -> Image {
        let image = self.options.channel_mode.convert(image);
        match self.options.resize {
            Some((w, h)) => image.resize_bilinear(w, h),
            None => image,
        }
    }
}

fn check_file(path: &Path, ignore: Option<&Mask>) -> Result<(usize, usize)> {
    let image = load_image(path)?;
    if let Some(mask) = ignore {
        if (mask.width, mask.height) != (image.width, image.height) {
            return Err(VigilError::file(
                path,
                format!(
                    "image is {}x{} but the ignore mask is {}x{} (width x height)",
                    image.width, image.height, mask.width, mask.height
                ),
            ));
        }
    }
    Ok((image.width, image.height))
}

impl ImageSource for FileSource {
    fn len(&self) -> usize {
        self.paths.len()
    }

    fn name(&self, index: usize) -> String {
        self.paths[index].display().to_string()
    }

    fn load(&self, index: usize) -> Result<Image> {
        let path = &self.paths[index];
        let image = load_image(path)?;
        // The file was readable at open; one that changed since then is reported, not trusted.
        if (image.width, image.height) != self.file_sizes[index] {
            return Err(VigilError::file(path, "the image changed size while it was in use"));
        }
        Ok(self.prepare(&image))
    }

    fn ignore_mask(&self, _index: usize) -> Option<Mask> {
        self.ignore.clone()
    }

    /// The files' names (relative to their common folder), sizes and SHA-256, and the options
    /// that change what a method sees (channels, resize, ignore mask); the origin is that folder.
    fn fingerprint(&self) -> Result<DataFingerprint> {
        let folder = common_folder(&self.paths);
        let digests: Vec<String> = self.paths.par_iter().map(|p| sha256_file(p)).collect::<Result<_>>()?;
        let mut manifest =
            format!("channels {:?}\nresize {:?}\n", self.options.channel_mode, self.options.resize);
        if let Some(mask) = &self.ignore {
            let bits: Vec<u8> = mask.data.iter().map(|&b| b as u8).collect();
            manifest += &format!("ignore {}x{} {}\n", mask.width, mask.height, sha256_hex(&bits));
        }
        for ((path, digest), size) in self.paths.iter().zip(&digests).zip(&self.file_sizes) {
            let name = path.strip_prefix(&folder).unwrap_or(path);
            manifest += &format!("{} {}x{} {digest}\n", name.display(), size.0, size.1);
        }
        Ok(DataFingerprint {
            origin: folder.display().to_string(),
            images: self.paths.len(),
            sha256: sha256_hex(manifest.as_bytes()),
        })
    }
}

/// The deepest folder holding every path.
fn common_folder(paths: &[PathBuf]) -> PathBuf {
    let mut folder = paths[0].parent().map(Path::to_path_buf).unwrap_or_default();
    for path in &paths[1..] {
        while !path.starts_with(&folder) {
            if !folder.pop() {
                break;
            }
        }
    }
    folder
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{piped_class, write_gray8, write_rgb8};

    fn setup() -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let good_a = dir.path().join("a.png");
        let bad = dir.path().join("b.png");
        let good_c = dir.path().join("c.png");
        write_rgb8(&good_a, 6, 4, 10);
        std::fs::write(&bad, b"not an image at all").unwrap();
        write_gray8(&good_c, 6, 4, |x, _| x as u8 * 40);
        (dir, vec![good_a, bad, good_c])
    }

    #[test]
    fn stop_policy_names_the_first_bad_file() {
        let (_dir, paths) = setup();
        let err = FileSource::open(&paths, SourceOptions::new(ChannelMode::Rgb)).unwrap_err().to_string();
        assert!(err.contains("b.png") && err.contains("corrupt"), "{err}");
    }

    #[test]
    fn skip_policy_reports_and_never_fails_later() {
        let (_dir, paths) = setup();
        let options =
            SourceOptions { bad_files: BadFilePolicy::Skip, ..SourceOptions::new(ChannelMode::Rgb) };
        let source = FileSource::open(&paths, options).unwrap();
        assert_eq!(source.len(), 2);
        assert_eq!(source.skipped().len(), 1);
        assert!(source.skipped()[0].0.ends_with("b.png"));
        for i in 0..source.len() {
            let image = source.load(i).unwrap();
            // the gray file is replicated to three channels
            assert_eq!((image.channels, image.width, image.height), (3, 6, 4));
        }
        let gray = source.load(1).unwrap();
        assert_eq!(gray.channel(0), gray.channel(2));
        assert!((gray.get(1, 0, 1) - 40.0 / 255.0).abs() < 1e-7);

        let only_bad = vec![paths[1].clone()];
        let options =
            SourceOptions { bad_files: BadFilePolicy::Skip, ..SourceOptions::new(ChannelMode::Rgb) };
        assert!(FileSource::open(&only_bad, options).unwrap_err().to_string().contains("none of the 1"));
    }

    #[test]
    fn ignore_mask_must_match_and_follows_resize() {
        let (_dir, paths) = setup();
        let good = vec![paths[0].clone(), paths[2].clone()];
        let mut mask = Mask::empty(6, 4);
        mask.data[0] = true;
        let options = SourceOptions {
            resize: Some((12, 8)),
            ignore: Some(mask),
            ..SourceOptions::new(ChannelMode::Gray)
        };
        let source = FileSource::open(&good, options).unwrap();
        let ignore = source.ignore_mask(0).unwrap();
        assert_eq!((ignore.width, ignore.height, ignore.count()), (12, 8, 4));
        assert_eq!(source.load(0).unwrap().channels, 1);

        let options =
            SourceOptions { ignore: Some(Mask::empty(5, 4)), ..SourceOptions::new(ChannelMode::Gray) };
        let err = FileSource::open(&good, options).unwrap_err().to_string();
        assert!(err.contains("a.png") && err.contains("5x4"), "{err}");
    }

    #[test]
    fn fingerprint_follows_file_content_names_and_options() {
        let (dir, paths) = setup();
        let good = vec![paths[0].clone(), paths[2].clone()];
        let open = |mode| FileSource::open(&good, SourceOptions::new(mode)).unwrap().fingerprint().unwrap();
        let first = open(ChannelMode::Rgb);
        assert_eq!(first.origin, dir.path().display().to_string());
        assert_eq!(first.images, 2);
        assert!(first.same_data(&open(ChannelMode::Rgb)));
        assert!(!first.same_data(&open(ChannelMode::Gray)));
        // One pixel changed in one file: other data.
        write_rgb8(&good[0], 6, 4, 11);
        assert!(!first.same_data(&open(ChannelMode::Rgb)));
        // The same files in another folder are the same data.
        let copy = tempfile::tempdir().unwrap();
        let moved: Vec<PathBuf> = good
            .iter()
            .map(|p| {
                let to = copy.path().join(p.file_name().unwrap());
                std::fs::copy(p, &to).unwrap();
                to
            })
            .collect();
        let here =
            FileSource::open(&good, SourceOptions::new(ChannelMode::Rgb)).unwrap().fingerprint().unwrap();
        let there =
            FileSource::open(&moved, SourceOptions::new(ChannelMode::Rgb)).unwrap().fingerprint().unwrap();
        assert!(here.same_data(&there) && here.origin != there.origin);
        assert_eq!(common_folder(&[copy.path().join("a/x.png"), copy.path().join("b/y.png")]), copy.path());
    }

    #[test]
    fn piped_odd_sized_image_is_resized_with_the_rest() {
        let Some(root) = piped_class("PA_BTN01_RL") else { return };
        let odd = root.join("test/impurity/PA_BTN01_RL_S_D_07_2.png");
        let normal = root.join("test/impurity/PA_BTN01_RL_S_D_07_1.png");
        let options = SourceOptions { resize: Some((128, 128)), ..SourceOptions::new(ChannelMode::Rgb) };
        let source = FileSource::open(&[odd.clone(), normal], options).unwrap();
        assert_eq!(source.load(0).unwrap().width, 128);
        let native = FileSource::open(&[odd], SourceOptions::new(ChannelMode::Rgb)).unwrap();
        assert_eq!(native.size(0), (127, 128));
    }
}
