//! The pictures of one scored image in a report: the original, the heatmap and the overlay with
//! the predicted (and ground-truth) outlines, each as a small thumbnail and as a larger view,
//! encoded once when the image is scored so a run keeps only the bytes the page embeds.

use image::RgbImage;
use vigil_core::{Image, Map, Mask, Result, VigilError};

use crate::colormap::colorize;
use crate::overlay::{draw_edge, encode_png, outer_outline, overlay, thumbnail, to_rgb, TRUTH_COLOUR};
use crate::{base64, html::THUMBNAIL_MAX_SIDE};

/// The larger views opened on click are at most this many pixels on the long side. Three of them
/// per image (JPEG) add roughly 50–250 KB per image to the page (more for noisy textures), so a
/// report of a few hundred images stays within a few tens of megabytes.
pub const LARGE_VIEW_MAX_SIDE: u32 = 512;

/// Quality of JPEG thumbnails: high enough that 1-px outlines survive at thumbnail size.
const JPEG_QUALITY: u8 = 90;

/// Quality of the larger views: outlines there are 1 px of up to 512, so a little lower quality
/// keeps them visible while the page stays small.
const LARGE_JPEG_QUALITY: u8 = 85;

/// How strongly the heatmap covers the image in the overlay.
const OVERLAY_ALPHA: f32 = 0.5;

/// An encoded image ready to embed: the smaller of PNG and JPEG. Textured overlays compress
/// poorly as PNG (about 40 KB at 128×128), flat ones poorly as JPEG.
#[derive(Clone, Debug, PartialEq)]
pub struct Picture {
    mime: &'static str,
    bytes: Vec<u8>,
    width: u32,
    height: u32,
}

impl Picture {
    /// Shrinks `img` so that neither side exceeds `max_side` (smaller images stay as they are)
    /// and encodes it.
    pub fn encode(img: &RgbImage, max_side: u32) -> Result<Picture> {
        let small = thumbnail(img, max_side);
        let png = encode_png(&small)?;
        let jpeg = encode_jpeg(&small, JPEG_QUALITY)?;
        let (mime, bytes) = if jpeg.len() < png.len() { ("image/jpeg", jpeg) } else { ("image/png", png) };
        Ok(Picture { mime, bytes, width: small.width(), height: small.height() })
    }

    /// Like [`Picture::encode`] but always JPEG: for larger views, where a PNG encode costs more
    /// time than it could save in bytes on photographs and heatmaps.
    pub fn encode_jpeg(img: &RgbImage, max_side: u32) -> Result<Picture> {
        let small = thumbnail(img, max_side);
        let bytes = encode_jpeg(&small, LARGE_JPEG_QUALITY)?;
        Ok(Picture { mime: "image/jpeg", bytes, width: small.width(), height: small.height() })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The file extension of the encoding: "png" or "jpg".
    pub fn extension(&self) -> &'static str {
        if self.mime == "image/png" {
            "png"
        } else {
            "jpg"
        }
    }

    pub(crate) fn data_uri(&self) -> String {
        format!("data:{};base64,{}", self.mime, base64::encode(&self.bytes))
    }
}

/// JPEG with full-resolution colour (no chroma subsampling), so that 1-px outlines keep their
/// colour. The `jpeg-encoder` crate: the report encodes three larger views per image, and the
/// image crate's encoder took about twice as long.
fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>> {
    let side = |v: u32| {
        u16::try_from(v).map_err(|_| VigilError::invalid(format!("cannot encode JPEG: a side of {v} px")))
    };
    let (width, height) = (side(img.width())?, side(img.height())?);
    let mut jpeg = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut jpeg, quality);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
    encoder
        .encode(img.as_raw(), width, height, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| VigilError::invalid(format!("cannot encode JPEG: {e}")))?;
    Ok(jpeg)
}

/// One view at two sizes: the thumbnail shown in the gallery and the larger one opened on click.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub small: Picture,
    pub large: Picture,
}

/// The three views of a scored image at one size, before encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Views {
    pub original: RgbImage,
    pub heatmap: RgbImage,
    /// The heatmap over the image with the predicted region outlined on its boundary and the
    /// ground truth (when drawn) just outside its region.
    pub overlay: RgbImage,
    /// Whether the overlay carries a ground-truth outline (a mask with at least one defect pixel).
    pub truth_drawn: bool,
}

impl Views {
    /// Renders the views of an image and its anomaly map, coloured over `[lo, hi]`, at most
    /// `max_side` pixels on either side (never enlarged). The image, map and masks are resampled
    /// to that size first, so outlines stay one crisp pixel wide at every size.
    pub fn render(
        image: &Image,
        map: &Map,
        (lo, hi): (f32, f32),
        predicted: &Mask,
        truth: Option<&Mask>,
        max_side: u32,
    ) -> Views {
        let truth = truth.filter(|t| t.count() > 0);
        let scale = (max_side as f64 / image.width.max(image.height).max(1) as f64).min(1.0);
        let fit = |side: usize| ((side as f64 * scale).round() as usize).clamp(1, max_side.max(1) as usize);
        let (w, h) = (fit(image.width), fit(image.height));
        let image = image.resize_bilinear(w, h);
        let map = map.resize_bilinear(w, h);
        let mut overlay = overlay(&image, &map, lo, hi, Some(&predicted.resize_nearest(w, h)), OVERLAY_ALPHA);
        if let Some(t) = truth {
            draw_edge(&mut overlay, &outer_outline(&t.resize_nearest(w, h)), TRUTH_COLOUR);
        }
        Views {
            original: to_rgb(&image),
            heatmap: colorize(&map, lo, hi),
            overlay,
            truth_drawn: truth.is_some(),
        }
    }
}

/// The three views of a scored image, encoded, as thumbnails and larger views.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemPictures {
    pub original: View,
    pub heatmap: View,
    pub overlay: View,
    /// Whether the overlays carry a ground-truth outline.
    pub truth_drawn: bool,
}

impl ItemPictures {
    /// Encodes thumbnails (bounded by [`THUMBNAIL_MAX_SIDE`], the smaller of PNG and JPEG) and
    /// larger views (bounded by [`LARGE_VIEW_MAX_SIDE`], JPEG).
    pub fn encode(small: &Views, large: &Views) -> Result<ItemPictures> {
        let view = |s: &RgbImage, l: &RgbImage| -> Result<View> {
            Ok(View {
                small: Picture::encode(s, THUMBNAIL_MAX_SIDE)?,
                large: Picture::encode_jpeg(l, LARGE_VIEW_MAX_SIDE)?,
            })
        };
        Ok(ItemPictures {
            original: view(&small.original, &large.original)?,
            heatmap: view(&small.heatmap, &large.heatmap)?,
            overlay: view(&small.overlay, &large.overlay)?,
            truth_drawn: small.truth_drawn || large.truth_drawn,
        })
    }

    /// Renders (see [`Views::render`]) and encodes both sizes.
    pub fn render(
        image: &Image,
        map: &Map,
        range: (f32, f32),
        predicted: &Mask,
        truth: Option<&Mask>,
    ) -> Result<ItemPictures> {
        ItemPictures::encode(
            &Views::render(image, map, range, predicted, truth, THUMBNAIL_MAX_SIDE),
            &Views::render(image, map, range, predicted, truth, LARGE_VIEW_MAX_SIDE),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::OUTLINE_COLOUR;

    fn square(w: usize, h: usize, x0: usize, x1: usize, y0: usize, y1: usize) -> Mask {
        let data = (0..w * h).map(|i| (x0..x1).contains(&(i % w)) && (y0..y1).contains(&(i / w))).collect();
        Mask::new(w, h, data).unwrap()
    }

    fn decode(p: &Picture) -> RgbImage {
        image::load_from_memory(p.bytes()).unwrap().to_rgb8()
    }

    #[test]
    fn views_are_bounded_and_outline_prediction_and_truth() {
        // 1000x500: thumbnails 160x80, larger views 512x256
        let (w, h) = (1000, 500);
        let image = Image::new(w, h, 1, vec![0.5; w * h]).unwrap();
        let map = Map::filled(w, h, 0.0);
        let predicted = square(w, h, 100, 400, 100, 400);
        let truth = square(w, h, 600, 900, 100, 400);
        let p = ItemPictures::render(&image, &map, (0.0, 1.0), &predicted, Some(&truth)).unwrap();
        assert!(p.truth_drawn);
        for view in [&p.original, &p.heatmap, &p.overlay] {
            assert_eq!((view.small.width(), view.small.height()), (160, 80));
            assert_eq!((view.large.width(), view.large.height()), (512, 256));
            assert_eq!(decode(&view.large).dimensions(), (512, 256));
        }
        // flat gray thumbnails compress best as PNG, so their colours can be checked exactly;
        // larger views are JPEG, so theirs within a tolerance
        assert_eq!((p.overlay.small.extension(), p.overlay.large.extension()), ("png", "jpg"));
        for (picture, tolerance) in [(&p.overlay.small, 0), (&p.overlay.large, 60)] {
            let over = decode(picture);
            let half = over.width() / 2;
            let count = |c: [u8; 3], left: bool| {
                over.enumerate_pixels()
                    .filter(|(x, _, px)| {
                        (*x < half) == left && (0..3).all(|i| px.0[i].abs_diff(c[i]) <= tolerance)
                    })
                    .count()
            };
            let min = (picture.width() / 2) as usize;
            assert!(count(OUTLINE_COLOUR, true) > min, "prediction outlined on the left");
            assert_eq!(count(OUTLINE_COLOUR, false), 0);
            assert!(count(TRUTH_COLOUR, false) > min, "truth outlined on the right");
            assert_eq!(count(TRUTH_COLOUR, true), 0);
        }
        assert!(decode(&p.original.small).pixels().all(|px| px.0 == [128, 128, 128]));
    }

    #[test]
    fn empty_truth_is_not_drawn_and_small_images_are_not_enlarged() {
        let image = Image::new(40, 30, 3, vec![0.2; 40 * 30 * 3]).unwrap();
        let map = Map::filled(40, 30, 0.3);
        let none = Mask::new(40, 30, vec![false; 1200]).unwrap();
        let p = ItemPictures::render(&image, &map, (0.0, 1.0), &none, Some(&none)).unwrap();
        assert!(!p.truth_drawn);
        assert_eq!((p.heatmap.large.width(), p.heatmap.large.height()), (40, 30));
        assert!(decode(&p.overlay.small).pixels().all(|px| px.0 != TRUTH_COLOUR));
    }

    #[test]
    fn textured_pictures_are_encoded_compactly() {
        // a speckled texture, like paper under a heatmap, compresses poorly as PNG
        let speckle = RgbImage::from_fn(128, 128, |x, y| {
            let v = ((x * 7919 + y * 104729) ^ (x * y * 31)) % 251;
            image::Rgb([v as u8, (v * 3 % 251) as u8, (v * 7 % 251) as u8])
        });
        let p = Picture::encode(&speckle, 160).unwrap();
        assert_eq!(p.extension(), "jpg");
        assert!(p.bytes().len() < encode_png(&speckle).unwrap().len());
        assert!(p.data_uri().starts_with("data:image/jpeg;base64,"));
        let flat = Picture::encode(&RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9])), 160).unwrap();
        assert!(flat.data_uri().starts_with("data:image/png;base64,"));
    }
}
