//! Overlays and a report built from real PIPED paper images: the outline follows the real
//! ground-truth boundary, and textured thumbnails keep the page small.

use std::path::Path;

use vigil_core::shared_data::shared_path;
use vigil_core::{Image, Map, Mask};
use vigil_report::{
    outline, overlay, render_html, ItemPictures, ReportData, ReportItem, LARGE_VIEW_MAX_SIDE, OUTLINE_COLOUR,
};

const CLASS: &str = "PA_BFT01_TL";
const ITEMS: usize = 12;

fn load(path: &Path) -> (Image, image::GrayImage) {
    let rgb = image::open(path).unwrap().to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in rgb.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = p.0[c] as f32 / 255.0;
        }
    }
    (Image::new(w, h, 3, data).unwrap(), image::open(path).unwrap().to_luma8())
}

#[test]
fn real_overlays_outline_the_ground_truth_and_the_report_stays_small() {
    let Some(dir) = shared_path(&format!("data/piped/{CLASS}")) else { return };
    let mut stems: Vec<String> = std::fs::read_dir(dir.join("test/impurity"))
        .unwrap()
        .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().to_string())
        .collect();
    stems.sort();
    let mut items = Vec::new();
    for stem in stems.iter().take(ITEMS) {
        let (image, gray) = load(&dir.join("test/impurity").join(format!("{stem}.png")));
        let gt_img = image::open(dir.join("ground_truth/impurity").join(format!("{stem}_mask.png")))
            .unwrap()
            .to_luma8();
        let mask =
            Mask::new(image.width, image.height, gt_img.pixels().map(|p| p.0[0] > 127).collect()).unwrap();
        // darkness as a stand-in anomaly map: impurities are dark specks on paper
        let map =
            Map::new(image.width, image.height, gray.pixels().map(|p| 1.0 - p.0[0] as f32 / 255.0).collect())
                .unwrap();
        let out = overlay(&image, &map, 0.0, 1.0, Some(&mask), 0.4);
        assert_eq!(out.dimensions(), (image.width as u32, image.height as u32));
        let edge = outline(&mask);
        assert!(edge.count() > 0 && edge.count() <= mask.count());
        for (i, p) in out.pixels().enumerate() {
            assert_eq!(p.0 == OUTLINE_COLOUR, edge.data[i], "{stem}: pixel {i}");
        }
        items.push(ReportItem {
            name: stem.clone(),
            score: map.max() as f64,
            label: Some(true),
            verdict: true,
            pictures: ItemPictures::render(&image, &map, (0.0, 1.0), &mask, Some(&mask)).unwrap(),
            detail: None,
        });
    }
    let html = render_html(&ReportData { title: "PIPED".into(), items, ..ReportData::default() }).unwrap();
    // original, heatmap and overlay, each as a thumbnail and a larger view
    assert_eq!(html.matches("<img").count(), 6 * ITEMS);
    // every picture within the bound; these 128x128 images are embedded at their own size
    let long_side = |tag: &str| -> u32 {
        let attr = |name: &str| -> u32 {
            tag.split(&format!("{name}=\"")).nth(1).unwrap().split('"').next().unwrap().parse().unwrap()
        };
        attr("width").max(attr("height"))
    };
    let sides: Vec<u32> = html.split("<img ").skip(1).map(long_side).collect();
    assert!(sides.iter().all(|&s| s <= LARGE_VIEW_MAX_SIDE.min(128)), "{sides:?}");
    // a few hundred images must stay within a few tens of megabytes
    let per_item = html.len() / ITEMS;
    eprintln!("{per_item} bytes per item");
    assert!(per_item < 250_000, "{per_item} bytes per item");
}
