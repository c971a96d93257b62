//! The HTTP endpoints. Errors are JSON `{"error": ..., "status": ...}` naming the problem; a
//! request's failure (even a panic while scoring it) never touches another request.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path as FilePath;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use vigil_engine::model::Prediction;

use crate::admission::{Admission, Ticket};
use crate::metrics::{Gauges, Metrics};
use crate::models::{Models, Served};
use crate::regions::regions;

/// The web page: one file, no external resources.
const PAGE: &str = include_str!("page.html");

/// Boxes listed per image; `regions` gives the full count.
const MAX_BOXES: usize = 100;

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Clone)]
pub struct App(Arc<Inner>);

struct Inner {
    models: Models,
    admission: Arc<Admission>,
    metrics: Metrics,
    timeout: Duration,
    body_limit: usize,
    colour_scale_png: Vec<u8>,
    started: Instant,
}

impl App {
    pub fn new(options: &crate::Options) -> Result<App> {
        let models = Models::load(&options.models, options.allow_other_weights)?;
        // The overlays' and heatmaps' colour map, low to high, for the page's colour scale.
        let scale =
            vigil_report::RgbImage::from_fn(256, 1, |x, _| vigil_report::turbo(x as f32 / 255.0).into());
        Ok(App(Arc::new(Inner {
            models,
            admission: Admission::new(options.workers, options.queue),
            metrics: Metrics::default(),
            timeout: options.timeout,
            body_limit: options.body_limit,
            colour_scale_png: vigil_report::encode_png(&scale)?,
            started: Instant::now(),
        })))
    }

    /// Reloads every model from its file, all together or none (SIGHUP).
    pub async fn reload_all(&self) -> Result<usize> {
        let app = self.clone();
        tokio::task::spawn_blocking(move || {
            let names = app.0.models.names();
            app.0.models.reload(&names).map(|_| names.len())
        })
        .await
        .context("the reload panicked")?
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the server stopped on an error")
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/colour-scale.png", get(colour_scale))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}/score", post(score))
        .route("/v1/models/{name}/reload", post(reload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), track))
        // collect() enforces --body-limit; the extractors then read bodies already within it.
        .layer(DefaultBodyLimit::disable())
        .with_state(app)
}

/// Counts every answer by route and status, with its latency.
async fn track(State(app): State<App>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    app.0.metrics.request(&route, response.status().as_u16(), start.elapsed());
    response
}

/// An error answer: its status and a message that names the problem.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message, "status": self.status.as_u16() }));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn colour_scale(State(app): State<App>) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], app.0.colour_scale_png.clone()).into_response()
}

async fn healthz(State(app): State<App>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "models": app.0.models.names(),
        "uptime_seconds": app.0.started.elapsed().as_secs(),
    }))
}

async fn metrics(State(app): State<App>) -> Response {
    let a = &app.0.admission;
    let gauges = Gauges {
        queue_depth: a.queue_depth(),
        busy_workers: a.busy_workers(),
        workers: a.worker_count,
        queue_capacity: a.queue_capacity,
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.0.metrics.render(&gauges)).into_response()
}

async fn list_models(State(app): State<App>) -> Json<Value> {
    let models: Vec<Value> = app.0.models.all().iter().map(|(name, s)| s.describe(name)).collect();
    Json(json!({ "models": models }))
}

fn unknown_model(app: &App, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("unknown model '{name}'; this server has: {}", app.0.models.names().join(", ")),
    )
}

async fn reload(State(app): State<App>, Path(name): Path<String>) -> Response {
    if app.0.models.get(&name).is_none() {
        return unknown_model(&app, &name).into_response();
    }
    let worker = app.clone();
    let target = name.clone();
    match tokio::task::spawn_blocking(move || worker.0.models.reload(&[target])).await {
        Ok(Ok(())) => match app.0.models.get(&name) {
            Some(served) => {
                Json(json!({ "reloaded": name, "model": served.describe(&name) })).into_response()
            }
            None => unknown_model(&app, &name).into_response(),
        },
        Ok(Err(e)) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")).into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reloading model '{name}' panicked; the model in service is kept"),
        )
        .into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {}; there are GET /, GET /healthz, GET /metrics, GET /v1/models, \
             POST /v1/models/{{name}}/score and POST /v1/models/{{name}}/reload",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let allowed = if uri.path().starts_with("/v1/models/") { "POST" } else { "GET" };
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}; use {allowed}", uri.path()),
    )
}

/// What a score request asks for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Output {
    /// The JSON answer; with `pictures`, the overlay and heatmap as base64 PNG inside it (the page).
    Json {
        pictures: bool,
    },
    MapPng16,
    MapTiff,
    Overlay,
}

#[derive(Debug)]
struct Params {
    output: Output,
    /// The image's name in messages and in the answer (a raw body has no file name).
    name: String,
}

const PARAMS_HELP: &str = "map=png16|tiff, overlay=png, pictures=true, name=TEXT";

fn params(
    query: std::result::Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Params, ApiError> {
    let Query(query) = query.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("bad query string: {}", e.body_text()))
    })?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    if let Some(key) = query.keys().find(|k| !["map", "overlay", "pictures", "name"].contains(&k.as_str())) {
        return Err(bad(format!("unknown query parameter '{key}'; this endpoint takes {PARAMS_HELP}")));
    }
    let map = match query.get("map").map(String::as_str) {
        None => None,
        Some("png16") => Some(Output::MapPng16),
        Some("tiff") => Some(Output::MapTiff),
        Some(other) => return Err(bad(format!("map={other}: the map comes as png16 or tiff"))),
    };
    let overlay = match query.get("overlay").map(String::as_str) {
        None => None,
        Some("png") => Some(Output::Overlay),
        Some(other) => return Err(bad(format!("overlay={other}: the overlay comes as png"))),
    };
    let pictures = match query.get("pictures").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(bad(format!("pictures={other}: give true or false"))),
    };
    let output = match (map, overlay) {
        (Some(_), Some(_)) => return Err(bad("ask for either map or overlay, not both".into())),
        (Some(o), None) | (None, Some(o)) if pictures => {
            return Err(bad(format!("pictures=true is for the JSON answer, not with {o:?}")))
        }
        (Some(o), None) | (None, Some(o)) => o,
        (None, None) => Output::Json { pictures },
    };
    Ok(Params { output, name: query.get("name").cloned().unwrap_or_else(|| "upload".into()) })
}

async fn score(
    State(app): State<App>,
    Path(name): Path<String>,
    query: std::result::Result<Query<BTreeMap<String, String>>, QueryRejection>,
    req: Request,
) -> Response {
    let arrived = Instant::now();
    let timeout = app.0.timeout;
    match tokio::time::timeout(timeout, score_request(app, name, query, req, arrived)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request was not answered within the timeout of {} s (--timeout): the service is \
                 overloaded or the image is very large; retry later",
                timeout.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

async fn score_request(
    app: App,
    name: String,
    query: std::result::Result<Query<BTreeMap<String, String>>, QueryRejection>,
    req: Request,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let admitted = params(query).and_then(|params| {
        let served = app.0.models.get(&name).ok_or_else(|| unknown_model(&app, &name))?;
        let ticket = app.0.admission.try_admit().ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "busy: {} worker(s) scoring and {} request(s) queued, the most this server takes \
                     (--workers, --queue); retry later",
                    app.0.admission.worker_count, app.0.admission.queue_capacity
                ),
            )
        })?;
        Ok((params, served, ticket))
    });
    let (params, served, ticket) = match admitted {
        Ok(a) => a,
        Err(e) => {
            // Read the body to its end (keeping nothing) so the client reads the answer instead
            // of a reset connection.
            drain(body).await;
            return Err(e);
        }
    };
    let body = collect(body, app.0.body_limit).await?;
    let images = read_images(Request::from_parts(parts, axum::body::Body::from(body)), &params).await?;
    if images.len() > 1 && !matches!(params.output, Output::Json { .. }) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "map and overlay answer one image; a multipart batch is answered in JSON only",
        ));
    }
    let permit = ticket.worker().await;
    let queued = arrived.elapsed();
    let job = {
        let served = served.clone();
        let output = params.output;
        move || {
            let _hold: (Ticket, _) = (ticket, permit);
            work(&served, images, output, arrived, queued)
        }
    };
    let answer = tokio::task::spawn_blocking(job).await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error: scoring this image panicked; other requests are not affected",
        )
    })??;
    app.0.metrics.scored(&name, answer.images);
    Ok(match answer.body {
        Body::Json(mut value) => {
            value["model"] = json!(name);
            value["method"] = json!(served.model.method);
            Json(value).into_response()
        }
        Body::Bytes { content_type, bytes, prediction } => {
            let mut response = ([(header::CONTENT_TYPE, content_type)], bytes).into_response();
            let h = response.headers_mut();
            let verdict = if prediction.verdict { "anomalous" } else { "normal" };
            h.insert("x-vigil-verdict", HeaderValue::from_static(verdict));
            for (key, value) in
                [("x-vigil-score", prediction.score), ("x-vigil-decided-value", prediction.decided)]
            {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(key, v);
                }
            }
            response
        }
    })
}

/// Reads and drops the rest of a body.
async fn drain(mut body: axum::body::Body) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// The whole body, up to `limit` bytes; past it the rest is drained and the answer is 413.
async fn collect(mut body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else { continue };
        if bytes.len() + data.len() > limit {
            drop(bytes);
            drain(body).await;
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than the limit of {limit} bytes (--body-limit)"),
            ));
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Bytes::from(bytes))
}

/// The images of a request: the whole body, or each part of a multipart/form-data batch.
async fn read_images(req: Request, params: &Params) -> Result<Vec<(String, Bytes)>, ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("multipart/"));
    if !multipart {
        let body = Bytes::from_request(req, &()).await.map_err(|e| {
            ApiError::new(e.status(), format!("cannot read the request body: {}", e.body_text()))
        })?;
        if body.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "the request body is empty: send the image's bytes (PNG, JPEG, TIFF or BMP) as the body, or a \
                 multipart/form-data batch",
            ));
        }
        return Ok(vec![(params.name.clone(), body)]);
    }
    let multipart_error = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(e.status(), format!("bad multipart body: {}", e.body_text()))
    };
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::new(e.status(), format!("bad multipart body: {}", e.body_text())))?;
    let mut images = Vec::new();
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field
            .file_name()
            .or(field.name())
            .map(str::to_string)
            .unwrap_or_else(|| format!("part {}", images.len() + 1));
        let bytes = field.bytes().await.map_err(multipart_error)?;
        images.push((name, bytes));
    }
    if images.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the multipart body has no part: send each image as a file part",
        ));
    }
    Ok(images)
}

/// The decision on one image, for the headers of a map or overlay answer.
struct Decision {
    verdict: bool,
    score: String,
    decided: String,
}

enum Body {
    Json(Value),
    Bytes { content_type: &'static str, bytes: Vec<u8>, prediction: Decision },
}

struct Answer {
    body: Body,
    images: usize,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Decodes and scores the images of one request on a worker thread.
fn work(
    served: &Served,
    images: Vec<(String, Bytes)>,
    output: Output,
    arrived: Instant,
    queued: Duration,
) -> Result<Answer, ApiError> {
    let model = &served.model;
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let count = images.len();
    let mut results = Vec::with_capacity(count);
    for (name, bytes) in images {
        let start = Instant::now();
        let image = vigil_data::io::decode_image(FilePath::new(&name), &bytes)
            .map_err(|e| unprocessable(e.to_string()))?;
        let decoded = start.elapsed();
        let start = Instant::now();
        let prediction = model.predict(&image, &name).map_err(|e| unprocessable(format!("{e:#}")))?;
        let scored = start.elapsed();
        let map = &prediction.scored.map;
        let internal =
            |e: anyhow::Error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{name}: {e:#}"));
        let bytes_answer = |content_type, bytes| Answer {
            body: Body::Bytes { content_type, bytes, prediction: decision(&prediction) },
            images: 1,
        };
        match output {
            Output::MapPng16 => {
                let bytes = vigil_data::io::encode_map_png16(FilePath::new(&name), map, map.min(), map.max())
                    .map_err(|e| internal(e.into()))?;
                return Ok(bytes_answer("image/png", bytes));
            }
            Output::MapTiff => {
                let bytes = vigil_data::io::encode_map_tiff(FilePath::new(&name), map)
                    .map_err(|e| internal(e.into()))?;
                return Ok(bytes_answer("image/tiff", bytes));
            }
            Output::Overlay => {
                let bytes = vigil_engine::report::full_overlay(
                    &image,
                    map,
                    &model.pixel_threshold,
                    &prediction.predicted,
                )
                .map_err(internal)?;
                return Ok(bytes_answer("image/png", bytes));
            }
            Output::Json { pictures } => {
                let mut result = image_json(served, &name, &prediction);
                if pictures {
                    result["pictures"] = pictures_json(served, &image, &prediction).map_err(internal)?;
                }
                result["timing_ms"] = json!({
                    "queue": millis(queued),
                    "decode": millis(decoded),
                    "score": millis(scored),
                    "total": millis(arrived.elapsed()),
                });
                results.push(result);
            }
        }
    }
    let body = match results.len() {
        1 => results.pop().unwrap_or_default(),
        _ => json!({ "images": results }),
    };
    Ok(Answer { body: Body::Json(body), images: count })
}

fn decision(p: &Prediction) -> Decision {
    Decision { verdict: p.verdict, score: p.scored.image_score.to_string(), decided: p.decided.to_string() }
}

/// The JSON of one scored image: the numbers `vigil predict` writes in scores.json, with the
/// thresholds and the predicted regions.
fn image_json(served: &Served, name: &str, p: &Prediction) -> Value {
    let model = &served.model;
    let found = regions(&p.predicted);
    json!({
        "image": name,
        "width": p.scored.map.width,
        "height": p.scored.map.height,
        "score": p.scored.image_score,
        "decided_value": p.decided,
        "threshold": p.threshold,
        "anomalous": p.verdict,
        "verdict": if p.verdict { "anomalous" } else { "normal" },
        "image_threshold": model.image_threshold,
        "pixel_threshold": model.pixel_threshold,
        "anomalous_pixels": p.predicted.count(),
        "regions": found.len(),
        "boxes": &found[..found.len().min(MAX_BOXES)],
    })
}

/// The overlay and the heatmap as base64 PNG, with the heatmap's colour range (that of the overlay).
fn pictures_json(served: &Served, image: &vigil_core::Image, p: &Prediction) -> Result<Value> {
    let model = &served.model;
    let map = &p.scored.map;
    let overlay = vigil_engine::report::full_overlay(image, map, &model.pixel_threshold, &p.predicted)?;
    let (low, high) = vigil_engine::report::overlay_range(map, &model.pixel_threshold);
    let heatmap = vigil_report::encode_png(&vigil_report::colorize(map, low, high))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    Ok(json!({
        "overlay_png": b64.encode(overlay),
        "heatmap_png": b64.encode(heatmap),
        "heatmap_low": low,
        "heatmap_high": high,
        // Where the pixel threshold sits on the heatmap's scale (none for NFA thresholds, which
        // are read on the NFA map, not on this one).
        "pixel_threshold_on_scale": model.pixel_threshold.log10_nfa_level().is_none().then_some(model.pixel_threshold.value),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Params, ApiError> {
        let map = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        params(Ok(Query(map)))
    }

    #[test]
    fn query_parameters_are_checked() {
        assert_eq!(parse(&[]).unwrap().output, Output::Json { pictures: false });
        assert_eq!(parse(&[("map", "tiff")]).unwrap().output, Output::MapTiff);
        assert_eq!(parse(&[("overlay", "png"), ("name", "a.png")]).unwrap().name, "a.png");
        assert!(parse(&[("map", "jpeg")]).unwrap_err().message.contains("png16 or tiff"));
        assert!(parse(&[("map", "tiff"), ("overlay", "png")]).unwrap_err().message.contains("not both"));
        assert!(parse(&[("colour", "red")])
            .unwrap_err()
            .message
            .contains("unknown query parameter 'colour'"));
    }
}
