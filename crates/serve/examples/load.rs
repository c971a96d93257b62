//! A bounded load client for `vigil serve` on loopback (benchmarks/serve/run.sh): `--requests`
//! POSTs of the images in `--images` (cycled) from `--concurrency` threads, each with its own
//! keep-alive connection. Prints one JSON line: throughput, latency percentiles, answers by
//! status, and the server's resident memory sampled while it runs (`--pid`). Bounded in count
//! and in time: no request starts after `--max-seconds` (default 900), and `stopped_early` says so.
//!
//! cargo run --release -p vigil-serve --example load -- --url http://127.0.0.1:8080/v1/models/demo/score \
//!     --images data/demo/PA_BDP01_TL/test --concurrency 8 --requests 1000 [--pid PID] [--max-seconds 900]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    url: String,
    images: PathBuf,
    concurrency: usize,
    requests: usize,
    pid: Option<u32>,
    max_seconds: f64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        url: String::new(),
        images: PathBuf::new(),
        concurrency: 1,
        requests: 100,
        pid: None,
        max_seconds: 900.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => a.url = value,
            "--images" => a.images = value.into(),
            "--concurrency" => a.concurrency = value.parse()?,
            "--requests" => a.requests = value.parse()?,
            "--pid" => a.pid = Some(value.parse()?),
            "--max-seconds" => a.max_seconds = value.parse()?,
            other => bail!(
                "unknown option {other}; use --url --images --concurrency --requests --pid --max-seconds"
            ),
        }
    }
    if a.url.is_empty() || a.concurrency == 0 || a.max_seconds.is_nan() || a.max_seconds <= 0.0 {
        bail!("give --url and --images (and --concurrency >= 1, --max-seconds > 0)");
    }
    Ok(a)
}

/// Every image file under `dir`, sorted.
fn images(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let mut files = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).with_context(|| folder.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                folders.push(path);
            } else if vigil_data::io::has_image_extension(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: no image files", dir.display());
    }
    files.iter().map(|f| std::fs::read(f).with_context(|| f.display().to_string())).collect()
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    let a = args()?;
    let bodies = images(&a.images)?;
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let stopped_early = AtomicBool::new(false);
    let clients_done = AtomicBool::new(false);
    let deadline = Duration::from_secs_f64(a.max_seconds);
    let latencies = Mutex::new(Vec::with_capacity(a.requests));
    let statuses = Mutex::new(BTreeMap::<String, usize>::new());
    let rss = Mutex::new(Vec::<(usize, u64)>::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        if let Some(pid) = a.pid {
            let (done, rss, clients_done) = (&done, &rss, &clients_done);
            s.spawn(move || {
                while !clients_done.load(Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        rss.lock().unwrap().push((done.load(Ordering::Relaxed), kib));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        let clients: Vec<_> = (0..a.concurrency)
            .map(|_| {
                s.spawn(|| {
                    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(120)).build();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= a.requests {
                            return;
                        }
                        if start.elapsed() > deadline {
                            stopped_early.store(true, Ordering::Relaxed);
                            return;
                        }
                        let t = Instant::now();
                        let status = match agent.post(&a.url).send_bytes(&bodies[i % bodies.len()]) {
                            Ok(r) | Err(ureq::Error::Status(_, r)) => {
                                let status = r.status().to_string();
                                let mut sink = Vec::new();
                                match r.into_reader().read_to_end(&mut sink) {
                                    Ok(_) => status,
                                    Err(_) => "read-error".to_string(),
                                }
                            }
                            Err(_) => "transport-error".to_string(),
                        };
                        let ms = t.elapsed().as_secs_f64() * 1000.0;
                        if status == "200" {
                            latencies.lock().unwrap().push(ms);
                        }
                        *statuses.lock().unwrap().entry(status).or_default() += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().expect("a client thread panicked");
        }
        clients_done.store(true, Ordering::Relaxed);
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut lat = latencies.into_inner().unwrap();
    lat.sort_by(f64::total_cmp);
    let ok = lat.len();
    // RSS at about every tenth of the run (the first sample after each tenth).
    let samples = rss.into_inner().unwrap();
    let mut tenths = Vec::new();
    for k in 0..=10 {
        let mark = a.requests * k / 10;
        if let Some(&(n, kib)) = samples.iter().find(|(n, _)| *n >= mark).or(samples.last()) {
            if tenths.last().is_none_or(|&(m, _)| m != n) {
                tenths.push((n, kib));
            }
        }
    }
    let line = serde_json::json!({
        "concurrency": a.concurrency,
        "requests": a.requests,
        "done": done.load(Ordering::Relaxed),
        "seconds": seconds,
        "ok_per_second": ok as f64 / seconds,
        "p50_ms": percentile(&lat, 0.50),
        "p99_ms": percentile(&lat, 0.99),
        "statuses": statuses.into_inner().unwrap(),
        "rss_kib": tenths,
        "stopped_early": stopped_early.load(Ordering::Relaxed),
    });
    println!("{line}");
    Ok(())
}
