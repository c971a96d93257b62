//! The service over real HTTP on loopback: answers, every error case, overload, reload and a
//! graceful stop.

mod common;

use std::time::Duration;

use common::*;
use vigil_engine::model::LoadOptions;
use vigil_engine::Model;

fn url(server: &vigil_serve::Running, path: &str) -> String {
    format!("http://{}{path}", server.addr)
}

#[test]
fn scores_an_image_as_the_engine_does_from_its_file() {
    let f = fixture();
    let server = vigil_serve::start(options(&[("demo", &f.model)])).unwrap();
    let model = Model::load(&f.model, &LoadOptions::default()).unwrap();
    for (kind, index) in [("impurity", 0), ("good", 0), ("impurity", 5)] {
        let path = demo_image(kind, index);
        let a = post(&url(&server, "/v1/models/demo/score?name=x.png"), &read(&path));
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let j = a.json();
        // The engine on the file as `vigil predict` loads it.
        let p = model.predict(&vigil_data::io::load_image(&path).unwrap(), "x.png").unwrap();
        assert_eq!(j["score"].as_f64().unwrap() as f32, p.scored.image_score);
        assert_eq!(j["decided_value"].as_f64().unwrap(), p.decided);
        assert_eq!(j["anomalous"], p.verdict);
        assert_eq!(j["verdict"], if p.verdict { "anomalous" } else { "normal" });
        assert_eq!(j["threshold"].as_f64().unwrap(), p.threshold);
        assert_eq!(j["anomalous_pixels"], p.predicted.count());
        assert_eq!(j["model"], "demo");
        assert_eq!(j["method"], "acontrario");
        assert_eq!(j["image"], "x.png");
        assert_eq!((j["width"].as_u64(), j["height"].as_u64()), (Some(128), Some(128)));
        assert_eq!(j["image_threshold"]["kind"]["kind"], "nfa");
        assert_eq!(j["pixel_threshold"]["level"], "pixel");
        let boxed: u64 = j["boxes"].as_array().unwrap().iter().map(|b| b["pixels"].as_u64().unwrap()).sum();
        assert_eq!(boxed as usize, p.predicted.count(), "the boxes cover every flagged pixel");
        for key in ["queue", "decode", "score", "total"] {
            assert!(j["timing_ms"][key].as_f64().unwrap() >= 0.0);
        }
    }
    // The first impurity image is flagged, with its defect boxed.
    let j = post(&url(&server, "/v1/models/demo/score"), &read(&demo_image("impurity", 0))).json();
    assert_eq!(j["verdict"], "anomalous");
    assert!(j["regions"].as_u64().unwrap() >= 1);
    server.stop().unwrap();
}

#[test]
fn maps_and_overlays_are_the_engines() {
    let f = fixture();
    let server = vigil_serve::start(options(&[("demo", &f.model)])).unwrap();
    let path = demo_image("impurity", 1);
    let model = Model::load(&f.model, &LoadOptions::default()).unwrap();
    let image = vigil_data::io::load_image(&path).unwrap();
    let p = model.predict(&image, "x").unwrap();
    let map = &p.scored.map;

    let tiff = post(&url(&server, "/v1/models/demo/score?map=tiff"), &read(&path));
    assert_eq!((tiff.status, tiff.content_type.as_deref()), (200, Some("image/tiff")));
    let written = f.root.join("map.tiff");
    std::fs::write(&written, &tiff.body).unwrap();
    let served = vigil_data::io::load_map_tiff(&written).unwrap();
    assert_eq!((served.width, served.height), (map.width, map.height));
    assert!(served.data.iter().zip(&map.data).all(|(a, b)| a.to_bits() == b.to_bits()));

    let png16 = post(&url(&server, "/v1/models/demo/score?map=png16"), &read(&path));
    assert_eq!(png16.status, 200);
    let expected = vigil_data::io::encode_map_png16(&written, map, map.min(), map.max()).unwrap();
    assert_eq!(png16.body, expected);

    let overlay = post(&url(&server, "/v1/models/demo/score?overlay=png"), &read(&path));
    assert_eq!((overlay.status, overlay.content_type.as_deref()), (200, Some("image/png")));
    let expected =
        vigil_engine::report::full_overlay(&image, map, &model.pixel_threshold, &p.predicted).unwrap();
    assert_eq!(overlay.body, expected);

    let j = post(&url(&server, "/v1/models/demo/score?pictures=true"), &read(&path)).json();
    for key in ["overlay_png", "heatmap_png"] {
        assert!(j["pictures"][key].as_str().unwrap().len() > 100, "{key}");
    }
    assert!(j["pictures"]["heatmap_low"].as_f64().unwrap() < j["pictures"]["heatmap_high"].as_f64().unwrap());
    server.stop().unwrap();
}

#[test]
fn a_multipart_batch_scores_each_part_in_order() {
    let f = fixture();
    let server = vigil_serve::start(options(&[("demo", &f.model)])).unwrap();
    let (a, b) = (read(&demo_image("impurity", 0)), read(&demo_image("good", 0)));
    let batch = post_multipart(&url(&server, "/v1/models/demo/score"), &[("a.png", &a), ("b.png", &b)]);
    assert_eq!(batch.status, 200, "{}", String::from_utf8_lossy(&batch.body));
    let j = batch.json();
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0]["image"].as_str(), images[1]["image"].as_str()), (Some("a.png"), Some("b.png")));
    for (one, bytes) in images.iter().zip([&a, &b]) {
        let alone = post(&url(&server, "/v1/models/demo/score"), bytes).json();
        assert_eq!(one["score"], alone["score"]);
        assert_eq!(one["verdict"], alone["verdict"]);
    }
    // A bad part is refused by name; a batch answers JSON only.
    let bad = post_multipart(
        &url(&server, "/v1/models/demo/score"),
        &[("a.png", &a), ("broken.png", b"not an image")],
    );
    assert_eq!(bad.status, 422);
    assert!(bad.error().contains("broken.png"), "{}", bad.error());
    let maps =
        post_multipart(&url(&server, "/v1/models/demo/score?map=tiff"), &[("a.png", &a), ("b.png", &b)]);
    assert_eq!(maps.status, 400);
    assert!(maps.error().contains("JSON only"));
    let empty = post_multipart(&url(&server, "/v1/models/demo/score"), &[]);
    assert_eq!(empty.status, 400);
    assert!(empty.error().contains("no part"));
    server.stop().unwrap();
}

#[test]
fn bad_requests_get_json_errors_naming_the_problem() {
    let f = fixture();
    let mut opts = options(&[("demo", &f.model), ("masked", &f.masked)]);
    opts.body_limit = 200_000;
    let server = vigil_serve::start(opts).unwrap();
    let score = url(&server, "/v1/models/demo/score");
    let good = read(&demo_image("good", 0));

    let corrupt = post(&format!("{score}?name=scan.png"), b"\x89PNG\r\n\x1a\n this is no image");
    assert_eq!(corrupt.status, 422);
    assert!(corrupt.error().contains("scan.png") && corrupt.error().contains("PNG"), "{}", corrupt.error());

    let truncated = post(&score, &good[..good.len() / 2]);
    assert_eq!(truncated.status, 422);
    assert!(
        truncated.error().contains("truncated") || truncated.error().contains("corrupt"),
        "{}",
        truncated.error()
    );

    let text = post(&score, b"hello");
    assert_eq!(text.status, 422);
    assert!(text.error().contains("not an image"), "{}", text.error());

    let empty = post(&score, b"");
    assert_eq!(empty.status, 400);
    assert!(empty.error().contains("empty"));

    let unknown = post(&url(&server, "/v1/models/nope/score"), &good);
    assert_eq!(unknown.status, 404);
    assert!(unknown.error().contains("unknown model 'nope'") && unknown.error().contains("demo, masked"));

    // A model with an ignore mask scores only images of the mask's size.
    let small = {
        let img = image::open(demo_image("good", 0)).unwrap().resize_exact(64, 64, image::imageops::Nearest);
        let mut bytes = std::io::Cursor::new(Vec::new());
        img.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    };
    let wrong_size = post(&url(&server, "/v1/models/masked/score"), &small);
    assert_eq!(wrong_size.status, 422);
    assert!(
        wrong_size.error().contains("64x64") && wrong_size.error().contains("128x128"),
        "{}",
        wrong_size.error()
    );
    assert_eq!(post(&url(&server, "/v1/models/masked/score"), &good).status, 200);

    let large = post(&score, &vec![0u8; 300_000]);
    assert_eq!(large.status, 413);
    assert!(large.error().contains("200000 bytes"), "{}", large.error());

    for (query, needle) in [
        ("?map=jpeg", "png16 or tiff"),
        ("?overlay=svg", "png"),
        ("?map=tiff&overlay=png", "not both"),
        ("?size=3", "unknown query parameter 'size'"),
        ("?pictures=maybe", "true or false"),
    ] {
        let a = post(&format!("{score}{query}"), &good);
        assert_eq!(a.status, 400, "{query}");
        assert!(a.error().contains(needle), "{query}: {}", a.error());
    }

    let wrong_method = request("GET", &score);
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.error().contains("use POST"));
    let no_route = request("GET", &url(&server, "/v2/anything"));
    assert_eq!(no_route.status, 404);
    assert!(no_route.error().contains("/v2/anything"));
    let reload_unknown = post(&url(&server, "/v1/models/nope/reload"), b"");
    assert_eq!(reload_unknown.status, 404);

    // None of that hurt the service.
    assert_eq!(post(&score, &good).status, 200);
    let metrics = String::from_utf8(get(&url(&server, "/metrics")).body).unwrap();
    assert!(metrics.contains("vigil_requests_total{route=\"/v1/models/{name}/score\",status=\"422\"}"));
    assert!(metrics.contains("vigil_requests_total{route=\"/v1/models/{name}/score\",status=\"413\"} 1"));
    server.stop().unwrap();
}

#[test]
fn overload_is_answered_503_with_retry_after_and_the_rest_succeed() {
    let f = fixture();
    let mut opts = options(&[("demo", &f.model)]);
    opts.workers = 1;
    opts.queue = 1;
    let server = vigil_serve::start(opts).unwrap();
    let score = url(&server, "/v1/models/demo/score");
    // Large enough that the first request is still being scored when the others arrive.
    let slow = enlarged_png(&demo_image("impurity", 0), 6);
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(|| post(&score, &slow))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let busy: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
    assert_eq!(ok + busy.len(), 8, "only 200 and 503: {statuses:?}");
    // All eight arrive while the first is scored: one is scored, one waits, the rest are refused.
    assert!((1..=2).contains(&ok), "one worker and one queued place: {statuses:?}");
    assert!(!busy.is_empty(), "{statuses:?}");
    for b in &busy {
        assert_eq!(b.retry_after.as_deref(), Some("1"));
        assert!(b.error().contains("busy"), "{}", b.error());
    }
    let metrics = String::from_utf8(get(&url(&server, "/metrics")).body).unwrap();
    assert!(
        metrics.contains(&format!("vigil_errors_total{{class=\"overload\"}} {}", busy.len())),
        "{metrics}"
    );
    assert!(metrics.contains("vigil_queue_depth 0"));
    assert_eq!(post(&score, &read(&demo_image("good", 0))).status, 200, "the service recovers");
    server.stop().unwrap();
}

#[test]
fn a_request_past_its_deadline_is_answered_503() {
    let f = fixture();
    let mut opts = options(&[("demo", &f.model)]);
    opts.timeout = Duration::from_millis(30);
    let server = vigil_serve::start(opts).unwrap();
    let a = post(&url(&server, "/v1/models/demo/score"), &enlarged_png(&demo_image("impurity", 0), 6));
    assert_eq!(a.status, 503);
    assert!(a.error().contains("timeout"), "{}", a.error());
    assert_eq!(a.retry_after.as_deref(), Some("1"));
    server.stop().unwrap();
}

#[test]
fn models_health_metrics_and_page() {
    let f = fixture();
    let server = vigil_serve::start(options(&[("demo", &f.model)])).unwrap();
    let models = get(&url(&server, "/v1/models")).json();
    let m = &models["models"][0];
    assert_eq!(m["name"], "demo");
    assert_eq!(m["method"], "acontrario");
    assert_eq!(m["file_sha256"], vigil_core::fingerprint::sha256_file(&f.model).unwrap());
    for key in ["settings", "pipeline", "image_threshold", "pixel_threshold", "fit", "weights"] {
        assert!(!m[key].is_null(), "{key}");
    }
    assert!(m["fit"]["train_images"].is_number(), "fit counts: {}", m["fit"]);
    let health = get(&url(&server, "/healthz")).json();
    assert_eq!(health["status"], "ok");
    let metrics = get(&url(&server, "/metrics"));
    assert!(metrics.content_type.unwrap().starts_with("text/plain"));
    let text = String::from_utf8(metrics.body).unwrap();
    for name in [
        "vigil_requests_total",
        "vigil_request_duration_seconds_bucket",
        "vigil_errors_total",
        "vigil_queue_depth",
    ] {
        assert!(text.contains(name), "{name}");
    }
    let page = get(&url(&server, "/"));
    assert!(page.content_type.unwrap().starts_with("text/html"));
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<html lang=\"en\">") && html.contains("id=\"files\""));
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "no external resources"
    );
    let scale = get(&url(&server, "/colour-scale.png"));
    assert_eq!(scale.content_type.as_deref(), Some("image/png"));
    server.stop().unwrap();
}

#[test]
fn reload_swaps_the_model_whole_or_keeps_the_old_one() {
    let f = fixture();
    let path = f.root.join("reloaded.vigil");
    std::fs::copy(&f.model, &path).unwrap();
    let server = vigil_serve::start(options(&[("demo", &path)])).unwrap();
    let image = read(&demo_image("impurity", 0));
    let before = post(&url(&server, "/v1/models/demo/score"), &image).json();

    // A damaged file is refused and the model in service stays.
    std::fs::write(&path, b"not a model").unwrap();
    let failed = post(&url(&server, "/v1/models/demo/reload"), b"");
    assert_eq!(failed.status, 500);
    assert!(
        failed.error().contains("reloaded.vigil") && failed.error().contains("kept"),
        "{}",
        failed.error()
    );
    assert_eq!(post(&url(&server, "/v1/models/demo/score"), &image).json()["score"], before["score"]);

    // Another model file (with an ignore mask) is put in service whole.
    std::fs::copy(&f.masked, &path).unwrap();
    let reloaded = post(&url(&server, "/v1/models/demo/reload"), b"");
    assert_eq!(reloaded.status, 200, "{}", String::from_utf8_lossy(&reloaded.body));
    let sha = vigil_core::fingerprint::sha256_file(&f.masked).unwrap();
    assert_eq!(get(&url(&server, "/v1/models")).json()["models"][0]["file_sha256"], sha);
    let small = enlarged_png(&demo_image("good", 0), 2);
    assert_eq!(post(&url(&server, "/v1/models/demo/score"), &small).status, 422, "the mask now applies");
    server.stop().unwrap();
}

#[test]
fn stopping_lets_the_request_in_flight_finish() {
    let f = fixture();
    let server = vigil_serve::start(options(&[("demo", &f.model)])).unwrap();
    let score = url(&server, "/v1/models/demo/score");
    let slow = enlarged_png(&demo_image("impurity", 0), 6);
    let in_flight = std::thread::spawn(move || post(&score, &slow));
    // Let the request arrive and start scoring before stopping.
    std::thread::sleep(Duration::from_millis(300));
    server.stop().unwrap();
    let a = in_flight.join().unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
}
