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
//!     [--overlap 32] [--picture benchmarks/seams/acontrario_pca_before_after.png] [--diagnose]
//!
//! `--diagnose` adds, per method and map, where the seam comes from: the jump of the tiles' own
//! maps by distance from the tile edge, how much neighbouring tiles disagree where they overlap,
//! and the "after" ratios on four shifted crops of the image (the resolution of the measure).

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

/// Mean absolute jump of the tiles' own maps (before any stitching) across the lines at each
/// distance from the nearest tile edge, in bands of 8 pixels from the edge to the centre, each
/// divided by the innermost band: a value above 1 near the edge means the method's tile maps
/// vary more near their own borders, which no stitching can remove.
fn edge_profile(outs: &[ScoreOutput], nfa: bool) -> Result<Vec<f64>> {
    let bands = TILE / 2 / 8;
    let (mut sum, mut count) = (vec![0.0; bands], vec![0usize; bands]);
    for out in outs {
        let m = if nfa {
            out.log10_nfa.as_ref().ok_or_else(|| VigilError::invalid("no log10 NFA"))?
        } else {
            &out.map
        };
        for y in 0..m.height {
            for x in 1..m.width {
                // The line between x − 1 and x lies min(x, width − x) pixels from the nearest edge.
                let band = (x.min(m.width - x) / 8).min(bands - 1);
                sum[band] += (m.get(y, x) - m.get(y, x - 1)).abs() as f64;
                count[band] += 1;
            }
        }
        for y in 1..m.height {
            let band = (y.min(m.height - y) / 8).min(bands - 1);
            for x in 0..m.width {
                sum[band] += (m.get(y, x) - m.get(y - 1, x)).abs() as f64;
                count[band] += 1;
            }
        }
    }
    let mean: Vec<f64> = sum.iter().zip(&count).map(|(s, &n)| s / n.max(1) as f64).collect();
    let inner = mean[bands - 1];
    Ok(mean.iter().map(|m| m / inner).collect())
}

/// Mean |A − B| over the pixels two neighbouring tiles share, divided by the standard deviation
/// of the stitched map: how much the tiles disagree where they overlap, against the map's spread.
fn overlap_disagreement(outs: &[ScoreOutput], grid: &TileGrid, stitched: &Map, nfa: bool) -> Result<f64> {
    let pick = |o: &ScoreOutput| -> Result<Map> {
        if nfa {
            o.log10_nfa.clone().ok_or_else(|| VigilError::invalid("no log10 NFA"))
        } else {
            Ok(o.map.clone())
        }
    };
    let (mut sum, mut n) = (0.0f64, 0usize);
    let tiles = grid.tiles();
    for i in 0..tiles.len() {
        for j in i + 1..tiles.len() {
            let (a, b) = (tiles[i], tiles[j]);
            let (x0, x1) = (a.x.max(b.x), (a.x + a.w).min(b.x + b.w));
            let (y0, y1) = (a.y.max(b.y), (a.y + a.h).min(b.y + b.h));
            if x0 >= x1 || y0 >= y1 {
                continue;
            }
            let (ma, mb) = (pick(&outs[i])?, pick(&outs[j])?);
            for y in y0..y1 {
                for x in x0..x1 {
                    sum += (ma.get(y - a.y, x - a.x) - mb.get(y - b.y, x - b.x)).abs() as f64;
                    n += 1;
                }
            }
        }
    }
    let mean = stitched.data.iter().map(|&v| v as f64).sum::<f64>() / stitched.data.len() as f64;
    let var =
        stitched.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / stitched.data.len() as f64;
    Ok(sum / n.max(1) as f64 / var.sqrt())
}

/// The "after" seam ratios of the image cropped by (δ, δ) for several δ (the crop keeps
/// width − 96 and height − 96 pixels), so the tile borders fall on other content each time:
/// the spread of these values is the resolution of the measure on this map.
fn shifted_after(det: &dyn Detector, image: &Image, overlap: usize, nfa: bool) -> Result<Vec<(f64, f64)>> {
    let mut out = Vec::new();
    for delta in [0, 24, 48, 72] {
        let crop = image.crop(delta, delta, image.width - 96, image.height - 96);
        let grid = TileGrid::new(crop.width, crop.height, TILE, overlap)?;
        let scored = score_detector_tiled(&crop, None, TILE, overlap, det)?;
        let m = if nfa {
            scored.log10_nfa.ok_or_else(|| VigilError::invalid("no log10 NFA"))?
        } else {
            scored.map
        };
        let s = seam_measure(&m, &grid)?;
        out.push((s.border_ratio(), s.band_ratio()));
    }
    Ok(out)
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
    let diagnose = std::env::args().any(|a| a == "--diagnose");
    let mut diagnostics = Vec::new();
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
            if diagnose {
                let profile = edge_profile(&overlapping, nfa)?;
                let shifted = shifted_after(det.as_ref(), &channels_image, overlap, nfa)?;
                diagnostics.push(format!(
                    "| {name} | {} | {} | {:.2} | {} |",
                    if nfa { "log10 NFA" } else { "anomaly map" },
                    profile.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(" "),
                    overlap_disagreement(&overlapping, &grid, &now, nfa)?,
                    shifted.iter().map(|(b, n)| format!("{b:.2}/{n:.2}")).collect::<Vec<_>>().join(" "),
                ));
            }
            if !nfa && name == "acontrario" {
                if let Some(path) = &picture_path {
                    picture(&before0, &now, path)?;
                }
            }
        }
        eprintln!("{name}: {:.0} s", start.elapsed().as_secs_f64());
    }
    if diagnose {
        println!();
        println!(
            "Diagnostics (--diagnose): the tiles' own maps' mean jump by distance from the tile edge (bands of 8 px, \
             edge first, divided by the innermost band); mean |A − B| where neighbouring tiles overlap, divided by \
             the stitched map's standard deviation; the after border/band ratios with the image cropped by \
             δ = 0, 24, 48, 72 px."
        );
        println!();
        println!("| method | map | jump by distance from tile edge | overlap disagreement / sd | after, shifted crops |");
        println!("|---|---|---|---:|---|");
        for line in diagnostics {
            println!("{line}");
        }
    }
    Ok(())
}
