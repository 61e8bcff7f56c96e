//! `medes trace` (owned by the workload work, issue 3): generate, load, convert and summarise traces.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use medes_trace::{
    Azure2019Stats, Invocations2021Reader, InvocationsReader, RecipeConfig, SynthConfig, Synthetic,
    Trace, TraceStats, bin_2021, write_invocations,
};

/// Arguments of `medes trace`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: TraceCommand,
}

#[derive(clap::Subcommand)]
enum TraceCommand {
    /// Generate a synthetic day in the Azure 2019 `invocations_per_function_md` format.
    Gen {
        /// Function rows.
        #[arg(long, default_value_t = 10_000)]
        functions: usize,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Minute columns.
        #[arg(long, default_value_t = 1440)]
        minutes: usize,
        /// Output CSV.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// The paper's recipe: one window per function from a 2019-format trace, rates scaled,
    /// written as a replay CSV (`time_ms,function,params`).
    Recipe {
        /// Source `invocations_per_function_md.anon.dNN.csv` (default: a synthetic day).
        #[arg(long)]
        source: Option<PathBuf>,
        /// Rows of the synthetic day when no source is given.
        #[arg(long, default_value_t = 10_000)]
        synthetic_functions: usize,
        /// Seed (choice of patterns, arrival times, and the synthetic day).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Rate multiplier.
        #[arg(long, default_value_t = 5.0)]
        scale: f64,
        /// Window length, minutes.
        #[arg(long, default_value_t = 60)]
        window_minutes: u32,
        /// Smallest eligible scaled rate, invocations per hour.
        #[arg(long, default_value_t = 12.0)]
        min_per_hour: f64,
        /// Largest eligible scaled rate, invocations per hour.
        #[arg(long, default_value_t = 1800.0)]
        max_per_hour: f64,
        /// Action names, comma-separated (default: the ten).
        #[arg(long, value_delimiter = ',')]
        functions: Vec<String>,
        /// Output replay CSV.
        #[arg(long, short)]
        out: PathBuf,
        /// Also write the picks (source function, window) as JSON.
        #[arg(long)]
        picks: Option<PathBuf>,
    },
    /// Statistics of a replay CSV, a 2019 invocations file or a 2021 trace (detected from the header).
    Stats {
        /// The file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert a 2021 trace (`app,func,end_timestamp,duration`) to one 2019-format day.
    Convert {
        /// The 2021 file.
        file: PathBuf,
        /// Day to extract (0-based).
        #[arg(long, default_value_t = 0)]
        day: u32,
        /// Output CSV.
        #[arg(long, short)]
        out: PathBuf,
    },
}

fn create(path: &Path) -> anyhow::Result<BufWriter<File>> {
    Ok(BufWriter::new(
        File::create(path).with_context(|| format!("creating {}", path.display()))?,
    ))
}

enum Kind {
    Replay,
    Azure2019,
    Azure2021,
}

fn detect(path: &Path) -> anyhow::Result<Kind> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // Header lines of the 2019 files are ~8 KB; read at most 64 KiB.
    let mut bytes = Vec::new();
    BufReader::new(f)
        .take(64 * 1024)
        .read_until(b'\n', &mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let first = String::from_utf8_lossy(&bytes);
    let h = first.trim_start_matches('\u{feff}');
    Ok(if h.starts_with("time_ms,") {
        Kind::Replay
    } else if h.starts_with("HashOwner,HashApp,HashFunction,Trigger") {
        Kind::Azure2019
    } else if h.starts_with("app,func,end_timestamp") {
        Kind::Azure2021
    } else {
        bail!("{}: unknown header {:?}", path.display(), h.trim_end())
    })
}

/// Runs `medes trace`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        TraceCommand::Gen {
            functions,
            seed,
            minutes,
            out,
        } => {
            let rows = Synthetic::new(SynthConfig {
                seed,
                functions,
                minutes,
            });
            write_invocations(create(&out)?, rows, minutes)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {functions} synthetic functions × {minutes} min to {}",
                out.display()
            );
        }
        TraceCommand::Recipe {
            source,
            synthetic_functions,
            seed,
            scale,
            window_minutes,
            min_per_hour,
            max_per_hour,
            functions,
            out,
            picks,
        } => {
            let mut cfg = RecipeConfig {
                seed,
                scale,
                window_minutes,
                min_per_hour,
                max_per_hour,
                ..Default::default()
            };
            if !functions.is_empty() {
                cfg.functions = functions;
            }
            let recipe = match &source {
                Some(p) => {
                    let rows = InvocationsReader::open(p)
                        .with_context(|| format!("opening {}", p.display()))?;
                    medes_trace::recipe(rows, &cfg)
                }
                None => {
                    let rows = Synthetic::new(SynthConfig {
                        seed,
                        functions: synthetic_functions,
                        ..Default::default()
                    });
                    medes_trace::recipe(rows.map(Ok), &cfg)
                }
            }
            .context("building the workload")?;
            recipe
                .trace
                .write_path(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "{:<12} {:>14} {:>6} {:>8} {:>8}",
                "function", "trigger", "start", "source", "scaled"
            );
            for p in &recipe.picks {
                eprintln!(
                    "{:<12} {:>14} {:>6} {:>8} {:>8}  {}…",
                    p.function,
                    p.trigger.as_str(),
                    p.start_minute,
                    p.source_invocations,
                    p.invocations,
                    &p.source_function[..p.source_function.len().min(12)]
                );
            }
            if let Some(pp) = picks {
                let mut w = create(&pp)?;
                serde_json::to_writer_pretty(&mut w, &recipe.picks)?;
                w.flush()?;
            }
            eprintln!(
                "wrote {} invocations to {}",
                recipe.trace.len(),
                out.display()
            );
            print!("{}", TraceStats::of(&recipe.trace));
        }
        TraceCommand::Stats { file, json } => match detect(&file)? {
            Kind::Replay => {
                let t = Trace::read_path(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let s = TraceStats::of(&t);
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?)
                } else {
                    print!("{s}")
                }
            }
            Kind::Azure2019 => {
                let mut st = Azure2019Stats::new();
                for row in InvocationsReader::open(&file)? {
                    st.add(&row.with_context(|| format!("reading {}", file.display()))?);
                }
                let s = st.finish();
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?)
                } else {
                    println!("{s}")
                }
            }
            Kind::Azure2021 => {
                let rows = Invocations2021Reader::open(&file)?;
                let mut st = Azure2019Stats::new();
                for row in
                    bin_2021(rows, 0).with_context(|| format!("reading {}", file.display()))?
                {
                    st.add(&row);
                }
                let s = st.finish();
                eprintln!(
                    "(2021 trace: day 0 binned per minute; no triggers, all counted as others)"
                );
                if json {
                    println!("{}", serde_json::to_string_pretty(&s)?)
                } else {
                    println!("{s}")
                }
            }
        },
        TraceCommand::Convert { file, day, out } => {
            let rows = Invocations2021Reader::open(&file)?;
            let binned =
                bin_2021(rows, day).with_context(|| format!("reading {}", file.display()))?;
            let n = binned.len();
            write_invocations(create(&out)?, binned, medes_trace::azure::MINUTES_PER_DAY)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {n} functions (day {day}) to {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
