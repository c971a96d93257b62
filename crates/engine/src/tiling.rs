//! Tiling of large images (X-ray scans of paintings are thousands of pixels a side) and stitching
//! per-tile maps back into one whole-image map.
//!
//! Tiles are square, `tile` pixels a side, `tile - overlap` apart; the last tile of each row and
//! column is shifted back so it ends exactly at the border, so every tile has the full size and
//! every pixel is covered. An image smaller than one tile (in either direction) is an error: a
//! padded or shrunken tile would show the method content of a kind it never learned from.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vigil_core::{Detector, Image, ImageSource, Map, Mask, Result, ScoreOutput, VigilError};

use vigil_data::source::FileSource;

/// A tile's window in the image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TileGrid {
    width: usize,
    height: usize,
    tile: usize,
    /// Tile origins along x and along y; the tiles are their product, row-major.
    xs: Vec<usize>,
    ys: Vec<usize>,
    tiles: Vec<Tile>,
}

/// The overlap used when only a tile size is given: a quarter of the tile. Blending needs an
/// overlap (without one, neighbouring tiles meet in a step), and a quarter keeps the extra work
/// at (4/3)² ≈ 1.8× the tiles of a grid without overlap.
pub fn default_overlap(tile: usize) -> usize {
    tile / 4
}

/// Tile origins along one axis: a regular stride, the last one moved back to end at the border.
fn positions(len: usize, tile: usize, stride: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut start = 0;
    while start + tile < len {
        out.push(start);
        start += stride;
    }
    out.push(len - tile);
    out
}

/// Blending weight along one axis for the tile starting at `positions[i]`: a raised-cosine ramp
/// sin²(π/2 · (d + ½)/r) at distance d from each side shared with a neighbour, r being the overlap
/// with that neighbour, and 1 elsewhere. Where two neighbours overlap by r their ramps meet at
/// angles adding to π/2, so the weights sum to exactly one (sin² + cos²); the ramps start and
/// end with zero slope, and stay above zero so every covered pixel has weight.
fn axis_weights(positions: &[usize], i: usize, tile: usize) -> Vec<f64> {
    let ramp = |d: usize, r: usize| {
        if d < r {
            (std::f64::consts::FRAC_PI_2 * (d as f64 + 0.5) / r as f64).sin().powi(2)
        } else {
            1.0
        }
    };
    let before = i.checked_sub(1).map_or(0, |p| (positions[p] + tile).saturating_sub(positions[i]));
    let after = positions.get(i + 1).map_or(0, |&n| (positions[i] + tile).saturating_sub(n));
    (0..tile).map(|d| ramp(d, before) * ramp(tile - 1 - d, after)).collect()
}

impl TileGrid {
    pub fn new(width: usize, height: usize, tile: usize, overlap: usize) -> Result<TileGrid> {
        if tile == 0 {
            return Err(VigilError::Config("tile size must be at least 1 pixel".into()));
        }
        if overlap >= tile {
            return Err(VigilError::Config(format!(
                "tile overlap ({overlap}) must be smaller than the tile size ({tile})"
            )));
        }
        if width < tile || height < tile {
            return Err(VigilError::invalid(format!(
                "image {width}x{height} is smaller than one {tile}x{tile} tile; \
                 use a smaller tile size or no tiling"
            )));
        }
        let stride = tile - overlap;
        let xs = positions(width, tile, stride);
        let ys = positions(height, tile, stride);
        let tiles =
            ys.iter().flat_map(|&y| xs.iter().map(move |&x| Tile { x, y, w: tile, h: tile })).collect();
        Ok(TileGrid { width, height, tile, xs, ys, tiles })
    }

    /// Row-major: left to right, then top to bottom.
    pub fn tiles(&self) -> &[Tile] {
        &self.tiles
    }

    pub fn len(&self) -> usize {
        self.tiles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }

    /// (width, height) of the image the grid covers.
    pub fn image_size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Tile origins along x (columns of tiles) and along y (rows of tiles).
    pub fn origins(&self) -> (&[usize], &[usize]) {
        (&self.xs, &self.ys)
    }

    /// The blending weights of tile `index` (tile-sized): the product of a raised-cosine ramp
    /// across each side shared with a neighbour along x and along y (see [`Stitcher`]).
    pub fn weights(&self, index: usize) -> Map {
        let (ix, iy) = (index % self.xs.len(), index / self.xs.len());
        let wx = axis_weights(&self.xs, ix, self.tile);
        let wy = axis_weights(&self.ys, iy, self.tile);
        let data = wy.iter().flat_map(|&a| wx.iter().map(move |&b| (a * b) as f32)).collect();
        Map::new(self.tile, self.tile, data).expect("the weights have the tile's size")
    }
}

/// Accumulates per-tile maps into a whole-image map: the weighted mean of the tiles covering each
/// pixel, normalised by the sum of their weights. With [`TileGrid::weights`] a tile's values fade
/// out across its overlap with a neighbour while the neighbour's fade in, so a disagreement
/// between two tiles becomes a smooth transition instead of a step at a tile border.
pub struct Stitcher {
    width: usize,
    height: usize,
    /// Σ weight · value and Σ weight per pixel; f64 so that equal inputs come back exactly.
    sum: Vec<f64>,
    weight: Vec<f64>,
}

impl Stitcher {
    pub fn new(width: usize, height: usize) -> Stitcher {
        Stitcher { width, height, sum: vec![0.0; width * height], weight: vec![0.0; width * height] }
    }

    /// Adds a tile's map with its per-pixel weights (finite and positive, tile-sized).
    pub fn add(&mut self, tile: &Tile, map: &Map, weights: &Map) -> Result<()> {
        for (what, m) in [("map", map), ("weights", weights)] {
            if (m.width, m.height) != (tile.w, tile.h) {
                return Err(VigilError::invalid(format!(
                    "tile {what} is {}x{} but the tile at ({}, {}) is {}x{}",
                    m.width, m.height, tile.x, tile.y, tile.w, tile.h
                )));
            }
        }
        if tile.x + tile.w > self.width || tile.y + tile.h > self.height {
            return Err(VigilError::invalid(format!(
                "tile at ({}, {}) of size {}x{} lies outside the {}x{} image",
                tile.x, tile.y, tile.w, tile.h, self.width, self.height
            )));
        }
        if let Some(w) = weights.data.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
            return Err(VigilError::invalid(format!("tile weights must be finite and positive, got {w}")));
        }
        for row in 0..tile.h {
            let start = (tile.y + row) * self.width + tile.x;
            let sums = &mut self.sum[start..start + tile.w];
            let totals = &mut self.weight[start..start + tile.w];
            let src = &map.data[row * tile.w..(row + 1) * tile.w];
            let wts = &weights.data[row * tile.w..(row + 1) * tile.w];
            for (((s, t), &v), &w) in sums.iter_mut().zip(totals.iter_mut()).zip(src).zip(wts) {
                *s += w as f64 * v as f64;
                *t += w as f64;
            }
        }
        Ok(())
    }

    /// The whole-image map; an error if some pixel was covered by no tile.
    pub fn finish(self) -> Result<Map> {
        if let Some(i) = self.weight.iter().position(|&w| w == 0.0) {
            return Err(VigilError::invalid(format!(
                "tiles do not cover the image: pixel x={}, y={} has no value",
                i % self.width,
                i / self.width
            )));
        }
        let data = self.sum.iter().zip(&self.weight).map(|(s, w)| (s / w) as f32).collect();
        Map::new(self.width, self.height, data)
    }
}

/// The tiles of one image in memory, as an [`ImageSource`] (for statistics over a whole image).
pub struct ImageTiles<'a> {
    image: &'a Image,
    ignore: Option<&'a Mask>,
    grid: &'a TileGrid,
}

impl<'a> ImageTiles<'a> {
    pub fn new(image: &'a Image, ignore: Option<&'a Mask>, grid: &'a TileGrid) -> ImageTiles<'a> {
        ImageTiles { image, ignore, grid }
    }
}

impl ImageSource for ImageTiles<'_> {
    fn len(&self) -> usize {
        self.grid.len()
    }

    fn name(&self, index: usize) -> String {
        let t = self.grid.tiles()[index];
        format!("tile x={} y={}", t.x, t.y)
    }

    fn load(&self, index: usize) -> Result<Image> {
        let t = self.grid.tiles()[index];
        Ok(self.image.crop(t.x, t.y, t.w, t.h))
    }

    fn ignore_mask(&self, index: usize) -> Option<Mask> {
        let t = self.grid.tiles()[index];
        self.ignore.map(|m| m.crop(t.x, t.y, t.w, t.h))
    }
}

/// Scores an image tile by tile and blends the results with [`TileGrid::weights`]:
/// - the anomaly map is the weighted mean of the overlapping tile maps;
/// - the image score, when every tile gives one, is the largest tile score;
/// - log10 NFA, when every tile gives it, is the same weighted mean of the tiles' log10 NFA plus
///   log10(number of tiles). A weighted mean of logarithms is a weighted geometric mean of NFAs,
///   never below the smallest, so a pixel at NFA ≤ ε is at NFA ≤ ε in some tile covering it: the
///   false detections of the whole image are at most those of all tiles together, whose expected
///   number is at most (number of tiles) · ε (each tile counts the tests it makes, and the tests
///   of the image are the union of the tiles' tests). Unlike the minimum over tiles, the mean has
///   no step where a tile ends.
pub fn score_tiled(
    image: &Image,
    ignore: Option<&Mask>,
    tile: usize,
    overlap: usize,
    mut score: impl FnMut(&Image, Option<&Mask>) -> Result<ScoreOutput>,
) -> Result<ScoreOutput> {
    if let Some(m) = ignore.filter(|m| (m.width, m.height) != (image.width, image.height)) {
        return Err(VigilError::invalid(format!(
            "ignore mask is {}x{} but the image is {}x{}",
            m.width, m.height, image.width, image.height
        )));
    }
    let grid = TileGrid::new(image.width, image.height, tile, overlap)?;
    let mut maps = Stitcher::new(image.width, image.height);
    let mut nfa = Stitcher::new(image.width, image.height);
    let (mut nfa_tiles, mut image_scores) = (0, Vec::with_capacity(grid.len()));
    for (i, t) in grid.tiles().iter().enumerate() {
        let tile_ignore = ignore.map(|m| m.crop(t.x, t.y, t.w, t.h));
        let out = score(&image.crop(t.x, t.y, t.w, t.h), tile_ignore.as_ref())?;
        let weights = grid.weights(i);
        maps.add(t, &out.map, &weights)?;
        if let Some(n) = &out.log10_nfa {
            nfa.add(t, n, &weights)?;
            nfa_tiles += 1;
        }
        image_scores.extend(out.image_score);
    }
    let log10_nfa = if nfa_tiles == grid.len() {
        let mut m = nfa.finish()?;
        let tests = (grid.len() as f32).log10();
        m.data.iter_mut().for_each(|v| *v += tests);
        Some(m)
    } else if nfa_tiles == 0 {
        None
    } else {
        return Err(VigilError::invalid("the method gave an NFA map for some tiles only"));
    };
    let image_score =
        (image_scores.len() == grid.len()).then(|| image_scores.iter().copied().fold(f32::MIN, f32::max));
    Ok(ScoreOutput { map: maps.finish()?, image_score, log10_nfa })
}

/// [`score_tiled`] with a detector. A method whose statistics come from the image under test
/// (the a contrario test-image mode) takes them from all tiles of the image
/// ([`Detector::with_statistics_of`]), so neighbouring tiles score against the same statistics.
pub fn score_detector_tiled(
    image: &Image,
    ignore: Option<&Mask>,
    tile: usize,
    overlap: usize,
    detector: &dyn Detector,
) -> Result<ScoreOutput> {
    let grid = TileGrid::new(image.width, image.height, tile, overlap)?;
    if let Some(m) = ignore.filter(|m| (m.width, m.height) != (image.width, image.height)) {
        return Err(VigilError::invalid(format!(
            "ignore mask is {}x{} but the image is {}x{}",
            m.width, m.height, image.width, image.height
        )));
    }
    let whole = detector.with_statistics_of(&ImageTiles::new(image, ignore, &grid))?;
    let scorer = whole.as_deref().unwrap_or(detector);
    score_tiled(image, ignore, tile, overlap, |t, m| scorer.score(t, m))
}

/// How much a map jumps at tile borders compared with inside the tiles.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SeamMeasure {
    /// Mean |m(p) − m(p − 1 step)| across every internal tile border (columns where a tile starts
    /// or ends, and rows likewise), the step taken across the border.
    pub border: f64,
    /// The same across the lines where two neighbouring tiles blend (inside an overlap, borders
    /// excluded): a blend spreads a disagreement between tiles over these lines.
    pub band: f64,
    /// The same across the tile centre lines (half a tile inside), excluding any that is a border.
    pub inside: f64,
}

impl SeamMeasure {
    /// border / inside: near 1 when the tile grid does not show.
    pub fn border_ratio(&self) -> f64 {
        self.border / self.inside
    }

    /// band / inside: near 1 when the blending bands do not show either.
    pub fn band_ratio(&self) -> f64 {
        self.band / self.inside
    }
}

/// Line classes along one axis of length `len`: (borders, blending-band lines, centre lines).
/// A line `p` stands for the step between pixel p − 1 and pixel p.
fn seam_lines(origins: &[usize], tile: usize, len: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let mut borders: Vec<usize> =
        origins.iter().flat_map(|&o| [o, o + tile]).filter(|&p| p > 0 && p < len).collect();
    borders.sort_unstable();
    borders.dedup();
    let covered = |p: usize| origins.iter().filter(|&&o| o <= p && p < o + tile).count();
    let band =
        (1..len).filter(|&p| covered(p - 1) >= 2 && covered(p) >= 2 && !borders.contains(&p)).collect();
    let mut centres: Vec<usize> =
        origins.iter().map(|&o| o + tile / 2).filter(|p| !borders.contains(p) && *p < len).collect();
    centres.dedup();
    (borders, band, centres)
}

/// The seam measure of a whole-image map stitched on `grid`. A class of lines that does not occur
/// gives NaN: the band without an overlap, the centres when the overlap is half a tile (every
/// centre line is then a border).
pub fn seam_measure(map: &Map, grid: &TileGrid) -> Result<SeamMeasure> {
    if (map.width, map.height) != grid.image_size() {
        return Err(VigilError::invalid(format!(
            "map is {}x{} but the tile grid covers {}x{}",
            map.width, map.height, grid.width, grid.height
        )));
    }
    let (w, h) = (map.width, map.height);
    let (bx, nx, cx) = seam_lines(&grid.xs, grid.tile, w);
    let (by, ny, cy) = seam_lines(&grid.ys, grid.tile, h);
    let column_jumps = |x: usize| (0..h).map(move |y| (map.get(y, x) - map.get(y, x - 1)).abs() as f64);
    let row_jumps = |y: usize| (0..w).map(move |x| (map.get(y, x) - map.get(y - 1, x)).abs() as f64);
    let mean = |xs: &[usize], ys: &[usize]| {
        let (mut sum, mut n) = (0.0, 0usize);
        for v in xs.iter().flat_map(|&x| column_jumps(x)).chain(ys.iter().flat_map(|&y| row_jumps(y))) {
            sum += v;
            n += 1;
        }
        if n == 0 {
            f64::NAN
        } else {
            sum / n as f64
        }
    };
    Ok(SeamMeasure { border: mean(&bx, &by), band: mean(&nx, &ny), inside: mean(&cx, &cy) })
}

/// The tiles of a list of images as one [`ImageSource`], for fitting a method on tiles.
pub struct TiledSource {
    inner: FileSource,
    /// (image index, tile) for every tile, image after image.
    tiles: Vec<(usize, Tile)>,
    /// The last decoded images: consecutive tiles come from the same image, and decoding a large
    /// scan once per tile would dominate the fit.
    recent: Mutex<Vec<(usize, Arc<Image>)>>,
}

/// Decoded images kept; two covers a reader on each side of an image boundary.
const RECENT_IMAGES: usize = 2;

impl TiledSource {
    /// An image smaller than one tile is an error naming it.
    pub fn new(inner: FileSource, tile: usize, overlap: usize) -> Result<TiledSource> {
        let mut tiles = Vec::new();
        for i in 0..inner.len() {
            let (w, h) = inner.size(i);
            let grid = TileGrid::new(w, h, tile, overlap).map_err(|e| match e {
                VigilError::Invalid(msg) => VigilError::file(&inner.paths()[i], msg),
                other => other,
            })?;
            tiles.extend(grid.tiles().iter().map(|&t| (i, t)));
        }
        Ok(TiledSource { inner, tiles, recent: Mutex::new(Vec::new()) })
    }

    /// Which image (its path) and which window tile `index` is.
    pub fn locate(&self, index: usize) -> (&PathBuf, Tile) {
        let (image, tile) = self.tiles[index];
        (&self.inner.paths()[image], tile)
    }

    pub fn inner(&self) -> &FileSource {
        &self.inner
    }

    fn image(&self, index: usize) -> Result<Arc<Image>> {
        // A poisoned lock only means another reader panicked; the cache itself stays valid.
        let lock = || self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, image)) = lock().iter().find(|(i, _)| *i == index) {
            return Ok(image.clone());
        }
        let image = Arc::new(self.inner.load(index)?);
        let mut recent = lock();
        if recent.len() >= RECENT_IMAGES {
            recent.remove(0);
        }
        recent.push((index, image.clone()));
        Ok(image)
    }
}

impl ImageSource for TiledSource {
    fn len(&self) -> usize {
        self.tiles.len()
    }

    fn name(&self, index: usize) -> String {
        let (path, t) = self.locate(index);
        format!("{} [tile x={} y={}]", path.display(), t.x, t.y)
    }

    fn load(&self, index: usize) -> Result<Image> {
        let (image, t) = self.tiles[index];
        Ok(self.image(image)?.crop(t.x, t.y, t.w, t.h))
    }

    fn ignore_mask(&self, index: usize) -> Option<Mask> {
        let (image, t) = self.tiles[index];
        self.inner.ignore_mask(image).map(|m| m.crop(t.x, t.y, t.w, t.h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_core::ChannelMode;
    use vigil_data::io::load_image;
    use vigil_data::source::SourceOptions;

    fn map_of(image: &Image) -> Map {
        Map::new(image.width, image.height, image.channel(0).to_vec()).unwrap()
    }

    #[test]
    fn grid_covers_image_and_shifts_last_tile_to_the_border() {
        let g = TileGrid::new(10, 7, 4, 1).unwrap();
        let xs: Vec<usize> = g.tiles().iter().filter(|t| t.y == 0).map(|t| t.x).collect();
        let ys: Vec<usize> = g.tiles().iter().filter(|t| t.x == 0).map(|t| t.y).collect();
        assert_eq!(xs, vec![0, 3, 6]);
        assert_eq!(ys, vec![0, 3]);
        assert_eq!(g.len(), 6);
        assert_eq!(TileGrid::new(4, 4, 4, 0).unwrap().tiles(), &[Tile { x: 0, y: 0, w: 4, h: 4 }]);
        assert!(TileGrid::new(3, 8, 4, 0).unwrap_err().to_string().contains("smaller than one 4x4 tile"));
        assert!(TileGrid::new(8, 8, 4, 4).is_err());
        assert!(TileGrid::new(8, 8, 0, 0).is_err());
    }

    /// Stitches the crops of `reference` on `grid`, each tile shifted by `offset(tile index)`, with
    /// the grid's blending weights or (blend = false) with equal weights.
    fn stitch(reference: &Map, grid: &TileGrid, offset: impl Fn(usize) -> f32, blend: bool) -> Map {
        let (w, h) = grid.image_size();
        let mut s = Stitcher::new(w, h);
        for (i, t) in grid.tiles().iter().enumerate() {
            let crop = Map::new(
                t.w,
                t.h,
                (0..t.h).flat_map(|r| (0..t.w).map(move |c| reference.get(t.y + r, t.x + c))).collect(),
            )
            .unwrap();
            let shifted = Map::new(t.w, t.h, crop.data.iter().map(|v| v + offset(i)).collect()).unwrap();
            let weights = if blend { grid.weights(i) } else { Map::filled(t.w, t.h, 1.0) };
            s.add(t, &shifted, &weights).unwrap();
        }
        s.finish().unwrap()
    }

    #[test]
    fn stitching_constant_and_identity_maps_is_exact() {
        let (w, h) = (23, 17);
        let identity = Map::new(w, h, (0..w * h).map(|i| i as f32 * 0.37).collect()).unwrap();
        let constant = Map::filled(w, h, 0.1);
        // (5, 4) overlaps more than half a tile: three tiles cover some pixels
        for (tile, overlap) in [(8, 3), (5, 4), (17, 0), (16, 4)] {
            let grid = TileGrid::new(w, h, tile, overlap).unwrap();
            for blend in [true, false] {
                assert!(stitch(&constant, &grid, |_| 0.0, blend).data.iter().all(|&v| v == 0.1));
                assert_eq!(stitch(&identity, &grid, |_| 0.0, blend), identity);
            }
        }
    }

    #[test]
    fn blending_weights_sum_to_one_and_are_smooth() {
        // regular grids and grids whose last tile is shifted back (overlaps of 12 and 23 there)
        for (w, h, tile, overlap) in
            [(100, 100, 32, 8), (104, 80, 32, 8), (130, 97, 40, 10), (64, 64, 32, 16)]
        {
            let grid = TileGrid::new(w, h, tile, overlap).unwrap();
            let mut total = vec![0f64; w * h];
            for (i, t) in grid.tiles().iter().enumerate() {
                let weights = grid.weights(i);
                assert!(weights.data.iter().all(|&v| v > 0.0 && v <= 1.0));
                // full weight in the middle unless the ramps from both sides reach it
                assert!(weights.get(tile / 2, tile / 2) == 1.0 || 2 * overlap >= tile);
                // a raised-cosine ramp over r pixels changes by at most π/(2r) per pixel; r ≥ overlap
                let limit = std::f32::consts::FRAC_PI_2 / overlap as f32 + 1e-6;
                for y in 0..tile {
                    for x in 1..tile {
                        assert!((weights.get(y, x) - weights.get(y, x - 1)).abs() <= limit);
                        assert!((weights.get(x, y) - weights.get(x - 1, y)).abs() <= limit);
                    }
                }
                for y in 0..tile {
                    for x in 0..tile {
                        total[(t.y + y) * w + t.x + x] += weights.get(y, x) as f64;
                    }
                }
            }
            let worst = total.iter().map(|v| (v - 1.0).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-6, "{w}x{h} tile {tile} overlap {overlap}: weights sum off by {worst}");
        }
        // without an overlap there is nothing to blend: every weight is 1
        let grid = TileGrid::new(64, 64, 32, 0).unwrap();
        assert!(grid.weights(0).data.iter().all(|&v| v == 1.0));
        assert_eq!(default_overlap(256), 64);
    }

    #[test]
    fn seam_ratio_is_near_one_for_smooth_maps_and_catches_tile_steps() {
        let (w, h, tile, overlap) = (300, 220, 64, 16);
        let grid = TileGrid::new(w, h, tile, overlap).unwrap();
        let smooth = Map::new(
            w,
            h,
            (0..w * h)
                .map(|i| {
                    let (x, y) = ((i % w) as f32, (i / w) as f32);
                    0.02 * x + 0.01 * y + 0.3 * (x / 37.0).sin() * (y / 23.0).cos()
                })
                .collect(),
        )
        .unwrap();
        let stitched = stitch(&smooth, &grid, |_| 0.0, true);
        let m = seam_measure(&stitched, &grid).unwrap();
        assert!((m.border_ratio() - 1.0).abs() < 0.15 && (m.band_ratio() - 1.0).abs() < 0.15, "{m:?}");

        // tiles that disagree by a level each (per-tile statistics): equal weights leave steps at
        // the borders; blending turns them into ramps across the overlaps
        let level = |i: usize| ((i * 7919) % 11) as f32 / 10.0 - 0.5;
        let stepped = seam_measure(&stitch(&smooth, &grid, level, false), &grid).unwrap();
        let blended = seam_measure(&stitch(&smooth, &grid, level, true), &grid).unwrap();
        assert!(stepped.border_ratio() > 5.0, "{stepped:?}");
        assert!(blended.border_ratio() < 1.2, "{blended:?}");
        assert!(blended.band_ratio() < stepped.border_ratio() / 3.0, "{blended:?} {stepped:?}");
        assert!(seam_measure(&Map::filled(10, 10, 0.0), &grid).is_err());
    }

    #[test]
    fn overlaps_are_weighted_and_gaps_reported() {
        let a = Tile { x: 0, y: 0, w: 3, h: 1 };
        let b = Tile { x: 2, y: 0, w: 3, h: 1 };
        let mut s = Stitcher::new(5, 1);
        s.add(&a, &Map::filled(3, 1, 1.0), &Map::filled(3, 1, 1.0)).unwrap();
        s.add(&b, &Map::filled(3, 1, 4.0), &Map::new(3, 1, vec![2.0, 1.0, 1.0]).unwrap()).unwrap();
        assert_eq!(s.finish().unwrap().data, vec![1.0, 1.0, 3.0, 4.0, 4.0]);

        let mut gap = Stitcher::new(6, 1);
        gap.add(&a, &Map::filled(3, 1, 1.0), &Map::filled(3, 1, 1.0)).unwrap();
        assert!(gap.finish().unwrap_err().to_string().contains("x=3"));
        let mut wrong = Stitcher::new(5, 1);
        let one = Map::filled(3, 1, 1.0);
        assert!(wrong.add(&a, &Map::filled(2, 1, 1.0), &one).is_err());
        assert!(wrong.add(&a, &one, &Map::filled(2, 1, 1.0)).is_err());
        assert!(wrong.add(&a, &one, &Map::filled(3, 1, 0.0)).unwrap_err().to_string().contains("positive"));
        assert!(wrong.add(&Tile { x: 4, y: 0, w: 3, h: 1 }, &one, &one).is_err());
    }

    #[test]
    fn sixteen_bit_steps_survive_tiling_and_stitching() {
        // A 16-bit ramp, one level per pixel, written to disk, fitted through TiledSource and
        // scored through score_tiled with an identity "method".
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ramp.png");
        let (w, h) = (40u32, 30u32);
        image::ImageBuffer::<image::Luma<u16>, _>::from_fn(w, h, |x, y| {
            image::Luma([(30000 + y * w + x) as u16])
        })
        .save(&path)
        .unwrap();
        let image = load_image(&path).unwrap();
        let source =
            FileSource::open(std::slice::from_ref(&path), SourceOptions::new(ChannelMode::Gray)).unwrap();
        let tiled = TiledSource::new(source, 16, 5).unwrap();
        // origins x: 0, 11, 22, 24 (shifted to the border); y: 0, 11, 14
        assert_eq!(tiled.len(), 4 * 3);
        let (_, last) = tiled.locate(tiled.len() - 1);
        assert_eq!((last.x, last.y), (24, 14));
        assert_eq!(tiled.load(tiled.len() - 1).unwrap(), image.crop(24, 14, 16, 16));

        let out = score_tiled(&image, None, 16, 5, |t, _| {
            let mut s = ScoreOutput::from_map(map_of(t));
            s.log10_nfa = Some(Map::filled(t.width, t.height, -2.0));
            s.image_score = Some(t.data.iter().copied().fold(0.0, f32::max));
            Ok(s)
        })
        .unwrap();
        let levels: Vec<u32> = out.map.data.iter().map(|v| (v * 65535.0).round() as u32).collect();
        assert_eq!(levels, (0..w * h).map(|i| 30000 + i).collect::<Vec<_>>());
        assert_eq!(out.map.data, image.data);
        assert_eq!(out.image_score, Some(image.data[(w * h - 1) as usize]));
        let expected_nfa = -2.0 + 12f32.log10();
        assert!(out.log10_nfa.unwrap().data.iter().all(|&v| v == expected_nfa));
    }

    #[test]
    fn tiled_source_crops_the_ignore_mask_and_rejects_small_images() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.png");
        image::GrayImage::from_fn(10, 6, |x, y| image::Luma([(x + y) as u8])).save(&path).unwrap();
        let mut ignore = Mask::empty(10, 6);
        ignore.data[5] = true; // x=5, y=0
        let options = SourceOptions { ignore: Some(ignore), ..SourceOptions::new(ChannelMode::Gray) };
        let tiled =
            TiledSource::new(FileSource::open(std::slice::from_ref(&path), options).unwrap(), 6, 2).unwrap();
        assert_eq!(tiled.len(), 2);
        assert!(tiled.ignore_mask(0).unwrap().get(0, 5));
        assert!(tiled.ignore_mask(1).unwrap().get(0, 1));
        assert!(tiled.name(1).contains("tile x=4 y=0"));

        let source = FileSource::open(&[path], SourceOptions::new(ChannelMode::Gray)).unwrap();
        let err = TiledSource::new(source, 8, 0).err().unwrap().to_string();
        assert!(err.contains("small.png") && err.contains("smaller"), "{err}");
    }

    /// Scores a pixel by its difference to the mean of the image it is given, or to a mean taken
    /// from all tiles of the image when it scores tiles.
    struct DifferenceToMean {
        whole_image_mean: Option<f32>,
    }

    impl Detector for DifferenceToMean {
        fn method(&self) -> &'static str {
            "difference-to-mean"
        }
        fn channel_mode(&self) -> ChannelMode {
            ChannelMode::Gray
        }
        fn fit(&mut self, _: &dyn ImageSource, _: &vigil_core::FitContext) -> Result<()> {
            Ok(())
        }
        fn score(&self, image: &Image, _: Option<&Mask>) -> Result<ScoreOutput> {
            let mean =
                self.whole_image_mean.unwrap_or(image.data.iter().sum::<f32>() / image.data.len() as f32);
            Ok(ScoreOutput::from_map(Map::new(
                image.width,
                image.height,
                image.data.iter().map(|v| v - mean).collect(),
            )?))
        }
        fn settings(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn state(&self) -> Result<vigil_core::TensorBag> {
            Ok(vigil_core::TensorBag::new())
        }
        fn with_statistics_of(&self, tiles: &dyn ImageSource) -> Result<Option<Box<dyn Detector>>> {
            let (mut sum, mut n) = (0.0, 0);
            for i in 0..tiles.len() {
                let tile = tiles.load(i)?;
                sum += tile.data.iter().sum::<f32>();
                n += tile.data.len();
            }
            Ok(Some(Box::new(DifferenceToMean { whole_image_mean: Some(sum / n as f32) })))
        }
    }

    #[test]
    fn statistics_from_the_whole_image_make_tiles_agree() {
        // left half dark, right half bright: most tiles alone see a flat image
        let (w, h) = (64, 32);
        let image =
            Image::new(w, h, 1, (0..w * h).map(|i| if i % w < 32 { 0.0 } else { 1.0 }).collect()).unwrap();
        let grid = TileGrid::new(w, h, 16, 4).unwrap();
        let tiles = ImageTiles::new(&image, None, &grid);
        let sum: f32 = (0..tiles.len()).map(|i| tiles.load(i).unwrap().data.iter().sum::<f32>()).sum();
        let tile_mean = sum / (tiles.len() * 16 * 16) as f32;
        let expected: Vec<f32> = image.data.iter().map(|v| v - tile_mean).collect();
        let worst =
            |map: &Map| map.data.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);

        let own = DifferenceToMean { whole_image_mean: None };
        let per_tile = score_tiled(&image, None, 16, 4, |t, m| own.score(t, m)).unwrap();
        assert!(worst(&per_tile.map) > 0.4);
        let whole = score_detector_tiled(&image, None, 16, 4, &own).unwrap();
        assert!(worst(&whole.map) < 1e-6, "{}", worst(&whole.map));
    }

    #[test]
    fn score_tiled_rejects_partial_nfa_and_wrong_ignore() {
        let image = Image::zeros(8, 4, 1);
        let mut calls = 0;
        let err = score_tiled(&image, None, 4, 0, |t, _| {
            calls += 1;
            let mut s = ScoreOutput::from_map(map_of(t));
            if calls == 1 {
                s.log10_nfa = Some(map_of(t));
            }
            Ok(s)
        });
        assert!(err.is_err());
        let wrong = Mask::empty(4, 4);
        assert!(score_tiled(&image, Some(&wrong), 4, 0, |t, _| Ok(ScoreOutput::from_map(map_of(t)))).is_err());
    }
}
