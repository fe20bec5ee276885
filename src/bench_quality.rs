//! `parallm bench quality`: what each cheaper variant of a model costs in
//! quality and buys in speed, side by side in one run.
//!
//! The base (its weights dequantized to f32, run with f32 matmuls) scores
//! the text first and saves its distributions ([`crate::perplexity`],
//! `--kl-divergence-base`); then every variant scores the same windows
//! through the engine with its own blocks (`--weights auto`) and is compared
//! with them: PPL, mean KL divergence, top-1 agreement. Speed is `bench
//! latency`'s prefill and batch-1 decode on one shard, measured in rounds
//! that visit every variant in turn (so a machine that slows down slows all
//! of them alike), the median over the rounds reported. The figures go to
//! `quality.json` and `quality.md` (a Markdown table), and `quality.png`
//! plots quality against speed.

use std::path::{Path, PathBuf};

use framework::{GgufFile, LlamaShard, ShardSpec, WeightFormat};
use parallm::Engine;
use serde::Serialize;

use crate::bench::{latency, median, LatencyPlan};
use crate::files::AtomicFile;
use crate::perplexity::{self, KldMode, PerplexityPlan};
use crate::plot::{self, Canvas, PlotResult, FONT};
use crate::CliResult;

/// Arguments of `parallm bench quality`.
#[derive(clap::Args, Debug, Clone)]
pub struct QualityArgs {
    /// The base model (its weights are dequantized to f32 and run with
    /// f32 matmuls).
    #[arg(long, value_name = "FILE")]
    pub base: PathBuf,
    /// A variant as LABEL=FILE (repeatable), in the order of the table.
    #[arg(long = "variant", value_name = "LABEL=FILE", required = true)]
    pub variants: Vec<String>,
    /// The text to score.
    #[arg(long, short = 'f', value_name = "TEXT")]
    pub file: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Windows at most (default: as many as the text holds).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens of the batch-1 decode measurement.
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    /// Rounds of speed measurements over all variants (the median is
    /// reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Folder for quality.json, quality.md, quality.png and the base's
    /// distributions (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct VariantFigures {
    /// The label.
    pub label: String,
    /// The file.
    pub file: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Its perplexity on the text.
    pub ppl: f64,
    /// The perplexity's standard error.
    pub ppl_error: f64,
    /// Mean KL(base ‖ variant) per scored token (0 for the base).
    pub mean_kld: f64,
    /// Its standard error.
    pub mean_kld_error: f64,
    /// Share of positions where the variant's first choice is the base's.
    pub same_top: f64,
    /// Prefill tokens per second (median over the rounds).
    pub prefill_tok_s: f64,
    /// Batch-1 decode tokens per second (median over the rounds).
    pub decode_tok_s: f64,
}

/// Everything measured.
#[derive(Debug, Serialize)]
pub struct QualityReport {
    /// The text.
    pub text: PathBuf,
    /// Tokens per window.
    pub ctx: usize,
    /// Windows scored.
    pub chunks: usize,
    /// Prompt length of the prefill measurement.
    pub prompt_tokens: usize,
    /// Tokens of the decode measurement.
    pub decode_tokens: usize,
    /// Speed rounds.
    pub rounds: usize,
    /// Compute threads.
    pub threads: usize,
    /// The base, then the variants.
    pub rows: Vec<VariantFigures>,
}

/// Runs the comparison and writes its files.
pub fn run(args: &QualityArgs) -> CliResult<QualityReport> {
    let mut models: Vec<(String, PathBuf)> = vec![("base (f32)".into(), args.base.clone())];
    for v in &args.variants {
        let (label, file) = v
            .split_once('=')
            .filter(|(l, f)| !l.is_empty() && !f.is_empty())
            .ok_or_else(|| format!("--variant {v}: expected LABEL=FILE"))?;
        models.push((label.to_string(), PathBuf::from(file)));
    }
    for (label, file) in &models {
        if !file.is_file() {
            return Err(format!("{label}: {} is not a file", file.display()).into());
        }
    }
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let text = crate::calibrate::read_text(&args.file)?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let base_kld = args.out.join("base.kld");
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut rows = Vec::with_capacity(models.len());
    let mut chunks = 0;
    for (i, (label, file)) in models.iter().enumerate() {
        eprintln!("{label}: scoring {}", file.display());
        let (weights, kld) = match i {
            0 => (WeightFormat::F32, KldMode::Save(base_kld.clone())),
            _ => (WeightFormat::Auto, KldMode::Compare(base_kld.clone())),
        };
        let engine = Engine::builder()
            .model_path(file)
            .weights(weights)
            .build()
            .map_err(|e| format!("{label}: {e}"))?;
        let plan = PerplexityPlan {
            ctx: args.ctx,
            chunks: args.chunks,
            kld,
            json: None,
            progress,
        };
        let r = perplexity::perplexity(&engine, &text, &plan);
        engine.shutdown();
        let r = r.map_err(|e| format!("{label}: {e}"))?;
        chunks = r.chunks;
        let (mean_kld, mean_kld_error, same_top) = match &r.kld {
            Some(k) => (k.mean_kld, k.mean_kld_error, k.same_top),
            None => (0.0, 0.0, 1.0),
        };
        rows.push(VariantFigures {
            label: label.clone(),
            file: file.clone(),
            bytes: std::fs::metadata(file)?.len(),
            ppl: r.ppl,
            ppl_error: r.ppl_error,
            mean_kld,
            mean_kld_error,
            same_top,
            prefill_tok_s: 0.0,
            decode_tok_s: 0.0,
        });
    }
    measure_speed(args, &models, &mut rows)?;
    let report = QualityReport {
        text: args.file.clone(),
        ctx: args.ctx,
        chunks,
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        rounds: args.rounds,
        threads: framework::compute_threads(),
        rows,
    };
    let json = serde_json::to_string_pretty(&report)?;
    write_text(&args.out.join("quality.json"), &json)?;
    write_text(&args.out.join("quality.md"), &table(&report))?;
    let png = args.out.join("quality.png");
    plot::render_png(&png, (1200, 1000), |root| draw(&report, root))
        .map_err(|e| format!("cannot draw {}: {e}", png.display()))?;
    Ok(report)
}

/// Prefill and decode speed of every model, in rounds over all of them.
fn measure_speed(
    args: &QualityArgs,
    models: &[(String, PathBuf)],
    rows: &mut [VariantFigures],
) -> CliResult {
    let plan = LatencyPlan {
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.decode_tokens,
        batches: Vec::new(),
        batch_prompt_tokens: 0,
        batch_steps: 0,
        runs: 1,
    };
    let shards: Vec<LlamaShard> = models
        .iter()
        .enumerate()
        .map(|(i, (label, file))| {
            let format = if i == 0 {
                WeightFormat::F32
            } else {
                WeightFormat::Auto
            };
            GgufFile::open(file)
                .and_then(|f| LlamaShard::load(&f, ShardSpec::SINGLE, format))
                .map_err(|e| format!("{label}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    for (label, shard) in models.iter().map(|m| &m.0).zip(&shards) {
        let context = shard.config().context;
        if args.prompt_tokens + 1 > context || args.decode_tokens + 1 > context {
            return Err(
                format!("{label}: the benchmark lengths exceed its context of {context}").into(),
            );
        }
    }
    let pool = framework::threads::node_pool("quality", framework::compute_threads(), 0, 1)?;
    let mut samples = vec![(Vec::new(), Vec::new()); shards.len()];
    for round in 0..args.rounds {
        for ((label, shard), s) in models.iter().map(|m| &m.0).zip(&shards).zip(&mut samples) {
            eprintln!("round {}/{}: speed of {label}", round + 1, args.rounds);
            let r = framework::threads::run_in(&pool, || latency(shard, &plan, |_| {}))?;
            s.0.push(r.prefill_tok_s);
            s.1.push(r.decode_tok_s);
        }
    }
    for (row, (prefill, decode)) in rows.iter_mut().zip(samples) {
        row.prefill_tok_s = median(prefill);
        row.decode_tok_s = median(decode);
    }
    Ok(())
}

fn write_text(path: &Path, text: &str) -> CliResult {
    use std::io::Write as _;
    let mut f = AtomicFile::create(path)?;
    f.file().write_all(text.as_bytes())?;
    f.commit()
}

/// The report as a Markdown table; speeds also as a ratio to the first
/// variant's (the base's f32 matmuls are no reference for speed).
pub fn table(r: &QualityReport) -> String {
    let reference = r.rows.get(1).unwrap_or(&r.rows[0]);
    let mut out = format!(
        "{} windows of {} tokens of {}; speed: prefill {} tokens and batch-1 decode of {} tokens, {} threads, median of {} rounds; ratios against {}.\n\n",
        r.chunks,
        r.ctx,
        r.text.display(),
        r.prompt_tokens,
        r.decode_tokens,
        r.threads,
        r.rounds,
        reference.label
    );
    out.push_str(
        "| variant | bytes | PPL | mean KLD | same top | prefill tok/s | decode tok/s |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for v in &r.rows {
        out.push_str(&format!(
            "| {} | {} | {:.4} ± {:.4} | {:.6} ± {:.6} | {:.2}% | {:.1} ({:.2}×) | {:.1} ({:.2}×) |\n",
            v.label,
            v.bytes,
            v.ppl,
            v.ppl_error,
            v.mean_kld,
            v.mean_kld_error,
            100.0 * v.same_top,
            v.prefill_tok_s,
            v.prefill_tok_s / reference.prefill_tok_s.max(1e-9),
            v.decode_tok_s,
            v.decode_tok_s / reference.decode_tok_s.max(1e-9),
        ));
    }
    out
}

/// Two panels: mean KLD (log scale) against batch-1 decode speed and
/// against prefill speed; a labelled point per variant (the base, with no
/// divergence, is left out).
fn draw(r: &QualityReport, root: &Canvas<'_>) -> PlotResult {
    let root = root.titled(
        &format!(
            "Quality against speed: {} windows of {} tokens, {} threads",
            r.chunks, r.ctx, r.threads
        ),
        (FONT, 22),
    )?;
    let panels = root.split_evenly((2, 1));
    let points = |speed: fn(&VariantFigures) -> f64| -> Vec<(f64, f64, &str)> {
        r.rows
            .iter()
            .filter(|v| v.mean_kld > 0.0)
            .map(|v| (speed(v), v.mean_kld, v.label.as_str()))
            .collect()
    };
    labelled_panel(
        &panels[0],
        "Mean KL divergence from the base against batch-1 decode speed",
        ("decode tokens / s (batch 1)", "mean KLD (log)"),
        &points(|v| v.decode_tok_s),
    )?;
    labelled_panel(
        &panels[1],
        "Mean KL divergence from the base against prefill speed",
        ("prefill tokens / s", "mean KLD (log)"),
        &points(|v| v.prefill_tok_s),
    )
}

/// A scatter of labelled points on a log y axis.
fn labelled_panel(
    area: &Canvas<'_>,
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    points: &[(f64, f64, &str)],
) -> PlotResult {
    use plotters::prelude::*;
    if points.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, 0.0f64, f64::MAX, 0.0f64);
    for &(x, y, _) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let pad = (x1 - x0).max(x1 * 0.05) * 0.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 19))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(
            (x0 - pad).max(0.0)..x1 + 2.5 * pad,
            (y0 / 1.5..y1 * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()?;
    let blue = RGBColor(40, 90, 200);
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y, _)| Circle::new((x, y), 5, blue.filled())),
    )?;
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y, label)| Text::new(label.to_string(), (x, y), (FONT, 14).into_font())),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, kld: f64, speed: f64) -> VariantFigures {
        VariantFigures {
            label: label.into(),
            file: PathBuf::from(format!("{label}.gguf")),
            bytes: 100,
            ppl: 18.0 + 100.0 * kld,
            ppl_error: 0.8,
            mean_kld: kld,
            mean_kld_error: kld / 50.0,
            same_top: 1.0 - kld,
            prefill_tok_s: 10.0 * speed,
            decode_tok_s: speed,
        }
    }

    #[test]
    fn the_table_and_the_plot_hold_every_variant() {
        let report = QualityReport {
            text: PathBuf::from("GPL-3"),
            ctx: 512,
            chunks: 14,
            prompt_tokens: 512,
            decode_tokens: 128,
            rounds: 3,
            threads: 2,
            rows: vec![
                row("base (f32)", 0.0, 80.0),
                row("Q8_0", 0.0045, 200.0),
                row("Q4_0", 0.29, 300.0),
            ],
        };
        let t = table(&report);
        assert_eq!(t.lines().filter(|l| l.starts_with("| ")).count(), 4);
        assert!(
            t.contains("| Q4_0 | 100 | 47.0000 ± 0.8000 | 0.290000"),
            "{t}"
        );
        assert!(t.contains("300.0 (1.50×)"), "{t}");
        let dir = std::env::temp_dir().join(format!("quality-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("q.png");
        plot::render_png(&png, (600, 500), |root| draw(&report, root)).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_dir_all(dir);
    }
}
