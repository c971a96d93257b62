use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr for long work; hidden when stderr is not a terminal or when
/// `VIGIL_NO_PROGRESS` is set, so logs and CI stay clean.
pub fn bar(len: u64, message: &str) -> ProgressBar {
    if std::env::var_os("VIGIL_NO_PROGRESS").is_some() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(message.to_string());
    pb
}
