//! The seam measure of tiled maps, before and after blending, for every method that works with
//! `--tile` (the a contrario detector with PCA, Gabor and CNN + RegionNFA features, all in the
//! test-image mode): the mean absolute jump of the stitched map across tile borders divided by the same
//! across the tile centre lines (half a tile inside), and across the blending bands (the lines
//! inside an overlap) divided by the same.
//!
//! The large image is built from the shared scikit-image textures: the right part of brick, grass
//! and gravel side by side (896×512, gray), scored in 128-pixel tiles. The methods that learn are
//! fitted on the tiles of the left parts of the same three textures (30 tiles), never seen at test.
//! The texture boundaries (x = 304 and 592) lie 16 pixels from every measured line.
//!
//! Columns: "no overlap" is the old default (`--tile 128`, overlap 0); "overlap 32, mean" the old
//! stitching with `--overlap 32` (equal weights, log10 NFA the minimum over tiles); "blend" the
//! raised-cosine blend on the same tiles; "after" the tiled scoring of
//! `vigil_engine::tiling::score_detector_tiled` (the blend, and for the a contrario test-image mode the
//! statistics from the whole image); "untiled" the whole image scored at once, measured on the
//! same lines: what an unseamed map of this image gives (the methods that learn resize the whole
//! image to their input size, so their untiled map is coarser).
//!
//! cargo run --release -p vigil-bench --example seams -- [--methods acontrario,patchcore,...]
//!     [--overlap 32] [--picture benchmarks/seams/acontrario_pca_before_after.png]

use std::path::{Path, PathBuf};

use image::RgbImage;
use vigil_acontrario::{AcontrarioDetector, AcontrarioSettings, Feature, NfaVariant};
use vigil_bench::arg;
use vigil_core::{Detector, FitContext, Image, InMemorySource, Map, Result, ScoreOutput, VigilError};
use vigil_draem::{DraemDetector, DraemSettings, Variant};
use vigil_engine::tiling::{
    default_overlap, score_detector_tiled, seam_measure, SeamMeasure, Stitcher, TileGrid,
};
use vigil_padim::{PadimDetector, PadimSettings};
use vigil_patchcore::{PatchcoreDetector, PatchcoreSettings};
use vigil_uflow::{UflowDetector, UflowSettings};

const TILE: usize = 128;
/// Widths of the test part taken from the right of each texture; the rest trains.
const TEXTURES: [(&str, usize); 3] = [("brick", 304), ("grass", 288), ("gravel", 304)];

fn textures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/textures/skimage")
}

/// (test image, training tiles).
fn data() -> Result<(Image, Vec<Image>)> {
    let mut parts = Vec::new();
    let mut train = Vec::new();
    for (name, test_width) in TEXTURES {
        let texture = vigil_data::load_image(&textures_dir().join(format!("{name}.png")))?.to_gray();
        let train_width = texture.width - test_width;
        let left = texture.crop(0, 0, train_width, texture.height);
        let grid = TileGrid::new(left.width, left.height, TILE, default_overlap(TILE))?;
        train.extend(grid.tiles().iter().map(|t| left.crop(t.x, t.y, t.w, t.h)));
        parts.push(texture.crop(train_width, 0, test_width, texture.height));
    }
    let height = parts[0].height;
    let width: usize = parts.iter().map(|p| p.width).sum();
    let mut data = Vec::with_capacity(width * height);
    for y in 0..height {
        for p in &parts {
            data.extend_from_slice(&p.data[y * p.width..(y + 1) * p.width]);
        }
    }
    Ok((Image::new(width, height, 1, data)?, train))
}

fn detector(name: &str) -> Result<Box<dyn Detector>> {
    Ok(match name {
        "acontrario" => Box::new(AcontrarioDetector::new(AcontrarioSettings::default())),
        "acontrario-gabor" => Box::new(AcontrarioDetector::new(AcontrarioSettings {
            feature: Feature::Gabor,
            ..AcontrarioSettings::default()
        })),
        "acontrario-cnn" => Box::new(AcontrarioDetector::new(AcontrarioSettings {
            feature: Feature::Cnn,
            nfa: NfaVariant::Region,
            ..AcontrarioSettings::default()
        })),
        "patchcore" => Box::new(PatchcoreDetector::new(PatchcoreSettings::default())?),
        "padim" => Box::new(PadimDetector::new(PadimSettings::default())?),
        // shorter than the presets: the seams, not the quality, are measured here
        "uflow" => Box::new(UflowDetector::new(UflowSettings { epochs: 20, ..UflowSettings::default() })),
        "draem" => {
            Box::new(DraemDetector::new(DraemSettings { steps: 200, ..DraemSettings::cpu(Variant::Draem) })?)
        }
        other => return Err(VigilError::Config(format!("unknown method {other}"))),
    })
}

/// Every tile of `grid` scored by `det`.
fn score_tiles(det: &dyn Detector, image: &Image, grid: &TileGrid) -> Result<Vec<ScoreOutput>> {
    grid.tiles().iter().map(|t| det.score(&image.crop(t.x, t.y, t.w, t.h), None)).collect()
}

/// The old stitching: equal weights for the maps, the minimum over tiles plus log10(tiles) for
/// log10 NFA.
fn stitch_equal(outs: &[ScoreOutput], grid: &TileGrid, nfa: bool) -> Result<Map> {
    let (w, h) = grid.image_size();
    if !nfa {
        let mut s = Stitcher::new(w, h);
        for (t, out) in grid.tiles().iter().zip(outs) {
            s.add(t, &out.map, &Map::filled(t.w, t.h, 1.0))?;
        }
        return s.finish();
    }
    let mut min = Map::filled(w, h, f32::INFINITY);
    for (t, out) in grid.tiles().iter().zip(outs) {
        let n = out.log10_nfa.as_ref().ok_or_else(|| VigilError::invalid("no log10 NFA"))?;
        for y in 0..t.h {
            for x in 0..t.w {
                let v = &mut min.data[(t.y + y) * w + t.x + x];
                *v = v.min(n.get(y, x));
            }
        }
    }
    let tests = (grid.len() as f32).log10();
    min.data.iter_mut().for_each(|v| *v += tests);
    Ok(min)
}

fn stitch_blend(outs: &[ScoreOutput], grid: &TileGrid, nfa: bool) -> Result<Map> {
    let (w, h) = grid.image_size();
    let mut s = Stitcher::new(w, h);
    for (i, (t, out)) in grid.tiles().iter().zip(outs).enumerate() {
        let map = if nfa {
            out.log10_nfa.as_ref().ok_or_else(|| VigilError::invalid("no log10 NFA"))?
        } else {
            &out.map
        };
        s.add(t, map, &grid.weights(i))?;
    }
    let mut m = s.finish()?;
    if nfa {
        let tests = (grid.len() as f32).log10();
        m.data.iter_mut().for_each(|v| *v += tests);
    }
    Ok(m)
}

fn ratios(m: &SeamMeasure) -> String {
    // without an overlap there is no blending band
    let band = if m.band.is_nan() { "–".to_string() } else { format!("{:.2}", m.band_ratio()) };
    format!("{:.2} | {band}", m.border_ratio())
}

/// The two maps one above the other (before on top), Turbo colours on a shared range, scaled down.
fn picture(before: &Map, after: &Map, path: &Path) -> Result<()> {
    let (lo, hi) = vigil_report::colormap::robust_range(&[before, after], 0.01, 0.99)?;
    let (a, b) =
        (vigil_report::colormap::colorize(before, lo, hi), vigil_report::colormap::colorize(after, lo, hi));
    let gap = 8;
    let mut both = RgbImage::from_pixel(a.width(), a.height() * 2 + gap, image::Rgb([255, 255, 255]));
    image::imageops::replace(&mut both, &a, 0, 0);
    image::imageops::replace(&mut both, &b, 0, (a.height() + gap) as i64);
    let small = vigil_report::overlay::thumbnail(&both, 400);
    vigil_report::overlay::write_png(path, &small, true)
}

fn main() -> Result<()> {
    let methods = arg("--methods")
        .unwrap_or_else(|| "acontrario,acontrario-gabor,acontrario-cnn,patchcore,padim,uflow,draem".into());
    let picture_path = arg("--picture").map(PathBuf::from);
    let (image, train) = data()?;
    let overlap = match arg("--overlap") {
        Some(v) => v.parse().map_err(|e| VigilError::Config(format!("--overlap {v}: {e}")))?,
        None => default_overlap(TILE),
    };
    let plain = TileGrid::new(image.width, image.height, TILE, 0)?;
    let grid = TileGrid::new(image.width, image.height, TILE, overlap)?;
    println!(
        "image {}x{} from {:?}; tile {TILE}; overlap {overlap} ({} tiles; {} without overlap); {} training tiles; threads {}",
        image.width,
        image.height,
        TEXTURES.map(|t| t.0),
        grid.len(),
        plain.len(),
        train.len(),
        rayon::current_num_threads()
    );
    println!();
    println!("Each cell: border ratio | band ratio (near 1: no grid; – where tiles do not overlap).");
    println!();
    println!(
        "| method | map | no overlap: border | band | overlap {overlap}, mean: border | band | blend: border | band | after: border | band | untiled: border | band |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in methods.split(',') {
        let mut det = detector(name)?;
        let start = std::time::Instant::now();
        let channels_image = det.channel_mode().convert(&image);
        let train: Vec<Image> = train.iter().map(|t| det.channel_mode().convert(t)).collect();
        det.fit(
            &InMemorySource::new(train),
            &FitContext { seed: 0, checkpoint_dir: None, show_progress: false },
        )?;
        let no_overlap = score_tiles(det.as_ref(), &channels_image, &plain)?;
        let overlapping = score_tiles(det.as_ref(), &channels_image, &grid)?;
        let after = score_detector_tiled(&channels_image, None, TILE, overlap, det.as_ref())?;
        let untiled = det.score(&channels_image, None)?;
        let has_nfa = after.log10_nfa.is_some();
        for nfa in [false, true].into_iter().filter(|&n| !n || has_nfa) {
            let before0 = stitch_equal(&no_overlap, &plain, nfa)?;
            let mean = stitch_equal(&overlapping, &grid, nfa)?;
            let blend = stitch_blend(&overlapping, &grid, nfa)?;
            let now = if nfa { after.log10_nfa.clone().expect("checked") } else { after.map.clone() };
            let whole = if nfa {
                untiled.log10_nfa.clone().expect("a method that gives NFA tiles gives an NFA untiled")
            } else {
                untiled.map.clone()
            };
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} |",
                if nfa { "log10 NFA" } else { "anomaly map" },
                ratios(&seam_measure(&before0, &plain)?),
                ratios(&seam_measure(&mean, &grid)?),
                ratios(&seam_measure(&blend, &grid)?),
                ratios(&seam_measure(&now, &grid)?),
                ratios(&seam_measure(&whole, &grid)?),
            );
            if !nfa && name == "acontrario" {
                if let Some(path) = &picture_path {
                    picture(&before0, &now, path)?;
                }
            }
        }
        eprintln!("{name}: {:.0} s", start.elapsed().as_secs_f64());
    }
    Ok(())
}
