//! Figures, their statistics, and the report: `report.md`, `report.json`,
//! `report.svg` and the table printed at the end.
//!
//! A figure is measured once per round, and every round measures the
//! figure's baseline too, so that a figure is judged against a baseline that
//! ran on the same machine at the same moment: the ratios and differences are
//! taken per round, then summarised by their median. These machines are
//! shared and noisy; a median of interleaved rounds, with its min and max,
//! says how noisy.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use serde::Serialize;

/// What a figure should reach.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Goal {
    /// At most this much above the baseline, in the figure's unit.
    ExtraAtMost(f64),
    /// At least this ratio to the baseline.
    RatioAtLeast(f64),
    /// At most this ratio to the baseline.
    RatioAtMost(f64),
    /// The figure's extra over its baseline at most this many times the
    /// reference's extra over the same baseline, per round: what something
    /// costs against what a known operation costs on the same machine.
    ExtraAtMostOfReference(f64),
    /// At most this value.
    AtMost(f64),
    /// At least this value.
    AtLeast(f64),
    /// Within this many percent of zero (for errors in percent).
    WithinPercent(f64),
    /// Between these two values, both included.
    Between(f64, f64),
}

impl Goal {
    fn describe(self, unit: &str, reference: Option<&str>) -> String {
        match self {
            Self::ExtraAtMost(v) => format!("≤ +{v} {unit}"),
            Self::RatioAtLeast(v) => format!("≥ {v}× baseline"),
            Self::RatioAtMost(v) => format!("≤ {v}× baseline"),
            Self::ExtraAtMostOfReference(v) => format!(
                "extra ≤ {v}× the extra of {}",
                reference.unwrap_or("the reference")
            ),
            Self::AtMost(v) => format!("≤ {v} {unit}"),
            Self::AtLeast(v) => format!("≥ {v} {unit}"),
            Self::WithinPercent(v) => format!("within ±{v}%"),
            Self::Between(lo, hi) => format!("{lo}–{hi} {unit}"),
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub group: String,
    pub name: String,
    pub unit: String,
    /// One value per round.
    pub samples: Vec<f64>,
    /// The baseline's name and its value in the same rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<(String, Vec<f64>)>,
    /// Another figure's name and its value in the same rounds, for goals
    /// relative to it ([`Goal::ExtraAtMostOfReference`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<(String, Vec<f64>)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<Goal>,
    /// What the figure means, or why it is missing.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// Median, min and max.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// `None` for no values.
    #[must_use]
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            f64::midpoint(v[mid - 1], v[mid])
        };
        Some(Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

impl Figure {
    #[must_use]
    pub fn stats(&self) -> Option<Stats> {
        Stats::of(&self.samples)
    }

    fn paired(&self, f: impl Fn(f64, f64) -> f64) -> Option<Stats> {
        let (_, base) = self.baseline.as_ref()?;
        let values: Vec<f64> = self
            .samples
            .iter()
            .zip(base)
            .map(|(s, b)| f(*s, *b))
            .collect();
        Stats::of(&values)
    }

    /// The figure minus its baseline, per round.
    #[must_use]
    pub fn extra(&self) -> Option<Stats> {
        self.paired(|s, b| s - b)
    }

    /// The figure over its baseline, per round.
    #[must_use]
    pub fn ratio(&self) -> Option<Stats> {
        self.paired(|s, b| if b == 0.0 { f64::NAN } else { s / b })
    }

    /// Per round, the figure's extra over its baseline divided by the
    /// reference's extra over the same baseline.
    #[must_use]
    pub fn extra_of_reference(&self) -> Option<Stats> {
        let (_, base) = self.baseline.as_ref()?;
        let (_, reference) = self.reference.as_ref()?;
        let values: Vec<f64> = self
            .samples
            .iter()
            .zip(base)
            .zip(reference)
            .map(|((s, b), r)| {
                let of = r - b;
                if of.abs() < f64::EPSILON {
                    f64::NAN
                } else {
                    (s - b) / of
                }
            })
            .collect();
        Stats::of(&values)
    }

    /// The goal, and how far the figure is from it in the goal's terms when
    /// that is a ratio the other columns do not show.
    fn goal_text(&self) -> String {
        let Some(goal) = self.goal else {
            return String::new();
        };
        let reference = self.reference.as_ref().map(|(n, _)| n.as_str());
        let text = goal.describe(&self.unit, reference);
        match (goal, self.extra_of_reference()) {
            (Goal::ExtraAtMostOfReference(_), Some(r)) => format!("{text} (is {}×)", num(r.median)),
            _ => text,
        }
    }

    /// Whether the median meets the goal; `None` without a goal or data.
    #[must_use]
    pub fn met(&self) -> Option<bool> {
        let goal = self.goal?;
        Some(match goal {
            Goal::ExtraAtMost(v) => self.extra()?.median <= v,
            Goal::RatioAtLeast(v) => self.ratio()?.median >= v,
            Goal::RatioAtMost(v) => self.ratio()?.median <= v,
            Goal::ExtraAtMostOfReference(v) => self.extra_of_reference()?.median <= v,
            Goal::AtMost(v) => self.stats()?.median <= v,
            Goal::AtLeast(v) => self.stats()?.median >= v,
            Goal::WithinPercent(v) => self.stats()?.median.abs() <= v,
            Goal::Between(lo, hi) => (lo..=hi).contains(&self.stats()?.median),
        })
    }
}

/// A table of a group's details that do not fit the figures' columns,
/// printed under the group's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Table {
    pub group: String,
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn markdown(&self, out: &mut String) {
        let _ = writeln!(out, "\n{}\n", self.title);
        let _ = writeln!(out, "| {} |", self.columns.join(" | "));
        let _ = writeln!(out, "|{}", "---|".repeat(self.columns.len()));
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
    }
}

/// Collects the figures of a run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: BTreeMap<String, String>,
    pub quick: bool,
    pub rounds: usize,
    pub figures: Vec<Figure>,
    pub tables: Vec<Table>,
}

/// Formats a number with a precision that suits its size.
#[must_use]
pub fn num(v: f64) -> String {
    if v.is_nan() {
        "–".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    /// Adds a figure, or the samples of an existing one (same group, name).
    pub fn add(&mut self, figure: Figure) {
        if let Some(f) = self
            .figures
            .iter_mut()
            .find(|f| f.group == figure.group && f.name == figure.name)
        {
            f.samples.extend(figure.samples);
            if let (Some((_, base)), Some((_, more))) = (&mut f.baseline, figure.baseline) {
                base.extend(more);
            }
            if let (Some((_, reference)), Some((_, more))) = (&mut f.reference, figure.reference) {
                reference.extend(more);
            }
        } else {
            self.figures.push(figure);
        }
    }

    /// The report as Markdown: one table per group.
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# mmesh benchmark report\n");
        let _ = writeln!(
            out,
            "{} round(s){}. Every figure is the median of its rounds, with min–max; `vs baseline` compares each round with the baseline measured in the same round.\n",
            self.rounds,
            if self.quick {
                ", quick mode: these numbers only show that the harness runs"
            } else {
                ""
            }
        );
        for (k, v) in &self.machine {
            let _ = writeln!(out, "- {k}: {v}");
        }
        let mut groups: Vec<&str> = Vec::new();
        for f in &self.figures {
            if !groups.contains(&f.group.as_str()) {
                groups.push(&f.group);
            }
        }
        for group in groups {
            let _ = writeln!(out, "\n## {group}\n");
            let _ = writeln!(
                out,
                "| scenario | median | min–max | baseline | vs baseline | goal | met |"
            );
            let _ = writeln!(out, "|---|---:|---:|---|---:|---|:-:|");
            for f in self.figures.iter().filter(|f| f.group == group) {
                let _ = writeln!(out, "{}", row(f));
            }
            let notes: Vec<&Figure> = self
                .figures
                .iter()
                .filter(|f| f.group == group && !f.note.is_empty())
                .collect();
            if !notes.is_empty() {
                let _ = writeln!(out);
                for f in notes {
                    let _ = writeln!(out, "- *{}*: {}", f.name, f.note);
                }
            }
            for table in self.tables.iter().filter(|t| t.group == group) {
                table.markdown(&mut out);
            }
        }
        out
    }

    /// Writes report.md, report.json and report.svg into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::write(dir.join("report.svg"), self.svg())?;
        Ok(())
    }

    /// A bar chart per group: each figure's median against its baseline.
    #[must_use]
    pub fn svg(&self) -> String {
        const W: f64 = 900.0;
        const LABEL: f64 = 330.0;
        const BAR_H: f64 = 18.0;
        let mut body = String::new();
        let mut y = 20.0;
        let mut groups: Vec<&str> = Vec::new();
        for f in &self.figures {
            if !groups.contains(&f.group.as_str()) {
                groups.push(&f.group);
            }
        }
        for group in groups {
            let figures: Vec<&Figure> = self
                .figures
                .iter()
                .filter(|f| f.group == group && f.stats().is_some())
                .collect();
            if figures.is_empty() {
                continue;
            }
            let unit = &figures[0].unit;
            let max = figures
                .iter()
                .filter_map(|f| f.stats())
                .map(|s| s.max)
                .fold(0.0_f64, f64::max)
                .max(1e-9);
            let _ = writeln!(
                body,
                r#"<text x="10" y="{y}" font-weight="bold">{} ({})</text>"#,
                xml(group),
                xml(unit)
            );
            y += 10.0;
            for f in figures {
                let s = f.stats().unwrap_or_default();
                let w = (W - LABEL - 80.0) * s.median / max;
                let color = match f.met() {
                    Some(true) => "#2a9d8f",
                    Some(false) => "#e76f51",
                    None => "#8d99ae",
                };
                let _ = writeln!(
                    body,
                    r#"<text x="10" y="{}" font-size="12">{}</text><rect x="{LABEL}" y="{y}" width="{w:.1}" height="{}" fill="{color}"/><text x="{:.1}" y="{}" font-size="12">{}</text>"#,
                    y + 13.0,
                    xml(&f.name),
                    BAR_H - 4.0,
                    LABEL + w + 4.0,
                    y + 13.0,
                    num(s.median)
                );
                y += BAR_H;
            }
            y += 16.0;
        }
        format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{:.0}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>{body}<text x="10" y="{:.0}" font-size="11" fill="#555">green: goal met, red: goal missed, grey: no goal</text></svg>
"##,
            y + 20.0,
            y + 8.0
        )
    }

    /// The table for the terminal.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut last_group = "";
        for f in &self.figures {
            if f.group != last_group {
                let _ = writeln!(out, "\n== {}", f.group);
                last_group = &f.group;
            }
            let s = f.stats();
            let value = s.map_or_else(
                || "n/a".to_owned(),
                |s| {
                    format!(
                        "{} {} [{}–{}]",
                        num(s.median),
                        f.unit,
                        num(s.min),
                        num(s.max)
                    )
                },
            );
            let vs = versus(f);
            let goal = match (f.goal, f.met()) {
                (Some(_), Some(true)) => format!("  goal {} ✓", f.goal_text()),
                (Some(_), Some(false)) => format!("  goal {} ✗", f.goal_text()),
                (Some(_), None) => format!("  goal {}", f.goal_text()),
                (None, _) => String::new(),
            };
            let _ = writeln!(out, "  {:<46} {:<32} {vs}{goal}", f.name, value);
        }
        for table in &self.tables {
            let _ = writeln!(out, "\n== {}: {}", table.group, table.title);
            let _ = writeln!(out, "  {}", table.columns.join(" | "));
            for row in &table.rows {
                let _ = writeln!(out, "  {}", row.join(" | "));
            }
        }
        out
    }
}

fn versus(f: &Figure) -> String {
    match (&f.baseline, f.extra(), f.ratio()) {
        (Some((name, _)), Some(e), Some(r)) => {
            format!(
                "{}{} {} / {}× vs {name}",
                if e.median >= 0.0 { "+" } else { "" },
                num(e.median),
                f.unit,
                num(r.median)
            )
        }
        _ => String::new(),
    }
}

fn row(f: &Figure) -> String {
    let (median, range) = f.stats().map_or_else(
        || ("n/a".to_owned(), String::new()),
        |s| {
            (
                format!("{} {}", num(s.median), f.unit),
                format!("{}–{}", num(s.min), num(s.max)),
            )
        },
    );
    let base = f
        .baseline
        .as_ref()
        .map_or_else(String::new, |(n, _)| n.clone());
    let vs = match (f.extra(), f.ratio()) {
        (Some(e), Some(r)) => format!(
            "{}{} ({}×)",
            if e.median >= 0.0 { "+" } else { "" },
            num(e.median),
            num(r.median)
        ),
        _ => String::new(),
    };
    let goal = f.goal_text();
    let met = match f.met() {
        Some(true) => "✓",
        Some(false) => "✗",
        None => "",
    };
    format!(
        "| {} | {median} | {range} | {base} | {vs} | {goal} | {met} |",
        f.name
    )
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Facts about the machine, for the report header.
#[must_use]
pub fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    m.insert(
        "kernel".into(),
        read("/proc/sys/kernel/osrelease").trim().to_owned(),
    );
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown", |l| l.trim_start_matches([' ', '\t', ':']));
    m.insert("cpu".into(), model.to_owned());
    m.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map_or(0, std::num::NonZero::get)
            .to_string(),
    );
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse::<u64>()
        .unwrap_or(0);
    m.insert("memory".into(), format!("{} GiB", mem / 1024 / 1024));
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    m.insert("commit".into(), commit);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    m.insert("date".into(), date);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(samples: &[f64], base: &[f64], goal: Goal) -> Figure {
        Figure {
            group: "g".into(),
            name: "f".into(),
            unit: "ns/pkt".into(),
            samples: samples.to_vec(),
            baseline: Some(("drop".into(), base.to_vec())),
            reference: None,
            goal: Some(goal),
            note: String::new(),
        }
    }

    #[test]
    fn statistics_pair_rounds() {
        let f = figure(
            &[30.0, 50.0, 40.0],
            &[10.0, 30.0, 15.0],
            Goal::ExtraAtMost(24.0),
        );
        assert_eq!(
            f.stats(),
            Some(Stats {
                median: 40.0,
                min: 30.0,
                max: 50.0
            })
        );
        // Per-round differences 20, 20, 25: median 20, not 40 - 15.
        assert!((f.extra().unwrap().median - 20.0).abs() < 1e-9);
        assert_eq!(f.met(), Some(true));
        let f = figure(&[3.0, 4.0], &[10.0, 10.0], Goal::RatioAtLeast(0.7));
        assert!((f.ratio().unwrap().median - 0.35).abs() < 1e-9);
        assert_eq!(f.met(), Some(false));
    }

    #[test]
    fn goals_relative_to_a_reference() {
        // Extras over the baseline 20, 30 against the reference's 40, 40:
        // 0.5 and 0.75, median 0.625.
        let mut f = figure(
            &[30.0, 40.0],
            &[10.0, 10.0],
            Goal::ExtraAtMostOfReference(0.6),
        );
        f.reference = Some(("lookup".into(), vec![50.0, 50.0]));
        assert!((f.extra_of_reference().unwrap().median - 0.625).abs() < 1e-9);
        assert_eq!(f.met(), Some(false));
        assert!(
            f.goal_text()
                .contains("extra ≤ 0.6× the extra of lookup (is 0.62×)")
        );
        let f = figure(&[0.93], &[1.0], Goal::Between(0.9, 1.0));
        assert_eq!(f.met(), Some(true));
        let f = figure(&[3.0], &[1.0], Goal::RatioAtMost(2.0));
        assert_eq!(f.met(), Some(false));
    }

    #[test]
    fn report_renders() {
        let mut r = Report {
            rounds: 3,
            ..Report::default()
        };
        r.add(figure(&[30.0], &[10.0], Goal::ExtraAtMost(60.0)));
        r.add(figure(&[32.0], &[11.0], Goal::ExtraAtMost(60.0)));
        assert_eq!(r.figures.len(), 1, "samples of the same figure are merged");
        assert_eq!(r.figures[0].samples, vec![30.0, 32.0]);
        let md = r.markdown();
        assert!(
            md.contains(
                "| f | 31.0 ns/pkt | 30.0–32.0 | drop | +20.5 (2.95×) | ≤ +60 ns/pkt | ✓ |"
            ),
            "{md}"
        );
        assert!(r.svg().starts_with("<svg"));
        assert!(r.table().contains("goal ≤ +60 ns/pkt ✓"));
    }
}
