//! `vigil`: unsupervised visual anomaly detection — fit on normal images, find what deviates.

mod args;
mod benchmark;
mod config;
mod demo;
mod methods;
mod pipeline;
mod predict;
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
    match cli.command {
        args::Command::Fit(a) => pipeline::fit_command(a),
        args::Command::Test(a) => test_cmd::test_command(a),
        args::Command::Predict(a) => predict::predict_command(a),
        args::Command::Benchmark(a) => benchmark::benchmark_command(a),
        args::Command::Demo(a) => demo::demo_command(a),
        args::Command::Methods => {
            methods::print_methods();
            Ok(())
        }
    }
}
