//! Arguments of `caft-fast eval` and the thin glue from them to the library.

use super::common::{launch_if_asked, run_labels, set_threads, ModelArgs};
use crate::data::TrainOn;
use crate::dist::Dist;
use crate::eval::loss::LossOptions;
use crate::eval::task::TaskConfig;
use crate::eval::{loss, mc, task};
use crate::report::chart::{bar_chart_svg, markdown_table, read_report, Row};
use crate::report::seeds::{markdown as seeds_markdown, paired, seeds_chart_svg, Seeds};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub cmd: EvalCmd,
}

#[derive(Subcommand, Debug, Clone)]
pub enum EvalCmd {
    /// Multiple-choice accuracy: each option scored by the logit of its first token after the
    /// prompt; accuracy per split and overall, as a table and as JSON with every prediction.
    Mc(McArgs),
    /// Mean cross-entropy and perplexity on the assistant tokens of held-out chat data,
    /// masked exactly as `train` masks them.
    Loss(LossArgs),
    /// Write the double multiple-choice spurious-correlation task (animal vs. sentiment):
    /// train.jsonl (chat), test.jsonl (multiple choice, splits id and ood), probes.jsonl
    /// (sentiment sentences) and task.json.
    MakeTask(MakeTaskArgs),
    /// Compare `mc` results: a markdown table and an SVG grouped bar chart of the accuracy of
    /// each split per run (axis 0-100%, chance line at 50%).
    Chart(ChartArgs),
    /// Compare arms (fine-tunes) repeated over seeds: per seed and arm the accuracy of each
    /// split, per arm the mean, standard deviation and 95% t-interval over seeds, paired
    /// comparisons of arms (mean difference, t-interval, seeds won, exact sign and permutation
    /// tests) as markdown, and an SVG bar chart of the means with error bars and a dot per seed.
    Seeds(SeedsArgs),
}

#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Data: one JSON object a line:
  {\"id\": \"q1\", \"messages\": [{\"role\": \"user\", \"content\": \"...\"}], \"options\": [\"A\", \"B\"],
   \"answer\": 0, \"split\": \"ood\"}
or a raw \"prompt\" string instead of \"messages\". Messages end with the user turn and are
rendered with the model's chat template and its generation prompt. An option's score is the
logit of its first token (as tokenized right after the prompt) at the prompt's last position;
the first tokens of an item's options must differ. \"split\" defaults to \"all\".

Output (-o): JSON with the model, adapter, directions, backend, the accuracy overall and per
split, and per item the prediction, every option's logit and log-probability.")]
pub struct McArgs {
    /// Multiple-choice data (JSONL, see below).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Also write the results as JSON.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Share the forward passes among these GPUs of this node, one worker each (e.g. 0,1 or
    /// all; NCCL); under torchrun/srun the ranks share them without it.
    #[arg(long, value_name = "LIST")]
    pub gpus: Option<String>,
}

#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Data: the JSONL forms `caft-fast train` reads (chat {\"messages\"}, {\"prompt\", \"completion\"},
{\"text\"}, pre-tokenized {\"input_ids\", \"labels\"}), tokenized and masked as training does.
The loss is Σ cross-entropy / labelled tokens in nats per token (what training logs as its
validation loss); the perplexity is its exponential.")]
pub struct LossArgs {
    /// Held-out data (JSONL).
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Truncate longer examples (counted and reported).
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Loss on `assistant` tokens only, or on `all` tokens of chat records.
    #[arg(long, default_value = "assistant")]
    pub train_on: String,
    /// Also write the result as JSON.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Share the forward passes among these GPUs of this node, one worker each (e.g. 0,1 or
    /// all; NCCL); under torchrun/srun the ranks share them without it.
    #[arg(long, value_name = "LIST")]
    pub gpus: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct MakeTaskArgs {
    /// Output folder (created; files of the same names are replaced).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Training questions.
    #[arg(long, default_value_t = 400)]
    pub n_train: usize,
    /// Questions in EACH test split (id and ood).
    #[arg(long, default_value_t = 200)]
    pub n_test: usize,
    /// Probe sentences (half positive, half negative).
    #[arg(long, default_value_t = 200)]
    pub n_probes: usize,
}

/// Run one `eval` subcommand.
pub fn run(a: EvalArgs) -> Result<()> {
    match a.cmd {
        EvalCmd::Mc(a) => {
            if launch_if_asked(a.gpus.as_deref(), Some(a.model.device))?.is_some() {
                return Ok(());
            }
            set_threads(a.model.threads);
            let r = mc::evaluate(
                &a.model.spec()?,
                a.model.device,
                &a.data,
                a.batch_size,
                a.output.as_deref(),
                &Dist::from_env()?,
            )?;
            print!("{}", mc::format_table(&r));
            if let Some(o) = &a.output {
                eprintln!("wrote {}", o.display());
            }
        }
        EvalCmd::Loss(a) => {
            if launch_if_asked(a.gpus.as_deref(), Some(a.model.device))?.is_some() {
                return Ok(());
            }
            set_threads(a.model.threads);
            let opt = LossOptions {
                max_seq_len: a.max_seq_len,
                batch_size: a.batch_size,
                train_on: TrainOn::parse(&a.train_on)?,
            };
            let r = loss::evaluate(
                &a.model.spec()?,
                a.model.device,
                &a.data,
                &opt,
                a.output.as_deref(),
                &Dist::from_env()?,
            )?;
            println!(
                "loss {:.4} nats/token, perplexity {:.3} over {} tokens of {} examples",
                r.loss, r.perplexity, r.tokens, r.examples
            );
            if r.truncated + r.dropped > 0 {
                eprintln!(
                    "note: {} examples cut at --max-seq-len {}, {} dropped (no labelled token left)",
                    r.truncated, r.max_seq_len, r.dropped
                );
            }
            if let Some(o) = &a.output {
                eprintln!("wrote {}", o.display());
            }
        }
        EvalCmd::Chart(a) => chart(&a)?,
        EvalCmd::Seeds(a) => seeds(&a)?,
        EvalCmd::MakeTask(a) => {
            let cfg = TaskConfig {
                seed: a.seed,
                n_train: a.n_train,
                n_test: a.n_test,
                n_probes: a.n_probes,
            };
            let f = task::write_task(&a.output, &cfg)?;
            eprintln!(
                "wrote {} ({} chat records), {} ({} id + {} ood questions), {} ({} sentences), {}",
                f.train.display(),
                cfg.n_train,
                f.test.display(),
                cfg.n_test,
                cfg.n_test,
                f.probes.display(),
                cfg.n_probes,
                f.about.display()
            );
        }
    }
    Ok(())
}

/// Arguments of `eval chart`.
#[derive(Args, Debug, Clone)]
pub struct ChartArgs {
    /// `eval mc -o` JSON reports, one per run, in the order of the bars.
    #[arg(long, num_args = 1.., required = true)]
    pub results: Vec<PathBuf>,
    /// Names of the runs, comma-separated, one per result [default: the file stems].
    #[arg(long)]
    pub labels: Option<String>,
    /// The chart's title.
    #[arg(long, default_value = "Multiple-choice accuracy by split")]
    pub title: String,
    /// Output SVG file.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// `eval chart`: read the reports, print the markdown table, write the SVG.
fn chart(a: &ChartArgs) -> Result<()> {
    let labels = run_labels(&a.labels, &a.results, "--results files")?;
    let rows = a
        .results
        .iter()
        .zip(labels)
        .map(|(p, label)| {
            Ok(Row {
                label,
                bars: read_report(p)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    print!("{}", markdown_table(&rows));
    crate::io::write_atomic(&a.output, bar_chart_svg(&a.title, &rows).as_bytes())?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

/// Arguments of `eval seeds`.
#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
Each --runs folder is one seed (named by the folder's name) and holds one `eval mc -o` report
per arm, at --file with {arm} replaced by the arm's name. Example (scripts/demo_caft_mc.sh):

  caft-fast eval seeds --runs out/seed0 out/seed1 out/seed2 --arms base,plain,caft,random \\
      --compare caft:random,caft:plain --split ood -o out/chart.svg > out/results.md

Paired comparisons A:B take, per seed, A's accuracy minus B's on --split. Their p-values are
exact and two-sided: a sign test (seeds A wins against a fair coin per untied seed) and a
paired permutation test (all 2^n sign flips of the differences, up to 20 seeds).")]
pub struct SeedsArgs {
    /// Folders, one per seed, each holding the arms' reports.
    #[arg(long, num_args = 1.., required = true)]
    pub runs: Vec<PathBuf>,
    /// The arms, comma-separated, in the order of the tables and bars.
    #[arg(long, required = true)]
    pub arms: String,
    /// Where an arm's `eval mc -o` report is inside a run folder.
    #[arg(long, default_value = "mc_{arm}.json")]
    pub file: String,
    /// Paired comparisons, comma-separated A:B (A minus B).
    #[arg(long)]
    pub compare: Option<String>,
    /// The split the paired comparisons are on.
    #[arg(long, default_value = "ood")]
    pub split: String,
    /// The chart's title.
    #[arg(long, default_value = "Multiple-choice accuracy by split over seeds")]
    pub title: String,
    /// Output SVG file.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// `eval seeds`: read every seed's reports, print the markdown summary, write the SVG.
fn seeds(a: &SeedsArgs) -> Result<()> {
    let arms: Vec<String> = a.arms.split(',').map(|x| x.trim().to_string()).collect();
    if arms.iter().any(|x| x.is_empty()) {
        bail!("--arms {:?}: an empty name", a.arms);
    }
    if !a.file.contains("{arm}") {
        bail!("--file {:?} must contain {{arm}}", a.file);
    }
    let names: Vec<String> = a
        .runs
        .iter()
        .map(|r| {
            r.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .with_context(|| format!("--runs {}: no folder name", r.display()))
        })
        .collect::<Result<_>>()?;
    let results = a
        .runs
        .iter()
        .map(|r| {
            arms.iter()
                .map(|arm| read_report(&r.join(a.file.replace("{arm}", arm))))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let s = Seeds {
        arms,
        seeds: names,
        results,
    };
    if !s.splits().contains(&a.split) {
        bail!(
            "--split {}: the reports have splits {}",
            a.split,
            s.splits().join(", ")
        );
    }
    let mut comparisons = Vec::new();
    for pair in a.compare.iter().flat_map(|c| c.split(',')) {
        let (x, y) = pair
            .split_once(':')
            .with_context(|| format!("--compare {pair:?}: expected A:B"))?;
        let index = |name: &str| {
            s.arms
                .iter()
                .position(|arm| arm == name.trim())
                .with_context(|| format!("--compare {pair:?}: {name:?} is not one of --arms"))
        };
        comparisons.push(paired(&s, index(x)?, index(y)?, &a.split));
    }
    print!("{}", seeds_markdown(&s, &comparisons));
    crate::io::write_atomic(&a.output, seeds_chart_svg(&a.title, &s).as_bytes())?;
    eprintln!("wrote {}", a.output.display());
    Ok(())
}
