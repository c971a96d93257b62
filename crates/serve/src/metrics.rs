//! Prometheus text metrics: requests by route and status, a latency histogram per route, errors
//! by class, images scored per model, queue depth and busy workers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Counters {
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    scored: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
}

/// Gauges read when the metrics are asked for.
pub struct Gauges {
    pub queue_depth: usize,
    pub busy_workers: usize,
    pub workers: usize,
    pub queue_capacity: usize,
}

impl Metrics {
    fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, route: &str, status: u16, took: Duration) {
        let mut c = self.counters();
        *c.requests.entry((route.to_string(), status)).or_default() += 1;
        let h = c.latency.entry(route.to_string()).or_default();
        let seconds = took.as_secs_f64();
        for (count, bound) in h.counts.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    pub fn scored(&self, model: &str, images: usize) {
        *self.counters().scored.entry(model.to_string()).or_default() += images as u64;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let c = self.counters();
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "# HELP vigil_requests_total HTTP requests answered, by route and status.");
        let _ = writeln!(w, "# TYPE vigil_requests_total counter");
        for ((route, status), n) in &c.requests {
            let _ = writeln!(w, "vigil_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(w, "# HELP vigil_errors_total Requests answered with an error: client (4xx), overload (503), server (5xx).");
        let _ = writeln!(w, "# TYPE vigil_errors_total counter");
        let mut errors = BTreeMap::from([("client", 0u64), ("overload", 0), ("server", 0)]);
        for ((_, status), n) in &c.requests {
            let class = match status {
                503 => "overload",
                400..=499 => "client",
                500..=599 => "server",
                _ => continue,
            };
            *errors.entry(class).or_default() += n;
        }
        for (class, n) in errors {
            let _ = writeln!(w, "vigil_errors_total{{class=\"{class}\"}} {n}");
        }
        let _ =
            writeln!(w, "# HELP vigil_request_duration_seconds Time from a request's arrival to its answer.");
        let _ = writeln!(w, "# TYPE vigil_request_duration_seconds histogram");
        for (route, h) in &c.latency {
            for (count, bound) in h.counts.iter().zip(BUCKETS) {
                let _ = writeln!(
                    w,
                    "vigil_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                w,
                "vigil_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(w, "vigil_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
            let _ = writeln!(w, "vigil_request_duration_seconds_count{{route=\"{route}\"}} {}", h.count);
        }
        let _ = writeln!(w, "# HELP vigil_images_scored_total Images scored, by model.");
        let _ = writeln!(w, "# TYPE vigil_images_scored_total counter");
        for (model, n) in &c.scored {
            let _ = writeln!(w, "vigil_images_scored_total{{model=\"{model}\"}} {n}");
        }
        for (name, help, value) in [
            ("vigil_queue_depth", "Requests waiting for a worker.", g.queue_depth),
            ("vigil_busy_workers", "Workers scoring now.", g.busy_workers),
            ("vigil_workers", "Workers (images scored at once).", g.workers),
            (
                "vigil_queue_capacity",
                "Requests that may wait before the service answers 503.",
                g.queue_capacity,
            ),
        ] {
            let _ = writeln!(w, "# HELP {name} {help}");
            let _ = writeln!(w, "# TYPE {name} gauge");
            let _ = writeln!(w, "{name} {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.request("/healthz", 200, Duration::from_millis(7));
        m.request("/healthz", 503, Duration::from_secs(2));
        let text = m.render(&Gauges { queue_depth: 0, busy_workers: 0, workers: 2, queue_capacity: 8 });
        assert!(text.contains("vigil_request_duration_seconds_bucket{route=\"/healthz\",le=\"0.01\"} 1\n"));
        assert!(text.contains("vigil_request_duration_seconds_bucket{route=\"/healthz\",le=\"2.5\"} 2\n"));
        assert!(text.contains("vigil_request_duration_seconds_count{route=\"/healthz\"} 2\n"));
        assert!(text.contains("vigil_errors_total{class=\"overload\"} 1\n"));
        assert!(text.contains("vigil_workers 2\n"));
    }
}
