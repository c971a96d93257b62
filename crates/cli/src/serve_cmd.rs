//! `vigil serve`: parses the flags and hands them to vigil-serve, which does the rest.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vigil_serve::ModelSource;

/// The long help of `vigil serve`.
pub const ABOUT: &str = "Serve models over HTTP, with a web page at / (open http://127.0.0.1:8080/).

Endpoints:
  POST /v1/models/NAME/score    an image (PNG, JPEG, TIFF, BMP; 8/16-bit) as the body, or a
                                multipart/form-data batch; answers JSON (score, verdict, thresholds,
                                anomalous pixels, boxes of the predicted regions, timing), or for one
                                image ?map=png16|tiff (the anomaly map) or ?overlay=png
  GET  /v1/models               the models: method, settings, thresholds, fit counts, fingerprints
  POST /v1/models/NAME/reload   reload a model from its file (the old one serves until the new loads)
  GET  /healthz                 liveness
  GET  /metrics                 Prometheus text: requests, latency histogram, errors, queue depth

Images are scored by the pipeline `vigil predict` uses, so scores are the same bit for bit.
Errors are JSON {\"error\": ..., \"status\": ...}. SIGTERM or Ctrl-C stops after the requests in
flight finish; SIGHUP reloads every model from its file, all or none.

Example: vigil serve --model demo=runs/demo/model.vigil
         curl --data-binary @image.png http://127.0.0.1:8080/v1/models/demo/score";

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A model to serve as NAME=path.vigil (repeat for several); NAME is the one in
    /// /v1/models/NAME/score.
    #[arg(long = "model", value_name = "NAME=PATH", required = true)]
    pub models: Vec<ModelSource>,
    /// Address and port to listen on. 0.0.0.0:8080 listens on every interface; the default only
    /// on this machine.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    pub bind: SocketAddr,
    /// Images scored at once (default: one per core).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Requests that may wait for a free worker; a request beyond the workers and this queue is
    /// answered 503 with Retry-After at once (default: 4 per worker).
    #[arg(long, value_name = "N")]
    pub queue: Option<usize>,
    /// Largest request body accepted (bytes, or with KiB/MiB/GiB); larger ones are answered 413.
    #[arg(long, default_value = "64MiB", value_name = "SIZE", value_parser = vigil_serve::parse_size)]
    pub body_limit: usize,
    /// Seconds a request may take in all (upload, queue and scoring) before it is answered 503.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Load models even when the pretrained weights on this machine differ from those they were
    /// fitted with (a warning instead of an error).
    #[arg(long)]
    pub allow_other_weights: bool,
}

pub fn serve_command(args: ServeArgs) -> Result<()> {
    let mut options = vigil_serve::Options::new(args.models, args.bind);
    if let Some(workers) = args.workers {
        options.workers = workers;
        options.queue = 4 * workers;
    }
    if let Some(queue) = args.queue {
        options.queue = queue;
    }
    options.body_limit = args.body_limit;
    options.timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| format!("--timeout {}: give a number of seconds above 0", args.timeout))?;
    options.allow_other_weights = args.allow_other_weights;
    vigil_serve::run(options)
}
