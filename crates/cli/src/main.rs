//! `vigil`: unsupervised visual anomaly detection — fit on normal images, find what deviates.
//! This crate holds only the command line: flags, config files and the commands; the work is done
//! by `vigil-engine`.

mod args;
mod benchmark;
mod config;
mod demo;
mod fit_cmd;
mod options;
mod predict;
mod serve_cmd;
mod test_cmd;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: args::Cli) -> anyhow::Result<()> {
    if let Some(threads) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    }
    vigil_engine::progress::set_mode(cli.progress.parse()?);
    match cli.command {
        args::Command::Fit(a) => fit_cmd::fit_command(a),
        args::Command::Test(a) => test_cmd::test_command(a),
        args::Command::Predict(a) => predict::predict_command(a),
        args::Command::Benchmark(a) => benchmark::benchmark_command(a),
        args::Command::Demo(a) => demo::demo_command(a),
        args::Command::Serve(a) => serve_cmd::serve_command(a),
        args::Command::Methods => {
            for m in vigil_engine::registry::registry() {
                println!("{}\n  {}\n  settings (defaults): {}\n", m.name, m.summary, m.resolved_defaults);
            }
            Ok(())
        }
    }
}
