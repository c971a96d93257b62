//! Heatmap overlays with the predicted region outlined, and PNG output.

use std::path::Path;

use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use image::imageops::FilterType;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use vigil_core::model_file::write_atomic;
use vigil_core::{Image, Map, Mask, Result, VigilError};

use crate::colormap::{to_level, turbo_indices, turbo_table};

/// Magenta: absent from Turbo and far from gray, so the outline stands out on both.
pub const OUTLINE_COLOUR: [u8; 3] = [255, 0, 255];

/// White: absent from Turbo and from the magenta prediction outline, so the ground truth reads
/// as a third colour on both the heatmap and gray image regions.
pub const TRUTH_COLOUR: [u8; 3] = [255, 255, 255];

/// Where the anomaly map is NaN: pure black, a colour Turbo does not contain.
pub const INVALID_COLOUR: [u8; 3] = [0, 0, 0];

/// The boundary of a mask: set pixels with at least one unset 8-neighbour. Pixels beyond the
/// image edge count as unset, so a region touching the edge is still drawn closed.
pub fn outline(mask: &Mask) -> Mask {
    let (w, h) = (mask.width as isize, mask.height as isize);
    let set = |y: isize, x: isize| x >= 0 && y >= 0 && x < w && y < h && mask.data[(y * w + x) as usize];
    let mut data = vec![false; mask.data.len()];
    for y in 0..h {
        for x in 0..w {
            if !set(y, x) {
                continue;
            }
            let open = (-1..=1).any(|dy| (-1..=1).any(|dx| !set(y + dy, x + dx)));
            data[(y * w + x) as usize] = open;
        }
    }
    Mask { width: mask.width, height: mask.height, data }
}

/// The ring just outside a mask: unset pixels with at least one set 8-neighbour. The ground truth
/// is drawn there, the prediction on its own boundary ([`outline`]), so where the two regions
/// coincide both lines stay visible side by side.
pub fn outer_outline(mask: &Mask) -> Mask {
    let (w, h) = (mask.width as isize, mask.height as isize);
    let set = |y: isize, x: isize| x >= 0 && y >= 0 && x < w && y < h && mask.data[(y * w + x) as usize];
    let mut data = vec![false; mask.data.len()];
    for y in 0..h {
        for x in 0..w {
            if set(y, x) {
                continue;
            }
            data[(y * w + x) as usize] = (-1..=1).any(|dy| (-1..=1).any(|dx| set(y + dy, x + dx)));
        }
    }
    Mask { width: mask.width, height: mask.height, data }
}

/// Paints the pixels set in `edge` (of the image's size) with `colour`.
pub fn draw_edge(img: &mut RgbImage, edge: &Mask, colour: [u8; 3]) {
    for (pixel, &on) in img.pixels_mut().zip(&edge.data) {
        if on {
            pixel.0 = colour;
        }
    }
}

/// The image itself as 8-bit RGB, by the same channel rules as [`overlay`].
pub fn to_rgb(image: &Image) -> RgbImage {
    // only a channel-less image needs it; the others would pay for zeroing a whole plane
    let black = if image.channels == 0 { vec![0f32; image.plane_len()] } else { Vec::new() };
    let planes = display_planes(image, &black);
    let mut out = RgbImage::new(image.width as u32, image.height as u32);
    for (i, pixel) in out.pixels_mut().enumerate() {
        pixel.0 = std::array::from_fn(|c| to_level(display_level(planes[c][i])));
    }
    out
}

/// The three planes shown as RGB: gray for one- and two-channel images (the second channel is
/// alpha), the first three channels otherwise, `black` for a channel-less image.
fn display_planes<'a>(image: &'a Image, black: &'a [f32]) -> [&'a [f32]; 3] {
    match image.channels {
        0 => [black; 3],
        1 | 2 => [image.channel(0); 3],
        _ => [image.channel(0), image.channel(1), image.channel(2)],
    }
}

/// A sample in [0, 255]; NaN samples (a corrupt decode) show as black rather than poisoning a blend.
fn display_level(v: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 1.0) * 255.0
    }
}

/// The anomaly map in Turbo colours blended over the image with weight `alpha` (0 = image only,
/// 1 = heatmap only, clamped to that range), then the boundary of `predicted` drawn in
/// [`OUTLINE_COLOUR`].
///
/// One- and two-channel images are shown as gray (the second channel is alpha); otherwise the
/// first three channels are RGB. A map or mask of another size is resampled to the image
/// (bilinear / nearest), so a low-resolution map can be shown over its image. Pixels whose
/// score is NaN are painted [`INVALID_COLOUR`] so that a defective map is visible, not hidden.
pub fn overlay(image: &Image, map: &Map, lo: f32, hi: f32, predicted: Option<&Mask>, alpha: f32) -> RgbImage {
    let alpha = if alpha.is_nan() { 0.5 } else { alpha.clamp(0.0, 1.0) };
    let (w, h) = (image.width, image.height);
    let resized;
    let map = if (map.width, map.height) == (w, h) {
        map
    } else {
        resized = map.resize_bilinear(w, h);
        &resized
    };
    let edge = predicted.map(|m| outline(&m.resize_nearest(w, h)));
    let no_edge;
    let edge: &[bool] = match &edge {
        Some(e) => &e.data,
        None => {
            no_edge = vec![false; w * h];
            &no_edge
        }
    };
    // only a channel-less image needs it; the others would pay for zeroing a whole plane
    let black = if image.channels == 0 { vec![0f32; image.plane_len()] } else { Vec::new() };
    let planes = display_planes(image, &black);
    let mut out = RgbImage::new(w as u32, h as u32);
    let table = turbo_table();
    let keep = 1.0 - alpha;
    // Every pixel of every overlay goes through here: the work is split into simple passes over
    // a block of pixels, each of which the compiler vectorises (a per-pixel loop did not).
    const BLOCK: usize = 2048;
    let mut index = [0u32; BLOCK];
    let mut heat = [[0f32; BLOCK]; 3];
    let mut levels = [[0u8; BLOCK]; 3];
    for (block, pixels) in out.chunks_mut(3 * BLOCK).enumerate() {
        let range = block * BLOCK..block * BLOCK + pixels.len() / 3;
        let values = &map.data[range.clone()];
        turbo_indices(values, lo, hi, &mut index);
        for (i, &index) in index[..values.len()].iter().enumerate() {
            let colour = table[index as usize];
            for c in 0..3 {
                heat[c][i] = colour[c] as f32;
            }
        }
        for c in 0..3 {
            let samples = &planes[c][range.clone()];
            for ((level, &sample), &heat) in levels[c].iter_mut().zip(samples).zip(&heat[c]) {
                *level = to_level(display_level(sample) * keep + heat * alpha);
            }
        }
        let overrides = values.iter().zip(&edge[range]);
        for (i, (pixel, (&value, &on_edge))) in pixels.chunks_exact_mut(3).zip(overrides).enumerate() {
            let colour = if on_edge {
                OUTLINE_COLOUR
            } else if value.is_nan() {
                INVALID_COLOUR
            } else {
                [levels[0][i], levels[1][i], levels[2][i]]
            };
            pixel.copy_from_slice(&colour);
        }
    }
    out
}

/// Shrinks so that neither side exceeds `max_side`, keeping the aspect ratio; smaller images
/// are returned unchanged.
pub fn thumbnail(img: &RgbImage, max_side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let max_side = max_side.max(1);
    if w <= max_side && h <= max_side {
        return img.clone();
    }
    let scale = max_side as f64 / w.max(h) as f64;
    let tw = ((w as f64 * scale).round() as u32).clamp(1, max_side);
    let th = ((h as f64 * scale).round() as u32).clamp(1, max_side);
    image::imageops::resize(img, tw, th, FilterType::Triangle)
}

/// PNG bytes of an RGB image, e.g. for a data URI.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes)
        .write_image(img.as_raw(), img.width(), img.height(), ExtendedColorType::Rgb8)
        .map_err(|e| VigilError::invalid(format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

/// PNG bytes of an 8-bit gray image given as `width * height` levels, row by row.
pub fn encode_gray_png(levels: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Fast, PngFilter::Up)
        .write_image(levels, width, height, ExtendedColorType::L8)
        .map_err(|e| VigilError::invalid(format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

/// Writes the image as PNG atomically; an existing file is replaced only with `overwrite`.
pub fn write_png(path: &Path, img: &RgbImage, overwrite: bool) -> Result<()> {
    let bytes = encode_png(img).map_err(|e| VigilError::file(path, e.to_string()))?;
    write_atomic(path, &bytes, overwrite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colormap::{normalize, turbo};

    fn square_mask(size: usize, from: usize, to: usize) -> Mask {
        let data = (0..size * size)
            .map(|i| {
                let (y, x) = (i / size, i % size);
                (from..to).contains(&y) && (from..to).contains(&x)
            })
            .collect();
        Mask::new(size, size, data).unwrap()
    }

    #[test]
    fn outline_is_the_ring_of_the_region_only() {
        let mask = square_mask(8, 2, 6);
        let edge = outline(&mask);
        // 4x4 square: 12 ring pixels, the 2x2 interior is not outlined
        assert_eq!(edge.count(), 12);
        assert!(edge.get(2, 2) && edge.get(2, 5) && edge.get(5, 3));
        assert!(!edge.get(3, 3) && !edge.get(4, 4));
        assert!(!edge.get(1, 1) && !edge.get(6, 6));
        // a full mask is closed along the image border
        let full = outline(&Mask::new(3, 3, vec![true; 9]).unwrap());
        assert_eq!(full.count(), 8);
        assert!(!full.get(1, 1));
    }

    #[test]
    fn outer_outline_rings_the_region_from_outside() {
        let mask = square_mask(8, 2, 6);
        let ring = outer_outline(&mask);
        // 4x4 square: the ring around it is 6x6 minus the square, 20 pixels, none inside the mask
        assert_eq!(ring.count(), 20);
        assert!(ring.get(1, 1) && ring.get(6, 6) && ring.get(1, 3));
        assert!(!ring.get(2, 2) && !ring.get(0, 0) && !ring.get(7, 7));
        assert!(ring.data.iter().zip(&mask.data).all(|(&r, &m)| !(r && m)));
        // the ring and the inner outline of the same mask never share a pixel
        assert!(ring.data.iter().zip(&outline(&mask).data).all(|(&r, &o)| !(r && o)));
        let mut img = RgbImage::new(8, 8);
        draw_edge(&mut img, &ring, TRUTH_COLOUR);
        assert_eq!(img.pixels().filter(|p| p.0 == TRUTH_COLOUR).count(), 20);
    }

    #[test]
    fn to_rgb_shows_gray_and_colour_images() {
        let gray = Image::new(2, 1, 1, vec![0.2, f32::NAN]).unwrap();
        let out = to_rgb(&gray);
        assert_eq!(out.get_pixel(0, 0).0, [51, 51, 51]);
        assert_eq!(out.get_pixel(1, 0).0, [0, 0, 0], "NaN shows as black");
        let rgb = Image::new(1, 1, 3, vec![1.0, 0.0, 0.5]).unwrap();
        assert_eq!(to_rgb(&rgb).get_pixel(0, 0).0, [255, 0, 128]);
    }

    #[test]
    fn overlay_blends_heat_and_draws_the_outline_on_the_boundary_only() {
        let size = 8;
        let image = Image::new(size, size, 1, vec![0.5; size * size]).unwrap();
        let mut map = Map::filled(size, size, 0.0);
        map.data[0] = 1.0;
        let mask = square_mask(size, 2, 6);
        let out = overlay(&image, &map, 0.0, 1.0, Some(&mask), 0.5);
        assert_eq!(out.dimensions(), (8, 8));
        // boundary pixels carry the outline colour
        for (x, y) in [(2, 2), (5, 2), (2, 5), (5, 5), (3, 2)] {
            assert_eq!(out.get_pixel(x, y).0, OUTLINE_COLOUR, "({x},{y})");
        }
        // interior and outside pixels are the blend of gray 127.5 with the low Turbo colour
        let low = turbo(0.0);
        let blend: [u8; 3] = std::array::from_fn(|c| ((127.5 + low[c] as f32) * 0.5).round() as u8);
        assert_eq!(out.get_pixel(3, 3).0, blend);
        assert_eq!(out.get_pixel(7, 7).0, blend);
        let high = turbo(1.0);
        let hot: [u8; 3] = std::array::from_fn(|c| ((127.5 + high[c] as f32) * 0.5).round() as u8);
        assert_eq!(out.get_pixel(0, 0).0, hot);
    }

    #[test]
    fn overlay_keeps_rgb_and_gray_apart() {
        let mut data = vec![0.0; 2 * 3];
        data[0..2].copy_from_slice(&[1.0, 1.0]); // red plane
        let rgb = Image::new(2, 1, 3, data).unwrap();
        let map = Map::filled(2, 1, 0.0);
        let out = overlay(&rgb, &map, 0.0, 1.0, None, 0.0);
        assert_eq!(out.get_pixel(0, 0).0, [255, 0, 0]);
        let gray = Image::new(2, 1, 1, vec![0.2, 0.2]).unwrap();
        let out = overlay(&gray, &map, 0.0, 1.0, None, 0.0);
        assert_eq!(out.get_pixel(1, 0).0, [51, 51, 51]);
    }

    #[test]
    fn overlay_resamples_other_sizes_and_marks_nan() {
        let image = Image::zeros(4, 4, 3);
        let mut small = Map::filled(2, 2, 0.0);
        small.data[3] = 1.0; // bottom-right quarter is hot
        let out = overlay(
            &image,
            &small,
            0.0,
            1.0,
            Some(&Mask::new(2, 2, vec![true, false, false, false]).unwrap()),
            1.0,
        );
        assert_eq!(out.dimensions(), (4, 4));
        assert_eq!(out.get_pixel(3, 3).0, turbo(1.0));
        assert_eq!(out.get_pixel(3, 0).0, turbo(0.0));
        // the mask's top-left quarter became a 2x2 block, all of it boundary
        assert_eq!(out.get_pixel(1, 1).0, OUTLINE_COLOUR);
        assert_ne!(out.get_pixel(2, 2).0, OUTLINE_COLOUR);
        let mut nan = Map::filled(4, 4, 0.0);
        nan.data[5] = f32::NAN;
        let out = overlay(&image, &nan, 0.0, 1.0, None, 0.5);
        assert_eq!(out.get_pixel(1, 1).0, INVALID_COLOUR);
        assert_ne!(out.get_pixel(0, 0).0, INVALID_COLOUR);
        // out-of-range opacity is clamped, a channel-less image shows the heatmap alone
        assert_eq!(overlay(&image, &nan, 0.0, 1.0, None, 7.0).get_pixel(0, 0).0, turbo(0.0));
        let empty = Image { width: 4, height: 4, channels: 0, bit_depth: 8, data: vec![] };
        assert_eq!(overlay(&empty, &nan, 0.0, 1.0, None, 1.0).get_pixel(0, 0).0, turbo(0.0));
    }

    /// The block-wise overlay equals the per-pixel definition (blend of the display level and the
    /// Turbo colour of the normalised score, NaN and outline colours on top) on every pixel of an
    /// image spanning several blocks, with NaN, infinite and out-of-range scores and samples.
    #[test]
    fn overlay_equals_its_per_pixel_definition() {
        let (w, h) = (97, 61);
        let mut state = 12345u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32
        };
        let mut samples: Vec<f32> = (0..w * h * 3).map(|_| next() * 1.4 - 0.2).collect();
        samples[7] = f32::NAN;
        let image = Image::new(w, h, 3, samples).unwrap();
        let mut map = Map::filled(w, h, 0.0);
        for v in map.data.iter_mut() {
            *v = next() * 3.0 - 1.0;
        }
        map.data[10] = f32::NAN;
        map.data[11] = f32::INFINITY;
        map.data[12] = f32::NEG_INFINITY;
        let mask = Mask::new(w, h, map.data.iter().map(|&v| v > 1.2).collect()).unwrap();
        for (lo, hi, predicted, alpha) in
            [(0.0, 1.0, Some(&mask), 0.5), (-0.5, 1.7, None, 0.3), (0.4, 0.4, Some(&mask), 0.8)]
        {
            let out = overlay(&image, &map, lo, hi, predicted, alpha);
            let edge = predicted.map(outline);
            for i in 0..w * h {
                let expected = if edge.as_ref().is_some_and(|e| e.data[i]) {
                    OUTLINE_COLOUR
                } else if map.data[i].is_nan() {
                    INVALID_COLOUR
                } else {
                    let heat = turbo(normalize(map.data[i], lo, hi));
                    std::array::from_fn(|c| {
                        let sample = display_level(image.channel(c)[i]);
                        (sample * (1.0 - alpha) + heat[c] as f32 * alpha + 0.5) as u8
                    })
                };
                assert_eq!(out.as_raw()[3 * i..3 * i + 3], expected, "pixel {i}, range {lo}..{hi}");
            }
        }
    }

    #[test]
    fn png_keeps_every_pixel_of_a_textured_image() {
        let img = RgbImage::from_fn(97, 61, |x, y| {
            let v = (x * 7919 + y * 104_729) ^ (x * y * 31);
            image::Rgb([v as u8, (v >> 3) as u8, (v >> 7) as u8])
        });
        let back = image::load_from_memory(&encode_png(&img).unwrap()).unwrap().to_rgb8();
        assert_eq!(back, img);
    }

    #[test]
    fn thumbnail_and_png_round_trip() {
        let img = RgbImage::from_pixel(400, 200, image::Rgb([10, 20, 30]));
        let t = thumbnail(&img, 160);
        assert_eq!(t.dimensions(), (160, 80));
        assert_eq!(thumbnail(&t, 160).dimensions(), (160, 80));
        let bytes = encode_png(&t).unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (160, 80));
        assert_eq!(back.get_pixel(5, 5).0, [10, 20, 30]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.png");
        write_png(&p, &t, false).unwrap();
        assert!(write_png(&p, &t, false).unwrap_err().to_string().contains("--overwrite"));
        write_png(&p, &t, true).unwrap();
    }
}
