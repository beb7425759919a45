//! Turning rounds into figures: medians with min and max per server,
//! pair-by-pair ratios within a run, a Markdown table, JSON and an SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use crate::scenarios::RoundResult;
use crate::servers::ServerKind;

/// Median, min and max of one figure over rounds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`, or `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }
}

/// Everything a run produced.
#[derive(Debug, Serialize)]
pub struct Report {
    /// How the run was made.
    pub machine: String,
    /// The command line.
    pub command: String,
    /// Every round of every server.
    pub rounds: Vec<RoundResult>,
    /// Servers that were asked for but could not run, and why.
    pub skipped: Vec<String>,
}

type Key = (&'static str, &'static str);

impl Report {
    /// The results of `scenario`/`variant` for `server`.
    fn of(&self, key: Key, server: ServerKind) -> Vec<&RoundResult> {
        self.rounds
            .iter()
            .filter(|r| (r.scenario, r.variant) == key && r.server == server)
            .collect()
    }

    /// Scenario variants in the order they ran.
    fn keys(&self) -> Vec<Key> {
        let mut keys: Vec<Key> = Vec::new();
        for r in &self.rounds {
            if !keys.contains(&(r.scenario, r.variant)) {
                keys.push((r.scenario, r.variant));
            }
        }
        keys
    }

    fn servers(&self, key: Key) -> Vec<ServerKind> {
        let mut servers: Vec<ServerKind> = self
            .rounds
            .iter()
            .filter(|r| (r.scenario, r.variant) == key)
            .map(|r| r.server)
            .collect();
        servers.sort();
        servers.dedup();
        servers
    }

    /// The spread of `figure` for a server.
    pub fn spread(&self, key: Key, server: ServerKind, figure: &str) -> Option<Spread> {
        Spread::of(
            self.of(key, server)
                .iter()
                .filter_map(|r| r.figures.get(figure).copied()),
        )
    }

    /// The spread over rounds of `figure(a) / figure(b)`, paired round by
    /// round.
    pub fn ratio(&self, key: Key, a: ServerKind, b: ServerKind, figure: &str) -> Option<Spread> {
        let bs = self.of(key, b);
        Spread::of(self.of(key, a).iter().filter_map(|ra| {
            let rb = bs.iter().find(|rb| rb.round == ra.round)?;
            Some(ra.figures.get(figure)? / rb.figures.get(figure)?)
        }))
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Machine: {}  \nCommand: `{}`\n",
            self.machine, self.command
        );
        for skipped in &self.skipped {
            let _ = writeln!(md, "> {skipped}\n");
        }
        let keys = self.keys();
        let throughput: Vec<Key> = keys
            .iter()
            .copied()
            .filter(|k| {
                self.rounds
                    .iter()
                    .any(|r| (r.scenario, r.variant) == *k && r.figures.contains_key("rps"))
            })
            .collect();
        if !throughput.is_empty() {
            md.push_str("Throughput: medians over rounds, (min–max).\n\n");
            md.push_str("| scenario | settings | server | req/s | p50 ms | p99 ms | failed | client CPU | server CPU | peak RSS MiB |\n");
            md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
            for &key in &throughput {
                for server in self.servers(key) {
                    let cell = |figure: &str, digits: usize| {
                        self.spread(key, server, figure)
                            .map(|s| spread_cell(s, digits))
                            .unwrap_or_default()
                    };
                    let pct = |figure: &str| {
                        self.spread(key, server, figure)
                            .map(|s| format!("{:.0}%", s.median * 100.0))
                            .unwrap_or_default()
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        key.0,
                        key.1,
                        server.label(),
                        cell("rps", 0),
                        cell("p50_ms", 2),
                        cell("p99_ms", 2),
                        cell("failed", 0),
                        pct("client_cpu"),
                        pct("server_cpu"),
                        cell("peak_rss_mib", 0),
                    );
                }
            }
            md.push_str("\nRatios, paired round by round (median, min–max):\n\n");
            md.push_str("| scenario | settings | wasmhive / wasmtime req/s | wasmhive / wasmtime p99 | wasmhive / wasmtime peak RSS | wasmhive / native req/s |\n");
            md.push_str("|---|---|---|---|---|---|\n");
            for &key in &throughput {
                let r = |b, figure| {
                    self.ratio(key, ServerKind::Wasmhive, b, figure)
                        .map(|s| spread_cell(s, 2))
                        .unwrap_or_else(|| "–".into())
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} |",
                    key.0,
                    key.1,
                    r(ServerKind::Wasmtime, "rps"),
                    r(ServerKind::Wasmtime, "p99_ms"),
                    r(ServerKind::Wasmtime, "peak_rss_mib"),
                    r(ServerKind::Native, "rps"),
                );
            }
        }
        let others: Vec<Key> = keys
            .iter()
            .copied()
            .filter(|k| !throughput.contains(k))
            .collect();
        if !others.is_empty() {
            md.push_str("\nOther figures: medians over rounds, (min–max).\n\n");
            md.push_str(
                "| scenario | settings | server | figure | value |\n|---|---|---|---|---|\n",
            );
            for &key in &others {
                for server in self.servers(key) {
                    let figures: BTreeMap<&str, ()> = self
                        .of(key, server)
                        .iter()
                        .flat_map(|r| r.figures.keys().map(|k| (k.as_str(), ())))
                        .collect();
                    for figure in figures.keys() {
                        if let Some(s) = self.spread(key, server, figure) {
                            let _ = writeln!(
                                md,
                                "| {} | {} | {} | {} | {} |",
                                key.0,
                                key.1,
                                server.label(),
                                figure,
                                spread_cell(s, 2)
                            );
                        }
                    }
                }
            }
        }
        md
    }

    /// Writes `<dir>/<set>.md`, `<set>.json` and `<set>.svg`.
    pub fn write(&self, dir: &Path, set: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join(format!("{set}.md")),
            format!("# Bench results: {set}\n\n{}", self.markdown()),
        )?;
        std::fs::write(
            dir.join(format!("{set}.json")),
            serde_json::to_string_pretty(self)?,
        )?;
        self.chart(&dir.join(format!("{set}.svg")))
    }

    /// Grouped bars of req/s and p99 per scenario and server.
    fn chart(&self, path: &Path) -> anyhow::Result<()> {
        use plotters::prelude::*;

        let keys: Vec<Key> = self
            .keys()
            .into_iter()
            .filter(|k| {
                self.rounds
                    .iter()
                    .any(|r| (r.scenario, r.variant) == *k && r.figures.contains_key("rps"))
            })
            .collect();
        let servers = [
            ServerKind::Wasmhive,
            ServerKind::Wasmtime,
            ServerKind::Native,
        ];
        let colors = [
            RGBColor(230, 126, 34),
            RGBColor(52, 152, 219),
            RGBColor(127, 140, 141),
        ];
        let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let panels = root.split_evenly((2, 1));
        for (panel, (figure, title)) in panels.iter().zip([
            ("rps", "requests/s (median)"),
            ("p99_ms", "p99 latency, ms (median)"),
        ]) {
            let top = keys
                .iter()
                .flat_map(|&k| {
                    servers
                        .iter()
                        .filter_map(move |&s| self.spread(k, s, figure))
                })
                .map(|s| s.median)
                .fold(0.0f64, f64::max)
                .max(1e-3)
                * 1.1;
            let groups = keys.len().max(1);
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..groups as f64, 0f64..top)
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(groups * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = x.floor() as usize;
                    if (x - i as f64 - 0.5).abs() < 0.01 && i < keys.len() {
                        format!("{} ({})", keys[i].0, keys[i].1)
                    } else {
                        String::new()
                    }
                })
                .draw()
                .map_err(plot_error)?;
            for (si, server) in servers.iter().enumerate() {
                let bars = keys.iter().enumerate().filter_map(|(gi, &k)| {
                    let s = self.spread(k, *server, figure)?;
                    let x0 = gi as f64 + 0.1 + si as f64 * 0.27;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + 0.25, s.median)],
                        colors[si].filled(),
                    ))
                });
                chart
                    .draw_series(bars)
                    .map_err(plot_error)?
                    .label(server.label())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], colors[si].filled())
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_error)?;
        }
        root.present().map_err(plot_error)?;
        Ok(())
    }
}

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {error:?}")
}

fn spread_cell(s: Spread, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = digits)
}
