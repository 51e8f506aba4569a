//! The report's forms: `report.json` (the [`Report`] and how the run was made), `report.md` (a
//! Markdown table and what the numbers mean) and `chart.svg` (reward with its 95% interval and
//! diversity per method).

use std::path::Path;

use recontrol_io::write_atomic;

use serde::Serialize;
use svg::node::element::{Line, Rectangle, Text};
use svg::Document;

use crate::{Error, MethodReport, Report, Result};

/// The comparison table (Markdown).
pub fn table(methods: &[MethodReport]) -> String {
    let mut s = String::from(
        "| method | avg reward [95% CI] | gain vs base [95% CI] | diversity | coherence | win vs reference | win vs base | words | s/token |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in methods {
        let win_ref = m
            .win_rate_vs_reference
            .map_or("-".to_owned(), |w| format!("{:.1}%", 100.0 * w));
        s.push_str(&format!(
            "| {} | {:.3} [{:.3}, {:.3}] | {:+.3} [{:+.3}, {:+.3}] | {:.3} | {:.3} | {} | {:.1}% | {:.1} | {:.4} |\n",
            m.name,
            m.avg_reward,
            m.avg_reward_ci95[0],
            m.avg_reward_ci95[1],
            m.reward_gain_vs_base,
            m.reward_gain_vs_base_ci95[0],
            m.reward_gain_vs_base_ci95[1],
            m.diversity,
            m.coherence,
            win_ref,
            100.0 * m.win_rate_vs_base,
            m.mean_response_words,
            m.seconds_per_token,
        ));
    }
    s
}

/// `report.md`: the table and what the numbers mean.
pub fn markdown(report: &Report) -> String {
    format!(
        "# recontrol eval\n\n{} prompts; reward: {}; coherence: {}.\n\n{}\n\
         Rewards are scored on prompt + response, the response cut by one truncation rule for\n\
         every method. Intervals: 95% percentile bootstrap ({} resamples); gains are paired by\n\
         prompt. Diversity = prod over n = 2..4 of (1 - rep_n / 100), averaged over responses.\n\
         Win rates count ties as half.\n\n![reward and diversity](chart.svg)\n",
        report.prompts,
        report.reward,
        report.coherence_encoder,
        table(&report.methods),
        report.bootstrap.resamples,
    )
}

/// `chart.svg`: two panels, average reward with its interval and diversity, a bar per method.
pub fn chart(methods: &[MethodReport]) -> String {
    let (w, h, pad) = (360.0, 260.0, 40.0);
    let mut doc = Document::new()
        .set("viewBox", (0, 0, 2.0 * w, h + 40.0))
        .set("font-family", "sans-serif")
        .set("font-size", 11);
    // Per panel: its title and, per method, (value, interval low, interval high).
    let panels = [
        (
            "average reward (95% CI)",
            methods
                .iter()
                .map(|m| (m.avg_reward, m.avg_reward_ci95[0], m.avg_reward_ci95[1]))
                .collect::<Vec<_>>(),
        ),
        (
            "diversity",
            methods
                .iter()
                .map(|m| (m.diversity, m.diversity, m.diversity))
                .collect(),
        ),
    ];
    for (p, (title, values)) in panels.iter().enumerate() {
        let x0 = p as f64 * w;
        let lo = values.iter().map(|v| v.1.min(0.0)).fold(0.0, f64::min);
        let hi = values.iter().map(|v| v.2.max(0.0)).fold(0.0, f64::max);
        let span = if hi - lo > 1e-12 { hi - lo } else { 1.0 };
        let y = |v: f64| pad + (hi - v) / span * (h - 2.0 * pad);
        doc = doc.add(
            Text::new(*title)
                .set("x", x0 + w / 2.0)
                .set("y", 20)
                .set("text-anchor", "middle")
                .set("font-size", 13),
        );
        doc = doc.add(
            Line::new()
                .set("x1", x0 + pad)
                .set("x2", x0 + w - pad / 2.0)
                .set("y1", y(0.0))
                .set("y2", y(0.0))
                .set("stroke", "#444"),
        );
        let slot = (w - 1.5 * pad) / methods.len().max(1) as f64;
        for (i, (m, (v, l, u))) in methods.iter().zip(values).enumerate() {
            let cx = x0 + pad + slot * (i as f64 + 0.5);
            let (top, bottom) = (y(v.max(0.0)), y(v.min(0.0)));
            doc = doc.add(
                Rectangle::new()
                    .set("x", cx - slot * 0.3)
                    .set("y", top)
                    .set("width", slot * 0.6)
                    .set("height", (bottom - top).max(0.5))
                    .set(
                        "fill",
                        ["#7f8c8d", "#3498db", "#e67e22", "#27ae60", "#8e44ad"][i % 5],
                    ),
            );
            if u > l {
                doc = doc.add(
                    Line::new()
                        .set("x1", cx)
                        .set("x2", cx)
                        .set("y1", y(*u))
                        .set("y2", y(*l))
                        .set("stroke", "#000"),
                );
            }
            doc = doc
                .add(
                    Text::new(format!("{v:.3}"))
                        .set("x", cx)
                        .set("y", y(v.max(*u).max(0.0)) - 4.0)
                        .set("text-anchor", "middle"),
                )
                .add(
                    Text::new(m.name.clone())
                        .set("x", cx)
                        .set("y", h - pad / 2.0 + 14.0)
                        .set("text-anchor", "middle"),
                );
        }
    }
    doc.to_string()
}

/// `report.json` as written: the report, then how the run was made (`run`'s fields, e.g. the
/// arguments and provenance).
#[derive(Serialize)]
struct ReportFile<'a, R: Serialize> {
    #[serde(flatten)]
    report: &'a Report,
    #[serde(flatten)]
    run: &'a R,
}

/// Writes `report.json`, `report.md` and `chart.svg` into the folder `out` (made if missing),
/// each under a temporary name renamed into place when complete. `run` (a struct or map)
/// adds its fields to `report.json`.
pub fn write_report<R: Serialize>(out: &Path, report: &Report, run: &R) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_owned(),
        source,
    })?;
    let mut json = serde_json::to_vec_pretty(&ReportFile { report, run })?;
    json.push(b'\n');
    write_atomic(&out.join("report.json"), &json)?;
    write_atomic(&out.join("report.md"), markdown(report).as_bytes())?;
    write_atomic(&out.join("chart.svg"), chart(&report.methods).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(name: &str, reward: f64, win_ref: Option<f64>) -> MethodReport {
        MethodReport {
            name: name.into(),
            file: format!("{name}.jsonl").into(),
            responses: 2,
            avg_reward: reward,
            avg_reward_ci95: [reward - 0.5, reward + 0.5],
            reward_gain_vs_base: 0.25,
            reward_gain_vs_base_ci95: [-0.125, 0.5],
            diversity: 0.75,
            rep_2: 10.0,
            rep_3: 5.0,
            rep_4: 0.0,
            coherence: 0.5,
            win_rate_vs_reference: win_ref,
            win_rate_vs_base: 0.625,
            mean_response_words: 12.25,
            mean_response_tokens: 16.0,
            seconds: 2.0,
            seconds_per_token: 0.0625,
        }
    }

    #[test]
    fn the_table_has_a_row_per_method_with_its_numbers() {
        let table = table(&[method("base", 1.0, Some(0.5)), method("rc", -2.0, None)]);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[2],
            "| base | 1.000 [0.500, 1.500] | +0.250 [-0.125, +0.500] | 0.750 | 0.500 | 50.0% | 62.5% | 12.2 | 0.0625 |"
        );
        assert!(rows[3].starts_with("| rc | -2.000 [-2.500, -1.500] |"));
        assert!(rows[3].contains("| - | 62.5% |"), "{}", rows[3]);
    }

    #[test]
    fn the_chart_has_a_bar_and_a_label_per_method_and_panel() {
        let svg = chart(&[method("base", 1.0, None), method("rc", 2.0, None)]);
        assert_eq!(svg.matches("<rect").count(), 4);
        let labels = svg
            .lines()
            .filter(|l| l.trim() == "rc" || l.ends_with(">rc</text>"));
        assert_eq!(labels.count(), 2, "{svg}");
    }
}
