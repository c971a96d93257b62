//! Registers an image to a reference view (ORB + RANSAC homography) and writes the aligned image.
//! Run: cargo run --release -p vigil-data --example register -- ref.png img.png out.png
//! Or, to make a test pair with a known camera nudge (4°, shift, slight tilt):
//!      cargo run --release -p vigil-data --example register -- --nudge ref.png img.png

use std::path::Path;
use std::time::Instant;

use vigil_core::Image;
use vigil_data::load_image;
use vigil_register::{warp_perspective, Homography, Registration, RegistrationSettings};

fn save(image: &Image, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let (w, h, n) = (image.width, image.height, image.plane_len());
    let byte = |c: usize, i: usize| (image.data[c * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
    if image.channels == 1 {
        image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
            image::Luma([byte(0, y as usize * w + x as usize)])
        })
        .save(path)?;
    } else {
        image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let i = y as usize * w + x as usize;
            image::Rgb([byte(0, i), byte(1, i), byte(2, i)])
        })
        .save(path)?;
    }
    Ok(())
}

fn mul3(a: &[f64; 9], b: &[f64; 9]) -> [f64; 9] {
    std::array::from_fn(|i| (0..3).map(|k| a[i / 3 * 3 + k] * b[k * 3 + i % 3]).sum())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--nudge", reference, out] => {
            let image = load_image(Path::new(reference))?;
            let (cx, cy) = ((image.width - 1) as f64 / 2.0, (image.height - 1) as f64 / 2.0);
            let (sin, cos) = 4f64.to_radians().sin_cos();
            // About the centre: a 4° rotation, a (7, -5) px shift and a slight perspective tilt.
            let nudge = [cos, -sin, 7.0, sin, cos, -5.0, 2e-5, -1.5e-5, 1.0];
            let h_nudge = mul3(
                &mul3(&[1.0, 0.0, cx, 0.0, 1.0, cy, 0.0, 0.0, 1.0], &nudge),
                &[1.0, 0.0, -cx, 0.0, 1.0, -cy, 0.0, 0.0, 1.0],
            );
            let (moved, _) = warp_perspective(&image, &Homography(h_nudge), image.width, image.height)?;
            save(&moved, Path::new(out))?;
            println!("wrote {out}: {reference} seen by a nudged camera, homography {h_nudge:?}");
        }
        [reference, image, out] => {
            let (reference, image) = (load_image(Path::new(reference))?, Path::new(image));
            let start = Instant::now();
            let registration = Registration::new(&reference, RegistrationSettings::default())?;
            let prepared = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let registered = registration.register_file(image)?;
            let aligned = start.elapsed().as_secs_f64();
            save(&registered.image, Path::new(out))?;
            println!(
                "reference {}x{}: {} keypoints in {:.3} s",
                reference.width,
                reference.height,
                registration.reference_keypoints().len(),
                prepared
            );
            println!(
                "{}: {} inliers of {} matches ({:.0}%), {:.1}% of the output seen; load + register + warp {:.3} s",
                image.display(),
                registered.inliers,
                registered.matches,
                100.0 * registered.inlier_ratio(),
                100.0 * registered.valid.count() as f64 / registered.valid.data.len() as f64,
                aligned
            );
            println!("homography (image -> reference): {:?}", registered.homography);
        }
        _ => return Err("usage: register REF.png IMG.png OUT.png | register --nudge REF.png OUT.png".into()),
    }
    Ok(())
}
