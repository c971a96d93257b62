//! Progress of long loops on stderr: a bar on a terminal, plain periodic lines elsewhere (logs,
//! CI, nohup), or nothing.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else plain lines.
    #[default]
    Auto,
    Bar,
    Plain,
    None,
}

impl std::str::FromStr for ProgressMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "auto" => ProgressMode::Auto,
            "bar" => ProgressMode::Bar,
            "plain" => ProgressMode::Plain,
            "none" => ProgressMode::None,
            _ => anyhow::bail!("progress '{s}' is not one of: auto, bar, plain, none"),
        })
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets how every later loop of this process reports progress.
pub fn set_mode(mode: ProgressMode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

fn mode() -> ProgressMode {
    let chosen = match MODE.load(Ordering::Relaxed) {
        1 => ProgressMode::Bar,
        2 => ProgressMode::Plain,
        3 => ProgressMode::None,
        _ => ProgressMode::Auto,
    };
    match chosen {
        ProgressMode::Auto if std::env::var_os("VIGIL_NO_PROGRESS").is_some() => ProgressMode::None,
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Plain,
        other => other,
    }
}

/// How often plain progress lines are written.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    start: Instant,
    last_line: Instant,
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
}

impl Progress {
    pub fn new(total: usize, label: &str) -> Progress {
        let mode = mode();
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        let plain = mode == ProgressMode::Plain && total > 0;
        if plain {
            eprintln!("{label}: 0/{total} images");
        }
        let now = Instant::now();
        Progress { label: label.to_string(), total, done: 0, start: now, last_line: now, bar, plain }
    }

    pub fn inc(&mut self) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
        if self.plain && self.done < self.total && self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            let elapsed = self.start.elapsed().as_secs_f64();
            let eta = elapsed / self.done as f64 * (self.total - self.done) as f64;
            eprintln!(
                "{}: {}/{} images, {elapsed:.0} s, about {eta:.0} s left",
                self.label, self.done, self.total
            );
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.plain {
            eprintln!(
                "{}: {}/{} images in {:.1} s",
                self.label,
                self.done,
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
