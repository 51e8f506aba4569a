//! `recontrol`: test-time alignment of LLMs by editing their hidden states (RE-Control).

mod args;
mod data;
mod demo;
mod env;
mod eval;
mod export;
mod generate;
mod output;
mod pretrain;
mod reward;
mod rollout;
mod serve;
mod slurm;
mod steer;
mod sweep;
mod value;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Test-time alignment of LLMs by editing their hidden states (RE-Control).
#[derive(Debug, Parser)]
#[command(name = "recontrol", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate continuations of prompts with a Hugging Face model directory.
    Generate(Box<generate::GenerateArgs>),
    /// Generate from dataset prompts and store every final hidden state (HDF5); merge stores.
    Rollout(Box<rollout::RolloutCommand>),
    /// Look at datasets.
    Data(data::DataCommand),
    /// Language-model utilities: pretrain the small default model.
    Lm(pretrain::LmCommand),
    /// Reward models: train (Bradley-Terry), score generations, label rollouts.
    Reward(reward::RewardCommand),
    /// Value functions on hidden states: train (Bellman), evaluate.
    Value(value::ValueCommand),
    /// Export a value head as ONNX (value, value + gradient, controller step); inspect ONNX files.
    Export(export::ExportCommand),
    /// Static representation editing: fit a steering vector on labelled rollouts.
    Steer(steer::SteerCommand),
    /// Tune one decoding method's knob on validation prompts (reward + diversity + coherence).
    Sweep(Box<sweep::SweepArgs>),
    /// Evaluate generation files: reward (bootstrap CI), diversity, coherence, win rates, time.
    Eval(Box<eval::EvalArgs>),
    /// Serve a model over the OpenAI API, each request optionally steered by a value head.
    Serve(Box<serve::ServeArgs>),
    /// Run a stage on a Slurm cluster: a job array of shards and a dependent merge.
    Slurm(slurm::SlurmCommand),
    /// The whole pipeline on the embedded default (CPU, about half an hour): SmolLM2, rollouts,
    /// policy reward model and judge, value, export, eight methods tuned on validation prompts,
    /// generated and evaluated (the paper's Table 1), and an OOD run.
    Demo(demo::DemoArgs),
    /// Show the libtorch and ONNX Runtime this binary finds, and the devices they see.
    Env(env::EnvArgs),
}

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line: a cause whose text the message already holds (an
/// error that prints its source) is not repeated, and line breaks become spaces.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs a parsed command line.
fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => args.run(),
        Command::Rollout(args) => args.run(),
        Command::Data(args) => args.run(),
        Command::Lm(args) => args.run(),
        Command::Reward(args) => args.run(),
        Command::Value(args) => args.run(),
        Command::Export(args) => args.run(),
        Command::Steer(args) => args.run(),
        Command::Sweep(args) => args.run(),
        Command::Eval(args) => args.run(),
        Command::Serve(args) => args.run(),
        Command::Slurm(args) => args.run(),
        Command::Demo(args) => args.run(),
        Command::Env(args) => args.run(),
    }
}
