//! Reading images and masks, writing and reading anomaly-map files, listing image folders.
//!
//! PNG, JPEG and BMP are decoded by the `image` crate; TIFF by the `tiff` crate directly, because
//! the `image` crate has no single-channel float TIFF, which X-ray images and vigil's own map files use.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageFormat};
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::TiffError;
use vigil_core::model_file::write_atomic;
use vigil_core::{Image, Map, Mask, Result, VigilError};

const SUPPORTED: &str = "vigil reads PNG, JPEG, BMP and TIFF (.png .jpg .jpeg .bmp .tif .tiff)";

/// Decoders refuse allocations above this; large X-ray scans (tens of megapixels at 16 bits)
/// exceed the `image` crate's 512 MiB default, while a corrupt header claiming absurd dimensions
/// should still fail cleanly rather than exhaust memory.
const MAX_DECODE_BYTES: u64 = 8 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Bmp,
    Tiff,
}

impl Format {
    fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(Format::Png),
            "jpg" | "jpeg" => Some(Format::Jpeg),
            "bmp" => Some(Format::Bmp),
            "tif" | "tiff" => Some(Format::Tiff),
            _ => None,
        }
    }

    /// The format the bytes themselves declare (their signature), if it is one vigil reads.
    fn sniff(bytes: &[u8]) -> Option<Format> {
        // BigTIFF (files over 4 GiB, common for large scans) is not among the `image` crate's
        // signatures, but the `tiff` decoder reads it.
        if bytes.starts_with(b"II+\0") || bytes.starts_with(b"MM\0+") {
            return Some(Format::Tiff);
        }
        match image::guess_format(bytes).ok()? {
            ImageFormat::Png => Some(Format::Png),
            ImageFormat::Jpeg => Some(Format::Jpeg),
            ImageFormat::Bmp => Some(Format::Bmp),
            ImageFormat::Tiff => Some(Format::Tiff),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Png => "PNG",
            Format::Jpeg => "JPEG",
            Format::Bmp => "BMP",
            Format::Tiff => "TIFF",
        }
    }
}

/// True if the path ends in .png .jpg .jpeg .bmp .tif or .tiff (in any case).
pub fn has_image_extension(path: &Path) -> bool {
    Format::from_extension(path).is_some()
}

/// Reads a whole file, turning the usual failures into messages that say what to do.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VigilError::file(path, "file not found; check the path"),
        _ => VigilError::io(path, e),
    })?;
    if bytes.is_empty() {
        return Err(VigilError::file(path, "file is empty (0 bytes); re-export the image or remove it"));
    }
    Ok(bytes)
}

fn truncated(path: &Path, format: Format, len: usize) -> VigilError {
    VigilError::file(
        path,
        format!(
            "truncated {} file: the data ends before the image is complete ({len} bytes); \
             copy or export the file again",
            format.name()
        ),
    )
}

fn corrupt(path: &Path, format: Format, detail: impl std::fmt::Display) -> VigilError {
    VigilError::file(
        path,
        format!(
            "corrupt {} data ({}); the file cannot be decoded: re-export it or remove it \
             (or skip unreadable files with --skip-bad)",
            format.name(),
            detail.to_string().trim()
        ),
    )
}

/// Third-party decoders are not guaranteed panic-free on hostile input; a damaged file must end
/// as an error naming it, not as a crash of a long run.
fn guard<T>(path: &Path, format: Format, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(decode))
        .unwrap_or_else(|_| Err(corrupt(path, format, "the decoder failed on malformed data")))
}

/// Loads an image as planar `f32` in [0, 1]: 8-bit samples are divided by 255, 16-bit samples by
/// 65535 (every level stays distinct in `f32` and `(v * 65535).round()` gives it back). Alpha is dropped, so the result has 1 or 3 channels.
/// Float TIFFs are taken as they are and must already lie in [0, 1].
pub fn load_image(path: &Path) -> Result<Image> {
    if path.is_dir() {
        return Err(VigilError::file(path, "is a folder, not an image file"));
    }
    let Some(by_extension) = Format::from_extension(path) else {
        let ext = path.extension().map(|e| format!("'.{}'", e.to_string_lossy()));
        return Err(VigilError::file(
            path,
            format!("unsupported image format {}; {SUPPORTED}", ext.as_deref().unwrap_or("(no extension)")),
        ));
    };
    let bytes = read_bytes(path)?;
    // The signature decides the decoder, so a JPEG saved as .png still loads; bytes matching no
    // format are damage (or a non-image file), reported against the format the name promises.
    let Some(format) = Format::sniff(&bytes) else {
        return Err(corrupt(
            path,
            by_extension,
            "the content does not start with an image signature; it is damaged or not an image",
        ));
    };
    decode_as(path, &bytes, format)
}

/// Decodes an image held in memory (an upload to the server) exactly as [`load_image`] decodes a
/// file's bytes; the signature decides the format and `name` is used in messages.
pub fn decode_image(name: &Path, bytes: &[u8]) -> Result<Image> {
    if bytes.is_empty() {
        return Err(VigilError::file(name, "the image is empty (0 bytes)"));
    }
    let Some(format) = Format::sniff(bytes) else {
        return Err(VigilError::file(
            name,
            format!("the content does not start with an image signature; it is damaged or not an image ({SUPPORTED})"),
        ));
    };
    decode_as(name, bytes, format)
}

fn decode_as(path: &Path, bytes: &[u8], format: Format) -> Result<Image> {
    if format == Format::Jpeg && !jpeg_is_complete(bytes) {
        return Err(truncated(path, format, bytes.len()));
    }
    guard(path, format, || match format {
        Format::Tiff => decode_tiff(path, bytes),
        _ => decode_with_image_crate(path, bytes, format),
    })
}

/// JPEG decoders conceal a cut-off file by filling the missing rows with gray, so truncation is
/// checked here: a complete file has its end-of-image marker (FF D9) after the last start-of-scan
/// marker (FF DA). Neither can occur inside entropy-coded data, where every FF byte is followed by
/// 00 or a restart marker; an embedded EXIF thumbnail comes before the main image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    last_scan.is_some_and(|start| bytes[start..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

fn decode_with_image_crate(path: &Path, bytes: &[u8], format: Format) -> Result<Image> {
    let image_format = match format {
        Format::Png => ImageFormat::Png,
        Format::Jpeg => ImageFormat::Jpeg,
        Format::Bmp => ImageFormat::Bmp,
        Format::Tiff => ImageFormat::Tiff,
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| image_error(path, format, bytes.len(), e))?;
    dynamic_to_image(path, decoded)
}

fn image_error(path: &Path, format: Format, len: usize, e: image::ImageError) -> VigilError {
    match &e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            truncated(path, format, len)
        }
        image::ImageError::Limits(_) => VigilError::file(
            path,
            format!("image is too large to decode (over {} GiB): {e}", MAX_DECODE_BYTES >> 30),
        ),
        image::ImageError::Unsupported(_) => VigilError::file(
            path,
            format!("unsupported {} variant ({e}); convert it to 8- or 16-bit gray or RGB", format.name()),
        ),
        _ if is_truncation_message(&e.to_string()) => truncated(path, format, len),
        _ => corrupt(path, format, e),
    }
}

/// Decoders report running out of data in their own words; these are the ones they use.
fn is_truncation_message(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["eof", "end of file", "unexpected end", "truncated", "not enough", "ran out"]
        .iter()
        .any(|needle| m.contains(needle))
}

fn planar<T: Copy>(interleaved: &[T], channels_in: usize, keep: usize, scale: impl Fn(T) -> f32) -> Vec<f32> {
    let n = interleaved.len() / channels_in;
    let mut out = vec![0f32; n * keep];
    // one plane at a time: sequential writes instead of three interleaved streams
    for (c, plane) in out.chunks_exact_mut(n.max(1)).enumerate() {
        for (sample, px) in plane.iter_mut().zip(interleaved.chunks_exact(channels_in)) {
            *sample = scale(px[c]);
        }
    }
    out
}

/// `v / 255` of every 8-bit level, looked up instead of divided: the same values, a third of
/// the time of converting a decoded image.
const LEVELS_U8: [f32; 256] = {
    let mut levels = [0f32; 256];
    let mut v = 0;
    while v < 256 {
        levels[v] = v as f32 / 255.0;
        v += 1;
    }
    levels
};

fn from_u8(v: u8) -> f32 {
    LEVELS_U8[v as usize]
}

fn from_u16(v: u16) -> f32 {
    v as f32 / 65535.0
}

fn dynamic_to_image(path: &Path, decoded: DynamicImage) -> Result<Image> {
    let (w, h) = (decoded.width() as usize, decoded.height() as usize);
    let (data, channels, bit_depth) = match &decoded {
        DynamicImage::ImageLuma8(b) => (planar(b.as_raw(), 1, 1, from_u8), 1, 8),
        DynamicImage::ImageLumaA8(b) => (planar(b.as_raw(), 2, 1, from_u8), 1, 8),
        DynamicImage::ImageRgb8(b) => (planar(b.as_raw(), 3, 3, from_u8), 3, 8),
        DynamicImage::ImageRgba8(b) => (planar(b.as_raw(), 4, 3, from_u8), 3, 8),
        DynamicImage::ImageLuma16(b) => (planar(b.as_raw(), 1, 1, from_u16), 1, 16),
        DynamicImage::ImageLumaA16(b) => (planar(b.as_raw(), 2, 1, from_u16), 1, 16),
        DynamicImage::ImageRgb16(b) => (planar(b.as_raw(), 3, 3, from_u16), 3, 16),
        DynamicImage::ImageRgba16(b) => (planar(b.as_raw(), 4, 3, from_u16), 3, 16),
        DynamicImage::ImageRgb32F(b) => (planar(b.as_raw(), 3, 3, |v| v), 3, 32),
        DynamicImage::ImageRgba32F(b) => (planar(b.as_raw(), 4, 3, |v| v), 3, 32),
        other => {
            return Err(VigilError::file(
                path,
                format!(
                    "unsupported pixel layout {:?}; convert it to 8- or 16-bit gray or RGB",
                    other.color()
                ),
            ))
        }
    };
    finish_image(path, w, h, channels, bit_depth, data)
}

fn finish_image(
    path: &Path,
    w: usize,
    h: usize,
    channels: usize,
    bit_depth: u8,
    data: Vec<f32>,
) -> Result<Image> {
    if let Some(i) = data.iter().position(|v| !(0.0..=1.0).contains(v)) {
        return Err(VigilError::file(
            path,
            format!(
                "float image has a value {} outside [0, 1] at x={}, y={}; normalise it to [0, 1] first",
                data[i],
                i % w.max(1),
                (i / w.max(1)) % h.max(1)
            ),
        ));
    }
    let mut image = Image::new(w, h, channels, data).map_err(|e| VigilError::file(path, e.to_string()))?;
    image.bit_depth = bit_depth;
    Ok(image)
}

fn tiff_decoder<'a>(path: &Path, bytes: &'a [u8]) -> Result<Decoder<Cursor<&'a [u8]>>> {
    let mut limits = Limits::default();
    limits.decoding_buffer_size = MAX_DECODE_BYTES as usize;
    limits.intermediate_buffer_size = MAX_DECODE_BYTES as usize;
    Decoder::new(Cursor::new(bytes))
        .map(|d| d.with_limits(limits))
        .map_err(|e| tiff_error(path, bytes.len(), e))
}

fn tiff_error(path: &Path, len: usize, e: TiffError) -> VigilError {
    match &e {
        TiffError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            truncated(path, Format::Tiff, len)
        }
        TiffError::UnsupportedError(_) => VigilError::file(
            path,
            format!("unsupported TIFF variant ({e}); convert it to 8- or 16-bit gray or RGB"),
        ),
        TiffError::LimitsExceeded => VigilError::file(
            path,
            format!("TIFF image is too large to decode (over {} GiB)", MAX_DECODE_BYTES >> 30),
        ),
        _ if is_truncation_message(&e.to_string()) => truncated(path, Format::Tiff, len),
        _ => corrupt(path, Format::Tiff, e),
    }
}

fn decode_tiff(path: &Path, bytes: &[u8]) -> Result<Image> {
    let mut decoder = tiff_decoder(path, bytes)?;
    let (w, h) = decoder.dimensions().map_err(|e| tiff_error(path, bytes.len(), e))?;
    let (w, h) = (w as usize, h as usize);
    let color = decoder.colortype().map_err(|e| tiff_error(path, bytes.len(), e))?;
    let (channels_in, keep) = match color {
        tiff::ColorType::Gray(_) => (1, 1),
        tiff::ColorType::GrayA(_) => (2, 1),
        tiff::ColorType::RGB(_) => (3, 3),
        tiff::ColorType::RGBA(_) => (4, 3),
        other => {
            return Err(VigilError::file(
                path,
                format!("unsupported TIFF colour type {other:?}; convert it to gray or RGB"),
            ))
        }
    };
    let decoded = decoder.read_image().map_err(|e| tiff_error(path, bytes.len(), e))?;
    let (data, bit_depth) = match decoded {
        DecodingResult::U8(v) => (planar(&v, channels_in, keep, from_u8), 8),
        DecodingResult::U16(v) => (planar(&v, channels_in, keep, from_u16), 16),
        DecodingResult::F32(v) => (planar(&v, channels_in, keep, |x| x), 32),
        DecodingResult::F64(v) => (planar(&v, channels_in, keep, |x| x as f32), 32),
        _ => {
            return Err(VigilError::file(
                path,
                "unsupported TIFF sample format (32/64-bit or signed integers); \
                 convert it to 8- or 16-bit unsigned or 32-bit float",
            ))
        }
    };
    if data.len() != w * h * keep {
        return Err(truncated(path, Format::Tiff, bytes.len()));
    }
    finish_image(path, w, h, keep, bit_depth, data)
}

/// Loads a mask: any non-zero sample in any colour channel marks the pixel (alpha is ignored).
/// `expected` is `(width, height)`: a mask of another size is an error naming both sizes, unless
/// `resize`, which resamples it with nearest neighbour so it stays binary.
pub fn load_mask(path: &Path, expected: Option<(usize, usize)>, resize: bool) -> Result<Mask> {
    let image = load_image(path)?;
    let n = image.plane_len();
    let data = (0..n).map(|i| (0..image.channels).any(|c| image.channel(c)[i] > 0.0)).collect();
    let mask =
        Mask::new(image.width, image.height, data).map_err(|e| VigilError::file(path, e.to_string()))?;
    match expected {
        Some((w, h)) if (w, h) != (mask.width, mask.height) => {
            if resize {
                Ok(mask.resize_nearest(w, h))
            } else {
                Err(VigilError::file(
                    path,
                    format!(
                        "mask is {}x{} but the image is {w}x{h} (width x height); \
                         give a mask of the image's size or allow resizing",
                        mask.width, mask.height
                    ),
                ))
            }
        }
        _ => Ok(mask),
    }
}

/// Writes a map as a single-channel 32-bit float TIFF with its raw values (no scaling), the
/// format of MVTec-style evaluation tools. Replaces an existing file atomically.
pub fn write_map_tiff(path: &Path, map: &Map) -> Result<()> {
    write_atomic(path, &encode_map_tiff(path, map)?, true)
}

/// The bytes [`write_map_tiff`] writes; `path` is used in messages.
pub fn encode_map_tiff(path: &Path, map: &Map) -> Result<Vec<u8>> {
    let mut bytes = Cursor::new(Vec::new());
    let encode = |bytes: &mut Cursor<Vec<u8>>| -> std::result::Result<(), TiffError> {
        let mut encoder = tiff::encoder::TiffEncoder::new(bytes)?;
        encoder.write_image::<tiff::encoder::colortype::Gray32Float>(
            map.width as u32,
            map.height as u32,
            &map.data,
        )
    };
    encode(&mut bytes).map_err(|e| VigilError::file(path, format!("cannot encode the map as TIFF: {e}")))?;
    Ok(bytes.into_inner())
}

/// Reads a map written by [`write_map_tiff`] (any single-channel float TIFF).
pub fn load_map_tiff(path: &Path) -> Result<Map> {
    let bytes = read_bytes(path)?;
    guard(path, Format::Tiff, || {
        let mut decoder = tiff_decoder(path, &bytes)?;
        let (w, h) = decoder.dimensions().map_err(|e| tiff_error(path, bytes.len(), e))?;
        let color = decoder.colortype().map_err(|e| tiff_error(path, bytes.len(), e))?;
        if !matches!(color, tiff::ColorType::Gray(_)) {
            return Err(VigilError::file(
                path,
                format!("a map file has one channel, this TIFF is {color:?}"),
            ));
        }
        let data = match decoder.read_image().map_err(|e| tiff_error(path, bytes.len(), e))? {
            DecodingResult::F32(v) => v,
            DecodingResult::F64(v) => v.into_iter().map(|x| x as f32).collect(),
            _ => {
                return Err(VigilError::file(
                    path,
                    "not a float map: expected 32- or 64-bit float samples (as written by vigil)",
                ))
            }
        };
        Map::new(w as usize, h as usize, data).map_err(|_| truncated(path, Format::Tiff, bytes.len()))
    })
}

/// Writes a map as a 16-bit grayscale PNG, mapping `lo` to 0 and `hi` to 65535 (values outside
/// are clipped), for viewing and for tools that cannot read float TIFF.
pub fn write_map_png16(path: &Path, map: &Map, lo: f32, hi: f32) -> Result<()> {
    write_atomic(path, &encode_map_png16(path, map, lo, hi)?, true)
}

/// The bytes [`write_map_png16`] writes; `path` is used in messages.
pub fn encode_map_png16(path: &Path, map: &Map, lo: f32, hi: f32) -> Result<Vec<u8>> {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Err(VigilError::file(
            path,
            format!("cannot scale the map to 16 bits: the range [{lo}, {hi}] is empty or not finite"),
        ));
    }
    map.check_finite(&path.display().to_string())?;
    let scale = 65535.0 / (hi as f64 - lo as f64);
    let pixels: Vec<u16> = map
        .data
        .iter()
        .map(|&v| ((v as f64 - lo as f64) * scale).round().clamp(0.0, 65535.0) as u16)
        .collect();
    let buffer =
        image::ImageBuffer::<image::Luma<u16>, _>::from_raw(map.width as u32, map.height as u32, pixels)
            .ok_or_else(|| VigilError::file(path, "map size does not match its data"))?;
    let mut bytes = Cursor::new(Vec::new());
    buffer
        .write_to(&mut bytes, ImageFormat::Png)
        .map_err(|e| VigilError::file(path, format!("cannot encode the map as PNG: {e}")))?;
    Ok(bytes.into_inner())
}

/// The image files directly in `dir` (by extension, case-insensitive), sorted by file name.
/// Names starting with '.' are left out: they are hidden files such as the "._name.png" resource
/// forks macOS leaves on shared drives, which look like images but are not.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Err(VigilError::file(dir, "folder not found; check the path"));
    }
    if !dir.is_dir() {
        return Err(VigilError::file(dir, "is a file, expected a folder of images"));
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| VigilError::io(dir, e))? {
        let path = entry.map_err(|e| VigilError::io(dir, e))?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if !hidden && path.is_file() && has_image_extension(&path) {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(VigilError::file(dir, format!("empty folder: it holds no image files; {SUPPORTED}")));
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The image files in `dir` and in its sub-folders at any depth, sorted by their path relative to
/// `dir`; folders in `exclude` (e.g. a mask folder kept inside the image folder) and hidden entries
/// are left out.
pub fn list_images_recursive(dir: &Path, exclude: &[&Path]) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Err(VigilError::file(dir, "folder not found; check the path"));
    }
    if !dir.is_dir() {
        return Err(VigilError::file(dir, "is a file, expected a folder of images"));
    }
    let excluded: Vec<PathBuf> = exclude.iter().filter_map(|d| d.canonicalize().ok()).collect();
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|e| VigilError::io(&folder, e))? {
            let path = entry.map_err(|e| VigilError::io(&folder, e))?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                if !path.canonicalize().is_ok_and(|c| excluded.contains(&c)) {
                    folders.push(path);
                }
            } else if path.is_file() && has_image_extension(&path) {
                files.push(path);
            }
        }
    }
    if files.is_empty() {
        return Err(VigilError::file(
            dir,
            format!("empty folder: it holds no image files, nor do its sub-folders; {SUPPORTED}"),
        ));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::write_rgb8;
    use vigil_core::ChannelMode;

    fn message(r: Result<impl std::fmt::Debug>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn missing_empty_unsupported_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let e = message(load_image(&p.join("absent.png")));
        assert!(e.contains("absent.png") && e.contains("not found"), "{e}");
        std::fs::write(p.join("empty.png"), b"").unwrap();
        let e = message(load_image(&p.join("empty.png")));
        assert!(e.contains("empty.png") && e.contains("empty (0 bytes)"), "{e}");
        std::fs::write(p.join("anim.gif"), b"GIF89a").unwrap();
        let e = message(load_image(&p.join("anim.gif")));
        assert!(e.contains("anim.gif") && e.contains("unsupported image format '.gif'"), "{e}");
        std::fs::write(p.join("noise.jpg"), [7u8; 300]).unwrap();
        let e = message(load_image(&p.join("noise.jpg")));
        assert!(e.contains("noise.jpg") && e.contains("corrupt JPEG"), "{e}");
        // a valid signature followed by garbage
        let mut bad = b"\x89PNG\r\n\x1a\n".to_vec();
        bad.extend([0xAB; 200]);
        std::fs::write(p.join("garbage.png"), bad).unwrap();
        let e = message(load_image(&p.join("garbage.png")));
        assert!(e.contains("garbage.png") && e.contains("corrupt PNG"), "{e}");
        let e = message(load_image(p));
        assert!(e.contains("is a folder"), "{e}");
    }

    #[test]
    fn truncated_files_are_reported_as_truncated() {
        let dir = tempfile::tempdir().unwrap();
        for (ext, name) in [("png", "PNG"), ("tif", "TIFF"), ("jpg", "JPEG"), ("bmp", "BMP")] {
            let full = dir.path().join(format!("full.{ext}"));
            write_rgb8(&full, 64, 64, 99);
            let bytes = std::fs::read(&full).unwrap();
            let cut = dir.path().join(format!("cut.{ext}"));
            std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
            let e = message(load_image(&cut));
            assert!(
                e.contains(&format!("cut.{ext}")) && e.contains(&format!("truncated {name} file")),
                "{e}"
            );
        }
    }

    #[test]
    fn eight_bit_rgb_and_gray_load_as_level_over_255_per_plane() {
        let dir = tempfile::tempdir().unwrap();
        // every level in every channel, at different places in each
        let rgb = image::RgbImage::from_fn(256, 3, |x, y| {
            image::Rgb([x as u8, (x as u8).wrapping_add(85 * y as u8), 255 - x as u8])
        });
        let path = dir.path().join("rgb.png");
        rgb.save(&path).unwrap();
        let image = load_image(&path).unwrap();
        assert_eq!((image.width, image.height, image.channels, image.bit_depth), (256, 3, 3, 8));
        for c in 0..3 {
            let expected: Vec<f32> = rgb.pixels().map(|p| p.0[c] as f32 / 255.0).collect();
            assert_eq!(image.channel(c), expected.as_slice(), "channel {c}");
        }
        let gray = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([(y * 16 + x) as u8]));
        let path = dir.path().join("gray.png");
        gray.save(&path).unwrap();
        let image = load_image(&path).unwrap();
        assert_eq!(image.channels, 1);
        assert_eq!(image.data, gray.pixels().map(|p| p.0[0] as f32 / 255.0).collect::<Vec<f32>>());
    }

    #[test]
    fn sixteen_bit_png_and_tiff_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let levels: Vec<u16> = vec![0, 1, 2, 255, 256, 32767, 65534, 65535];
        let expected_levels: Vec<f32> = levels.iter().map(|&v| v as f32 / 65535.0).collect();
        let gray = image::ImageBuffer::<image::Luma<u16>, _>::from_raw(4, 2, levels.clone()).unwrap();
        for name in ["g16.png", "g16.tif"] {
            let path = dir.path().join(name);
            gray.save(&path).unwrap();
            let image = load_image(&path).unwrap();
            assert_eq!((image.channels, image.bit_depth), (1, 16), "{name}");
            assert_eq!(image.data, expected_levels, "{name}");
            let back: Vec<u16> = image.data.iter().map(|v| (v * 65535.0).round() as u16).collect();
            assert_eq!(back, levels, "{name}");
        }
        // RGB 16-bit TIFF, written with the tiff crate directly, keeps channel order and values.
        let path = dir.path().join("rgb16.tiff");
        let mut f = std::fs::File::create(&path).unwrap();
        let samples: Vec<u16> = vec![1, 2, 3, 65535, 0, 40000];
        tiff::encoder::TiffEncoder::new(&mut f)
            .unwrap()
            .write_image::<tiff::encoder::colortype::RGB16>(2, 1, &samples)
            .unwrap();
        let image = load_image(&path).unwrap();
        assert_eq!((image.channels, image.bit_depth), (3, 16));
        let big = dir.path().join("big.tif");
        let mut f = std::fs::File::create(&big).unwrap();
        tiff::encoder::TiffEncoder::new_big(&mut f)
            .unwrap()
            .write_image::<tiff::encoder::colortype::Gray16>(4, 2, &levels)
            .unwrap();
        assert_eq!(load_image(&big).unwrap().data, expected_levels);
        assert_eq!(image.channel(0), &[1.0 / 65535.0, 1.0]);
        assert_eq!(image.channel(2), &[3.0 / 65535.0, 40000.0 / 65535.0]);
    }

    #[test]
    fn alpha_is_dropped_and_gray_converts_to_rgb() {
        let dir = tempfile::tempdir().unwrap();
        let rgba = dir.path().join("rgba.png");
        image::RgbaImage::from_pixel(3, 2, image::Rgba([255, 0, 51, 7])).save(&rgba).unwrap();
        let image = load_image(&rgba).unwrap();
        assert_eq!((image.channels, image.bit_depth), (3, 8));
        assert_eq!(image.get(2, 1, 2), 51.0 / 255.0);
        let la = dir.path().join("la.png");
        image::GrayAlphaImage::from_pixel(2, 2, image::LumaA([128, 0])).save(&la).unwrap();
        let gray = load_image(&la).unwrap();
        assert_eq!(gray.channels, 1);
        let rgb = ChannelMode::Rgb.convert(&gray);
        assert_eq!(rgb.channels, 3);
        assert!(rgb.data.iter().all(|&v| v == 128.0 / 255.0));
        for ext in ["bmp", "jpg", "TIF"] {
            let path = dir.path().join(format!("pic.{ext}"));
            write_rgb8(&path, 5, 3, 200);
            let image = load_image(&path).unwrap();
            assert_eq!((image.width, image.height, image.channels), (5, 3, 3), "{ext}");
        }
    }

    #[test]
    fn float_tiff_outside_unit_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("in.tif");
        write_map_tiff(&inside, &Map::new(2, 1, vec![0.0, 0.75]).unwrap()).unwrap();
        let image = load_image(&inside).unwrap();
        assert_eq!((image.data.clone(), image.bit_depth), (vec![0.0, 0.75], 32));
        let outside = dir.path().join("out.tif");
        write_map_tiff(&outside, &Map::new(2, 1, vec![0.0, 3.5]).unwrap()).unwrap();
        let e = message(load_image(&outside));
        assert!(e.contains("out.tif") && e.contains("outside [0, 1]"), "{e}");
    }

    #[test]
    fn masks_threshold_any_channel_and_check_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.png");
        image::RgbImage::from_fn(4, 2, |x, _| image::Rgb(if x == 1 { [0, 0, 1] } else { [0, 0, 0] }))
            .save(&path)
            .unwrap();
        let mask = load_mask(&path, Some((4, 2)), false).unwrap();
        assert_eq!(mask.data, vec![false, true, false, false, false, true, false, false]);
        let e = message(load_mask(&path, Some((8, 4)), false));
        assert!(e.contains("m.png") && e.contains("4x2") && e.contains("8x4"), "{e}");
        let resized = load_mask(&path, Some((8, 4)), true).unwrap();
        assert_eq!((resized.width, resized.height, resized.count()), (8, 4, 8));
        assert!(resized.get(3, 2) && resized.get(0, 3) && !resized.get(0, 4));
    }

    #[test]
    fn map_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let map = Map::new(3, 2, vec![-1.5, 0.0, 1e-7, 3.25, f32::MAX, -0.0]).unwrap();
        let tif = dir.path().join("maps/a.tiff");
        write_map_tiff(&tif, &map).unwrap();
        assert_eq!(load_map_tiff(&tif).unwrap(), map);

        let png = dir.path().join("a.png");
        let small = Map::new(3, 1, vec![-1.0, 0.0, 2.0]).unwrap();
        write_map_png16(&png, &small, -1.0, 1.0).unwrap();
        let back = load_image(&png).unwrap();
        assert_eq!(back.bit_depth, 16);
        assert_eq!(back.data, vec![0.0, 32768.0 / 65535.0, 1.0]);
        assert!(write_map_png16(&png, &small, 1.0, 1.0).is_err());
        let rgb = dir.path().join("rgb.tif");
        write_rgb8(&rgb, 2, 2, 1);
        assert!(message(load_map_tiff(&rgb)).contains("one channel"));
    }

    #[test]
    fn listing_is_sorted_filtered_and_explains_empty_folders() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for name in ["b.PNG", "a.jpg", "c.tiff", "._a.png"] {
            std::fs::write(p.join(name), b"x").unwrap();
        }
        std::fs::write(p.join("notes.txt"), b"x").unwrap();
        let names: Vec<String> =
            list_images(p).unwrap().iter().map(|f| f.file_name().unwrap().to_string_lossy().into()).collect();
        assert_eq!(names, vec!["a.jpg", "b.PNG", "c.tiff"]);
        let empty = p.join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(empty.join("readme.txt"), b"x").unwrap();
        let e = message(list_images(&empty));
        assert!(e.contains("empty") && e.contains("no image files"), "{e}");
        assert!(message(list_images(&p.join("nope"))).contains("folder not found"));
    }

    #[test]
    fn recursive_listing_keeps_sub_folders_in_path_order_and_leaves_out_excluded_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for name in ["b/x.png", "a/y/z.png", "c.png", "masks/c_mask.png", ".hidden/h.png"] {
            std::fs::create_dir_all(p.join(name).parent().unwrap()).unwrap();
            std::fs::write(p.join(name), b"x").unwrap();
        }
        let relative = |files: Vec<PathBuf>| -> Vec<String> {
            files.iter().map(|f| f.strip_prefix(p).unwrap().to_string_lossy().replace('\\', "/")).collect()
        };
        assert_eq!(
            relative(list_images_recursive(p, &[]).unwrap()),
            ["a/y/z.png", "b/x.png", "c.png", "masks/c_mask.png"]
        );
        assert_eq!(
            relative(list_images_recursive(p, &[&p.join("masks")]).unwrap()),
            ["a/y/z.png", "b/x.png", "c.png"]
        );
        let empty = p.join("empty/sub");
        std::fs::create_dir_all(&empty).unwrap();
        let e = message(list_images_recursive(&p.join("empty"), &[]));
        assert!(e.contains("empty folder") && e.contains("sub-folders"), "{e}");
    }
}
