//! `vigil serve`: an inspection service over HTTP with a web page, a thin front end on
//! `vigil-engine`. Every image is decoded by `vigil_data::io::decode_image` (what `load_image`
//! does with a file's bytes) and scored by [`vigil_engine::Model::predict`], the pipeline
//! `vigil predict` runs, so the service answers the same numbers as `vigil predict`.
//!
//! Work is bounded: at most `workers` images are scored at once, at most `queue` more requests
//! wait for a worker, and any request beyond that is answered 503 with `Retry-After` at once.
//! Bodies are limited in size, every request has a deadline, models reload atomically (SIGHUP or
//! `POST /v1/models/{name}/reload`), and SIGTERM lets the requests in flight finish.

mod admission;
mod api;
mod metrics;
mod models;
mod regions;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use models::ModelSource;

/// How the service runs; `vigil serve` fills it from its flags.
#[derive(Clone, Debug)]
pub struct Options {
    pub models: Vec<ModelSource>,
    pub bind: SocketAddr,
    /// Images scored at once.
    pub workers: usize,
    /// Requests that may wait for a worker; beyond them the service answers 503.
    pub queue: usize,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Deadline of a whole request (body, queue and scoring).
    pub timeout: Duration,
    /// Load models whose pretrained weights differ from those they were fitted with.
    pub allow_other_weights: bool,
}

impl Options {
    /// Options with the defaults of `vigil serve`: one worker per core, a queue of four requests per
    /// worker, 64 MiB bodies, 30 s per request.
    pub fn new(models: Vec<ModelSource>, bind: SocketAddr) -> Options {
        let workers = default_workers();
        Options {
            models,
            bind,
            workers,
            queue: 4 * workers,
            body_limit: 64 << 20,
            timeout: Duration::from_secs(30),
            allow_other_weights: false,
        }
    }

    fn check(&self) -> Result<()> {
        if self.models.is_empty() {
            bail!("no model to serve: give at least one --model NAME=path.vigil");
        }
        for (i, m) in self.models.iter().enumerate() {
            if self.models[..i].iter().any(|o| o.name == m.name) {
                bail!("model name '{}' is given twice; each --model needs its own name", m.name);
            }
        }
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.body_limit == 0 {
            bail!("--body-limit must be more than 0 bytes");
        }
        if self.timeout.is_zero() {
            bail!("--timeout must be more than 0 seconds");
        }
        Ok(())
    }
}

/// The number of cores this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Parses a size in bytes: `1048576`, `512KiB`, `64MiB`, `1GiB` (also `K`, `M`, `G`, `KB`, `MB`, `GB`
/// as powers of 1024).
pub fn parse_size(text: &str) -> Result<usize> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: usize = number
        .parse()
        .with_context(|| format!("'{text}' is not a size: give bytes, or a number with KiB/MiB/GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => bail!("'{text}': unknown size unit '{other}'; use KiB, MiB or GiB"),
    };
    number
        .checked_shl(shift)
        .filter(|v| v >> shift == number)
        .with_context(|| format!("'{text}' is too large"))
}

/// A running service (for tests and embedding): its address, and a way to stop it gracefully.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stops accepting connections, lets the requests in flight finish, and waits for the end.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

fn runtime(options: &Options) -> Result<tokio::runtime::Runtime> {
    // Scoring runs on blocking threads (bounded by the workers); the async threads only move bytes.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(options.workers + 4)
        .thread_name("vigil-serve")
        .enable_all()
        .build()
        .context("cannot start the server's runtime")
}

/// Loads the models, binds the address and serves on a thread of its own until [`Running::stop`].
pub fn start(options: Options) -> Result<Running> {
    options.check()?;
    let app = api::App::new(&options)?;
    let runtime = runtime(&options)?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(options.bind))
        .with_context(|| format!("cannot listen on {}", options.bind))?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let served = runtime.block_on(api::serve(listener, app, async {
            let _ = stopped.await;
        }));
        runtime.shutdown_timeout(Duration::from_secs(5));
        served
    });
    Ok(Running { addr, stop: Some(stop), thread: Some(thread) })
}

/// `vigil serve`: loads the models, serves until SIGTERM or Ctrl-C (letting the requests in flight
/// finish) and reloads every model on SIGHUP.
pub fn run(options: Options) -> Result<()> {
    options.check()?;
    let app = api::App::new(&options)?;
    let runtime = runtime(&options)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(options.bind)
            .await
            .with_context(|| format!("cannot listen on {}", options.bind))?;
        let addr = listener.local_addr()?;
        let names: Vec<&str> = options.models.iter().map(|m| m.name.as_str()).collect();
        println!(
            "vigil serve: {} on http://{addr}/ ({} worker(s), queue {}, body limit {} bytes, timeout {:?})",
            names.join(", "),
            options.workers,
            options.queue,
            options.body_limit,
            options.timeout
        );
        let reloader = app.clone();
        tokio::spawn(async move {
            let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                vigil_engine::warn("cannot listen for SIGHUP; reload with POST /v1/models/{name}/reload");
                return;
            };
            while hangups.recv().await.is_some() {
                match reloader.reload_all().await {
                    Ok(n) => println!("SIGHUP: reloaded {n} model(s)"),
                    Err(e) => eprintln!("error: SIGHUP reload failed, the models in service are kept: {e:#}"),
                }
            }
        });
        api::serve(listener, app, shutdown_signal()).await
    })?;
    runtime.shutdown_timeout(Duration::from_secs(5));
    println!("vigil serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            vigil_engine::warn("cannot listen for SIGTERM; stop the server with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    println!("vigil serve: stopping; requests in flight finish first");
}

/// Where a model file given as NAME=path lives, for messages.
pub(crate) fn display(path: &std::path::Path) -> String {
    PathBuf::from(path).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("2 k").unwrap(), 2048);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}
