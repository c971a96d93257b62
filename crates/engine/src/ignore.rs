//! Ignore masks (line clearance): regions of the image that must never raise an alarm, such as a
//! moving part or a label. The mask is either given to the method, which leaves the pixels out of
//! its statistics ("before"), or applied to the finished anomaly map ("after").

use std::path::Path;

use serde::{Deserialize, Serialize};
use vigil_core::{Map, Mask, Result, VigilError};

use vigil_data::io::load_mask;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IgnoreMode {
    /// The method leaves the ignored pixels out of fitting and scoring statistics.
    Before,
    /// The method sees the whole image; ignored pixels are cleared in its anomaly map.
    After,
}

impl std::str::FromStr for IgnoreMode {
    type Err = VigilError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "before" => Ok(IgnoreMode::Before),
            "after" => Ok(IgnoreMode::After),
            _ => Err(VigilError::Config(format!("ignore mode '{s}' is not one of: before, after"))),
        }
    }
}

impl std::fmt::Display for IgnoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IgnoreMode::Before => "before",
            IgnoreMode::After => "after",
        })
    }
}

/// Loads an ignore mask for images of `(width, height)`; a mask of another size is an error
/// unless `resize` (nearest neighbour). A mask that covers every pixel is an error too: nothing
/// would be left to inspect.
pub fn load_ignore_mask(path: &Path, image_size: (usize, usize), resize: bool) -> Result<Mask> {
    let mask = load_mask(path, Some(image_size), resize)?;
    if mask.count() == mask.data.len() {
        return Err(VigilError::file(path, "ignore mask covers the whole image; nothing would be inspected"));
    }
    Ok(mask)
}

/// Clears the ignored pixels of an anomaly map. They are set to the smallest value of the pixels
/// that are kept, not to 0: maps are not always non-negative (log-likelihoods, some
/// reconstruction scores), and a 0 could then be the largest value in the map. The minimum can
/// neither raise an image's score nor, on normal images, lower a threshold computed from them.
pub fn apply_after(map: &mut Map, ignore: &Mask) -> Result<()> {
    if (map.width, map.height) != (ignore.width, ignore.height) {
        return Err(VigilError::invalid(format!(
            "ignore mask is {}x{} but the anomaly map is {}x{}",
            ignore.width, ignore.height, map.width, map.height
        )));
    }
    let floor = kept_values(map, ignore).fold(f32::INFINITY, f32::min);
    if floor == f32::INFINITY {
        return Err(VigilError::invalid("ignore mask covers the whole anomaly map"));
    }
    fill_ignored(map, ignore, floor);
    Ok(())
}

/// Ignored pixels must never count as detections: they get the least significant log10 NFA of
/// the kept pixels, and at least NFA 1 (log10 NFA 0 or more).
pub fn silence_nfa(log10_nfa: &mut Map, ignore: &Mask) {
    let quiet = kept_values(log10_nfa, ignore).fold(0.0f32, f32::max).max(1.0);
    fill_ignored(log10_nfa, ignore, quiet);
}

fn kept_values<'a>(map: &'a Map, ignore: &'a Mask) -> impl Iterator<Item = f32> + 'a {
    map.data.iter().zip(&ignore.data).filter(|(_, &ignored)| !ignored).map(|(&v, _)| v)
}

fn fill_ignored(map: &mut Map, ignore: &Mask, value: f32) {
    for (v, _) in map.data.iter_mut().zip(&ignore.data).filter(|(_, &ignored)| ignored) {
        *v = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_pixels_take_the_kept_minimum() {
        let mut map = Map::new(3, 1, vec![-2.0, 5.0, -1.0]).unwrap();
        let ignore = Mask::new(3, 1, vec![false, true, false]).unwrap();
        apply_after(&mut map, &ignore).unwrap();
        assert_eq!(map.data, vec![-2.0, -2.0, -1.0]);
        assert!(apply_after(&mut map, &Mask::empty(2, 1)).is_err());
        assert!(apply_after(&mut map, &Mask::new(3, 1, vec![true; 3]).unwrap()).is_err());
    }

    #[test]
    fn ignore_mask_loading_checks_size_and_coverage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ignore.png");
        image::GrayImage::from_fn(4, 2, |x, _| image::Luma([if x == 0 { 255 } else { 0 }]))
            .save(&path)
            .unwrap();
        assert_eq!(load_ignore_mask(&path, (4, 2), false).unwrap().count(), 2);
        let err = load_ignore_mask(&path, (8, 4), false).unwrap_err().to_string();
        assert!(err.contains("4x2") && err.contains("8x4"), "{err}");
        assert_eq!(load_ignore_mask(&path, (8, 4), true).unwrap().count(), 8);
        let full = dir.path().join("full.png");
        image::GrayImage::from_fn(4, 2, |_, _| image::Luma([1])).save(&full).unwrap();
        assert!(load_ignore_mask(&full, (4, 2), false).unwrap_err().to_string().contains("whole image"));
        assert_eq!("After".parse::<IgnoreMode>().unwrap(), IgnoreMode::After);
        assert!("never".parse::<IgnoreMode>().is_err());
    }
}
