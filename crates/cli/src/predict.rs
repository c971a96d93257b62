//! `vigil predict`: score new images; write maps, overlays, predicted masks, scores.csv and scores.json.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use vigil_engine::batch::{list_inputs, Shard};
use vigil_engine::model::LoadOptions;
use vigil_engine::outputs::{
    collect_inputs, decision_threshold, prepare_output, MapFormat, ScoreTables, PREDICT_FILES,
    PREDICT_FOLDERS,
};
use vigil_engine::run::{process_items, Event, LoopOptions, ScoredItem};
use vigil_engine::Model;

use crate::args::PredictArgs;
use crate::options;

pub fn predict_command(args: PredictArgs) -> Result<()> {
    let config = args.config.clone();
    let args: PredictArgs = crate::config::merge_with_file(args, config.as_deref())?;
    let model_path = args.model.as_deref().ok_or_else(|| anyhow!("--model <file> is required"))?;
    let out = args.out.clone().ok_or_else(|| anyhow!("--out <folder> is required"))?;
    let format: MapFormat = args.map_format.as_deref().unwrap_or("tiff").parse()?;
    let pipeline = options::pipeline(&args.pipeline)?;
    let shard: Option<Shard> = args.shard.as_deref().map(str::parse).transpose()?;
    if args.resume && args.overwrite {
        bail!("--resume continues the run in --out and --overwrite starts it again: give one of them");
    }
    let items = match &args.list {
        Some(_) if !args.inputs.is_empty() => {
            bail!("give the images either on the command line or with --list, not both")
        }
        Some(list) => list_inputs(list)?,
        None => collect_inputs(&args.inputs, &options::filter(&args.pipeline, true))?,
    };
    // Shards are cut from the whole list, so every shard names its files as the whole run would.
    let items = match shard {
        Some(shard) => shard.select(items),
        None => items,
    };
    if !args.resume {
        prepare_output(&out, &PREDICT_FILES, &PREDICT_FOLDERS, args.overwrite)?;
    }
    let model =
        Model::load(model_path, &LoadOptions { pipeline, allow_other_weights: args.allow_other_weights })?;
    let (mut tables, done) = if args.resume {
        ScoreTables::resume(&out, model_path, &model)?
    } else {
        (ScoreTables::create(&out, model_path, &model)?, HashSet::new())
    };
    let items: Vec<_> = items.into_iter().filter(|i| !done.contains(&i.path)).collect();
    let det = model.detector.as_ref();
    // Each image's files are written by the loop's workers, several at a time; the table rows
    // follow in input order.
    let write = |s: ScoredItem<'_>| write_image_outputs(&model, &out, format, s);
    process_items(
        det,
        &model.pipeline,
        &items,
        LoopOptions::default(),
        "predict",
        write,
        |event| match event {
            Event::Skipped(skipped) => tables.skipped(skipped),
            Event::Scored(row) => tables.scored(
                &row.path,
                row.score,
                row.decided,
                row.verdict,
                row.threshold,
                row.size,
                row.anomalous_pixels,
                [&row.map, &row.overlay, &row.mask],
            ),
        },
    )?;
    let (scored, flagged, resumed) = (tables.scored, tables.flagged, tables.resumed);
    tables.finish()?;
    let earlier =
        if args.resume { format!(" ({resumed} of them scored by an earlier run)") } else { String::new() };
    println!("scored {scored} image(s){earlier}, {flagged} anomalous -> {}", out.display());
    Ok(())
}

/// What one image's row of the score tables says, once its files are written.
struct Row {
    path: PathBuf,
    score: f32,
    decided: f64,
    verdict: bool,
    threshold: f64,
    size: (usize, usize),
    anomalous_pixels: usize,
    map: PathBuf,
    overlay: PathBuf,
    mask: PathBuf,
}

/// Writes the map, the overlay and the predicted mask of one scored image.
fn write_image_outputs(model: &Model, out: &Path, format: MapFormat, s: ScoredItem<'_>) -> Result<Row> {
    let predicted = model.pixel_verdicts(&s.scored);
    let name = &s.item.name;
    let map = &s.scored.map;
    let map_path = match format {
        MapFormat::Png16 => {
            let p = out.join("maps").join(format!("{name}.png"));
            create_parent(&p)?;
            vigil_data::io::write_map_png16(&p, map, map.min(), map.max())?;
            p
        }
        MapFormat::Tiff => {
            let p = out.join("maps").join(format!("{name}.tiff"));
            create_parent(&p)?;
            vigil_data::io::write_map_tiff(&p, map)?;
            p
        }
    };
    let overlay_path = out.join("overlays").join(format!("{name}.png"));
    let overlay = vigil_engine::report::full_overlay(&s.image, map, &model.pixel_threshold, &predicted)?;
    vigil_core::model_file::write_atomic(&overlay_path, &overlay, true)?;
    let mask_path = out.join("masks").join(format!("{name}.png"));
    vigil_engine::report::write_mask_png(&mask_path, &predicted)?;
    Ok(Row {
        path: s.item.path.clone(),
        score: s.scored.image_score,
        decided: model.decided_value(&s.scored),
        verdict: model.image_verdict(&s.scored),
        // The value the decided quantity is compared with (for NFA thresholds, a log10 NFA level).
        threshold: decision_threshold(model),
        size: (map.width, map.height),
        anomalous_pixels: predicted.count(),
        map: map_path,
        overlay: overlay_path,
        mask: mask_path,
    })
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    Ok(())
}
