//! Tiling of large images (X-ray scans of paintings are thousands of pixels a side) and stitching
//! per-tile maps back into one whole-image map.
//!
//! Tiles are square, `tile` pixels a side, `tile - overlap` apart; the last tile of each row and
//! column is shifted back so it ends exactly at the border, so every tile has the full size and
//! every pixel is covered. An image smaller than one tile (in either direction) is an error: a
//! padded or shrunken tile would show the method content of a kind it never learned from.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vigil_core::{Image, ImageSource, Map, Mask, Result, ScoreOutput, VigilError};

use crate::source::FileSource;

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
    tiles: Vec<Tile>,
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
        let tiles = positions(height, tile, stride)
            .into_iter()
            .flat_map(|y| xs.iter().map(move |&x| Tile { x, y, w: tile, h: tile }))
            .collect();
        Ok(TileGrid { width, height, tiles })
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
}

/// How the stitcher combines the values of tiles that overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// Average (anomaly maps).
    Mean,
    /// Smallest value (log10 NFA maps: the most significant test of any tile covering the pixel).
    Min,
}

/// Accumulates per-tile maps into a whole-image map.
pub struct Stitcher {
    width: usize,
    height: usize,
    reduce: Reduce,
    /// Running mean (or minimum) so far; a running mean reproduces equal inputs exactly.
    value: Vec<f32>,
    count: Vec<u32>,
}

impl Stitcher {
    /// Averages overlapping tiles (anomaly maps).
    pub fn new(width: usize, height: usize) -> Stitcher {
        Stitcher::with_reduce(width, height, Reduce::Mean)
    }

    pub fn with_reduce(width: usize, height: usize, reduce: Reduce) -> Stitcher {
        Stitcher { width, height, reduce, value: vec![0.0; width * height], count: vec![0; width * height] }
    }

    pub fn add(&mut self, tile: &Tile, map: &Map) -> Result<()> {
        if (map.width, map.height) != (tile.w, tile.h) {
            return Err(VigilError::invalid(format!(
                "tile map is {}x{} but the tile at ({}, {}) is {}x{}",
                map.width, map.height, tile.x, tile.y, tile.w, tile.h
            )));
        }
        if tile.x + tile.w > self.width || tile.y + tile.h > self.height {
            return Err(VigilError::invalid(format!(
                "tile at ({}, {}) of size {}x{} lies outside the {}x{} image",
                tile.x, tile.y, tile.w, tile.h, self.width, self.height
            )));
        }
        for row in 0..tile.h {
            let start = (tile.y + row) * self.width + tile.x;
            let values = &mut self.value[start..start + tile.w];
            let counts = &mut self.count[start..start + tile.w];
            let src = &map.data[row * tile.w..(row + 1) * tile.w];
            for ((v, n), &s) in values.iter_mut().zip(counts.iter_mut()).zip(src) {
                *n += 1;
                *v = match self.reduce {
                    Reduce::Mean => *v + (s - *v) / *n as f32,
                    Reduce::Min if *n == 1 => s,
                    Reduce::Min => v.min(s),
                };
            }
        }
        Ok(())
    }

    /// The whole-image map; an error if some pixel was covered by no tile.
    pub fn finish(self) -> Result<Map> {
        if let Some(i) = self.count.iter().position(|&n| n == 0) {
            return Err(VigilError::invalid(format!(
                "tiles do not cover the image: pixel x={}, y={} has no value",
                i % self.width,
                i / self.width
            )));
        }
        Map::new(self.width, self.height, self.value)
    }
}

/// Scores an image tile by tile and stitches the results:
/// - the anomaly map is the average of the overlapping tile maps;
/// - the image score, when every tile gives one, is the largest tile score;
/// - log10 NFA, when every tile gives it, is the minimum over the tiles covering a pixel plus
///   log10(number of tiles): the tiles are separate families of tests, so the number of tests of
///   the whole image is their sum (a Bonferroni union), and averaging NFAs would bound nothing.
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
    let mut nfa = Stitcher::with_reduce(image.width, image.height, Reduce::Min);
    let (mut nfa_tiles, mut image_scores) = (0, Vec::with_capacity(grid.len()));
    for t in grid.tiles() {
        let tile_ignore = ignore.map(|m| m.crop(t.x, t.y, t.w, t.h));
        let out = score(&image.crop(t.x, t.y, t.w, t.h), tile_ignore.as_ref())?;
        maps.add(t, &out.map)?;
        if let Some(n) = &out.log10_nfa {
            nfa.add(t, n)?;
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
    use crate::io::load_image;
    use crate::source::SourceOptions;
    use vigil_core::ChannelMode;

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

    #[test]
    fn stitching_constant_and_identity_maps_is_exact() {
        let (w, h) = (23, 17);
        let identity = Map::new(w, h, (0..w * h).map(|i| i as f32 * 0.37).collect()).unwrap();
        let reference = &identity;
        for (tile, overlap) in [(8, 3), (5, 4), (17, 0)] {
            let grid = TileGrid::new(w, h, tile, overlap).unwrap();
            let mut constant = Stitcher::new(w, h);
            let mut ident = Stitcher::new(w, h);
            for t in grid.tiles() {
                constant.add(t, &Map::filled(t.w, t.h, 0.1)).unwrap();
                let crop = Map::new(
                    t.w,
                    t.h,
                    (0..t.h).flat_map(|r| (0..t.w).map(move |c| reference.get(t.y + r, t.x + c))).collect(),
                )
                .unwrap();
                ident.add(t, &crop).unwrap();
            }
            assert!(constant.finish().unwrap().data.iter().all(|&v| v == 0.1));
            assert_eq!(ident.finish().unwrap(), identity);
        }
    }

    #[test]
    fn overlaps_are_averaged_and_gaps_reported() {
        let a = Tile { x: 0, y: 0, w: 3, h: 1 };
        let b = Tile { x: 2, y: 0, w: 3, h: 1 };
        let mut s = Stitcher::new(5, 1);
        s.add(&a, &Map::filled(3, 1, 1.0)).unwrap();
        s.add(&b, &Map::filled(3, 1, 4.0)).unwrap();
        assert_eq!(s.finish().unwrap().data, vec![1.0, 1.0, 2.5, 4.0, 4.0]);

        let mut m = Stitcher::with_reduce(5, 1, Reduce::Min);
        m.add(&a, &Map::filled(3, 1, -1.0)).unwrap();
        m.add(&b, &Map::filled(3, 1, -4.0)).unwrap();
        assert_eq!(m.finish().unwrap().data, vec![-1.0, -1.0, -4.0, -4.0, -4.0]);

        let mut gap = Stitcher::new(6, 1);
        gap.add(&a, &Map::filled(3, 1, 1.0)).unwrap();
        assert!(gap.finish().unwrap_err().to_string().contains("x=3"));
        let mut wrong = Stitcher::new(5, 1);
        assert!(wrong.add(&a, &Map::filled(2, 1, 1.0)).is_err());
        assert!(wrong.add(&Tile { x: 4, y: 0, w: 3, h: 1 }, &Map::filled(3, 1, 1.0)).is_err());
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
        crate::testutil::write_gray8(&path, 10, 6, |x, y| (x + y) as u8);
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
