//! Times the large-image path: decode a 16-bit gray scan, cut it into tiles, stitch the tile maps.
//! Run: cargo run --release -p vigil-engine --example tiling_bench -- [side] [tile] [overlap]

use std::time::Instant;

use vigil_core::{Map, ScoreOutput};
use vigil_data::load_image;
use vigil_engine::tiling::{score_tiled, TileGrid};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let side = args.first().copied().unwrap_or(4096);
    let tile = args.get(1).copied().unwrap_or(512);
    let overlap = args.get(2).copied().unwrap_or(64);

    let dir = tempfile::tempdir()?;
    let scan = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(side as u32, side as u32, |x, y| {
        image::Luma([((x * 7 + y * 13) % 65536) as u16])
    });
    for ext in ["png", "tif"] {
        let path = dir.path().join(format!("scan.{ext}"));
        scan.save(&path)?;
        let start = Instant::now();
        let image = load_image(&path)?;
        println!(
            "decode {side}x{side} 16-bit {ext}: {:.3} s ({} MB on disk)",
            start.elapsed().as_secs_f64(),
            std::fs::metadata(&path)?.len() >> 20
        );
        if ext == "tif" {
            let grid = TileGrid::new(side, side, tile, overlap)?;
            let start = Instant::now();
            let out = score_tiled(&image, None, tile, overlap, |t, _| {
                Ok(ScoreOutput::from_map(Map::new(t.width, t.height, t.channel(0).to_vec())?))
            })?;
            println!(
                "tile {tile} overlap {overlap}: {} tiles, crop + stitch {:.3} s, identical: {}",
                grid.len(),
                start.elapsed().as_secs_f64(),
                out.map.data == image.data
            );
        }
    }
    Ok(())
}
