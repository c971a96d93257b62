//! `vigil predict`: score new images; write maps, overlays, predicted masks, scores.csv and scores.json.

use anyhow::{anyhow, Result};
use vigil_engine::model::LoadOptions;
use vigil_engine::outputs::{
    collect_inputs, prepare_output, MapFormat, ScoreTables, PREDICT_FILES, PREDICT_FOLDERS,
};
use vigil_engine::run::{score_items, Event, LoopOptions};
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
    let items = collect_inputs(&args.inputs, &options::filter(&args.pipeline, true))?;
    prepare_output(&out, &PREDICT_FILES, &PREDICT_FOLDERS, args.overwrite)?;
    let model =
        Model::load(model_path, &LoadOptions { pipeline, allow_other_weights: args.allow_other_weights })?;
    let mut tables = ScoreTables::create(&out, model_path, &model)?;
    let det = model.detector.as_ref();
    score_items(det, &model.pipeline, &items, LoopOptions::default(), "predict", |event| {
        let s = match event {
            Event::Skipped(skipped) => return tables.skipped(skipped),
            Event::Scored(s) => s,
        };
        let predicted = model.pixel_verdicts(&s.scored);
        let verdict = model.image_verdict(&s.scored);
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
        tables.scored(
            &s.item.path,
            s.scored.image_score,
            model.decided_value(&s.scored),
            verdict,
            // The value the decided quantity is compared with (for NFA thresholds, a log10 NFA level).
            model.image_threshold.log10_nfa_level().unwrap_or(model.image_threshold.value),
            (map.width, map.height),
            predicted.count(),
            [&map_path, &overlay_path, &mask_path],
        )
    })?;
    let (scored, flagged) = (tables.scored, tables.flagged);
    tables.finish()?;
    println!("scored {scored} image(s), {flagged} anomalous -> {}", out.display());
    Ok(())
}

fn create_parent(path: &std::path::Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    Ok(())
}
