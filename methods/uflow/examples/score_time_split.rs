//! Splits U-Flow's scoring time per image into the flow part (backbone, flow and anomaly map) and
//! the max-tree NFA segmentation, over the test images of one MVTec-layout class after fitting on
//! its train/good. Timing only: the quality figures come from `vigil benchmark -m uflow`.
//!
//! cargo run --release -p vigil-uflow --example score_time_split -- <class dir> ['<settings JSON>']

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vigil_core::{Detector, FitContext, InMemorySource, Result, VigilError};
use vigil_data::io::{list_images, list_images_recursive, load_image};
use vigil_uflow::{UflowDetector, UflowSettings};

fn run(class: &Path, settings: UflowSettings) -> Result<()> {
    let train = list_images(&class.join("train/good"))?
        .iter()
        .map(|p| Ok(load_image(p)?.to_rgb()))
        .collect::<Result<Vec<_>>>()?;
    let mut detector = UflowDetector::new(settings);
    let start = Instant::now();
    detector.fit(
        &InMemorySource::new(train),
        &FitContext { seed: 0, checkpoint_dir: None, show_progress: false },
    )?;
    println!("fit: {:.1} s", start.elapsed().as_secs_f64());

    let test = list_images_recursive(&class.join("test"), &[])?;
    let (mut flow, mut nfa) = (Duration::ZERO, Duration::ZERO);
    for path in &test {
        let (_, timing) = detector.score_timed(&load_image(path)?.to_rgb(), None)?;
        flow += timing.flow;
        nfa += timing.nfa;
    }
    let per_image_ms = |d: Duration| d.as_secs_f64() * 1e3 / test.len() as f64;
    println!(
        "scoring per image: flow {:.2} ms (backbone + flow + map), NFA {:.3} ms, over {} images",
        per_image_ms(flow),
        per_image_ms(nfa),
        test.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(class) = args.get(1) else {
        eprintln!("usage: score_time_split <class dir> ['<settings JSON>']");
        return ExitCode::FAILURE;
    };
    let settings = match args.get(2) {
        None => Ok(UflowSettings::default()),
        Some(json) => serde_json::from_str::<UflowSettings>(json)
            .map_err(|e| VigilError::Config(format!("settings: {e}"))),
    };
    match settings.and_then(|s| run(Path::new(class), s)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
