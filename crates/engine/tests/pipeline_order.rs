//! The per-image loop is a pipeline of threads; what the caller receives must not depend on their
//! timing: the events of a plain sequential loop, in input order, errors at their image's turn.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vigil_data::source::BadFilePolicy;
use vigil_engine::run::{process_items, score_items, Event, LoopOptions};
use vigil_engine::{fit, FitOptions, Item, MethodSpec, Model, PipelineOptions};

const SIZE: u32 = 32;

fn write_images(dir: &Path, n: usize, seed: u32) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let path = dir.join(format!("{i:03}.png"));
            image::RgbImage::from_fn(SIZE, SIZE, |x, y| {
                let v = ((x * 7 + y * 13 + (i as u32 + seed) * 31) % 17) as u8 * 6 + 90;
                image::Rgb([v, v.wrapping_add(10), v.wrapping_sub(10)])
            })
            .save(&path)
            .unwrap();
            path
        })
        .collect()
}

fn small_model(dir: &Path) -> Model {
    let train = write_images(&dir.join("train"), 8, 0);
    let spec =
        MethodSpec::parse("acontrario:statistics=training,scales=2,patch_size=7,components=8", &[]).unwrap();
    fit(&spec, train, &PipelineOptions::default(), FitOptions { val_fraction: 0.25, ..Default::default() })
        .unwrap()
}

fn item(path: &Path) -> Item {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    Item { path: path.to_path_buf(), name, label: None, kind: String::new(), mask: None }
}

/// What the caller of the loop saw, one entry per event: the image's name and its map, or "skipped".
type Seen = Vec<(String, Option<Vec<f32>>)>;

/// Runs the loop on `threads` rayon threads (one worker per thread), with `prepare` slowest on
/// the earliest images so that workers finish out of input order.
fn run(
    model: &Model,
    items: &[Item],
    threads: usize,
    fail_prepare_at: Option<&str>,
) -> (Seen, Result<usize, String>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut seen = Seen::new();
        let result = process_items(
            model.detector.as_ref(),
            &model.pipeline,
            items,
            LoopOptions::default(),
            "test",
            |s| {
                let index = items.iter().position(|i| i.path == s.item.path).unwrap();
                std::thread::sleep(Duration::from_millis(3 * (items.len() - index) as u64));
                if fail_prepare_at == Some(s.item.name.as_str()) {
                    anyhow::bail!("cannot write the outputs of {}", s.item.name);
                }
                Ok((s.item.name.clone(), s.scored.map.data))
            },
            |event| {
                seen.push(match event {
                    Event::Scored((name, map)) => (name, Some(map)),
                    Event::Skipped(k) => (k.path.file_stem().unwrap().to_string_lossy().into_owned(), None),
                });
                Ok(())
            },
        );
        (seen, result.map(|skipped| skipped.len()).map_err(|e| format!("{e:#}")))
    })
}

#[test]
fn events_come_in_input_order_whatever_the_number_of_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let mut model = small_model(tmp.path());
    let paths = write_images(&tmp.path().join("test"), 10, 50);
    std::fs::write(&paths[4], b"not a png").unwrap();
    let items: Vec<Item> = paths.iter().map(|p| item(p)).collect();

    // The reference: a plain loop, one image after the other.
    let expected: Seen = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let name = format!("{i:03}");
            match vigil_data::io::load_image(p) {
                Ok(image) => (name, Some(model.score(&image, "reference").unwrap().map.data)),
                Err(_) => (name, None),
            }
        })
        .collect();
    assert_eq!(expected[4].1, None);

    model.pipeline.policy = BadFilePolicy::Skip;
    for threads in [1, 2, 4] {
        let (seen, result) = run(&model, &items, threads, None);
        assert_eq!(result, Ok(1), "{threads} threads: one file skipped");
        assert_eq!(seen, expected, "{threads} threads");
    }

    // Without --skip-bad the bad file stops the run, naming it, after every earlier image was
    // handed over and none of the later ones.
    model.pipeline.policy = BadFilePolicy::Stop;
    for threads in [1, 4] {
        let (seen, result) = run(&model, &items, threads, None);
        let err = result.unwrap_err();
        assert!(err.contains("004.png"), "{err}");
        assert_eq!(seen, expected[..4], "{threads} threads");
    }

    // An error of the prepare step is returned at its image's turn too.
    model.pipeline.policy = BadFilePolicy::Skip;
    for threads in [1, 4] {
        let (seen, result) = run(&model, &items, threads, Some("006"));
        assert!(result.unwrap_err().contains("outputs of 006"));
        assert_eq!(seen, expected[..6], "{threads} threads");
    }

    // score_items hands over the scored images themselves, in the same order.
    let mut names = Vec::new();
    score_items(model.detector.as_ref(), &model.pipeline, &items, LoopOptions::default(), "test", |event| {
        if let Event::Scored(s) = event {
            names.push(s.item.name.clone());
        }
        Ok(())
    })
    .unwrap();
    let scored: Vec<String> = expected.iter().filter(|(_, m)| m.is_some()).map(|(n, _)| n.clone()).collect();
    assert_eq!(names, scored);
}
