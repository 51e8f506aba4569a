//! The report's forms: `report.json` (the [`Report`] and how the run was made), `report.md` (a
//! Markdown table and what the numbers mean) and `chart.svg` (reward with its 95% interval, the
//! judge's reward when there is one, diversity and coherence per method), drawn with plotters;
//! and [`knob_chart`], metrics against a knob (the sweep's figure).

use std::path::Path;

use recontrol_io::write_atomic;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Serialize;

use crate::{Error, MethodReport, Report, Result};

/// The comparison table (Markdown). With a judge (any method has [`MethodReport::judge`]),
/// the judge's reward and gain get their own columns and the win rates are the judge's.
pub fn table(methods: &[MethodReport]) -> String {
    let judged = methods.iter().any(|m| m.judge.is_some());
    let interval = |v: f64, [lo, hi]: [f64; 2]| format!("{v:.3} [{lo:.3}, {hi:.3}]");
    let gain = |v: f64, [lo, hi]: [f64; 2]| format!("{v:+.3} [{lo:+.3}, {hi:+.3}]");
    let mut header = vec!["method", "avg reward [95% CI]", "gain vs base [95% CI]"];
    if judged {
        header.extend(["judge reward [95% CI]", "judge gain vs base [95% CI]"]);
    }
    header.extend(["diversity", "coherence"]);
    header.extend(if judged {
        ["win vs reference (judge)", "win vs base (judge)"]
    } else {
        ["win vs reference", "win vs base"]
    });
    header.extend(["words", "s/token", "slowdown"]);
    let mut s = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for m in methods {
        let mut row = vec![
            m.name.clone(),
            interval(m.avg_reward, m.avg_reward_ci95),
            gain(m.reward_gain_vs_base, m.reward_gain_vs_base_ci95),
        ];
        if judged {
            row.extend(match &m.judge {
                Some(j) => [
                    interval(j.avg_reward, j.avg_reward_ci95),
                    gain(j.gain_vs_base, j.gain_vs_base_ci95),
                ],
                None => ["-".to_owned(), "-".to_owned()],
            });
        }
        row.extend([
            format!("{:.3}", m.diversity),
            format!("{:.3}", m.coherence),
            m.win_rate_vs_reference
                .map_or("-".to_owned(), |w| format!("{:.1}%", 100.0 * w)),
            format!("{:.1}%", 100.0 * m.win_rate_vs_base),
            format!("{:.1}", m.mean_response_words),
            format!("{:.4}", m.seconds_per_token),
            m.slowdown_vs_base
                .map_or("-".to_owned(), |x| format!("{x:.2}x")),
        ]);
        s.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    s
}

/// `report.md`: the table and what the numbers mean.
pub fn markdown(report: &Report) -> String {
    let (judge, wins) = match &report.judge {
        Some(judge) => (
            format!("; judge: {judge}"),
            "Win rates are the judge's and count ties as half",
        ),
        None => (String::new(), "Win rates count ties as half"),
    };
    format!(
        "# recontrol eval\n\n{} prompts; reward: {}{judge}; coherence: {}.\n\n{}\n\
         Rewards are scored on prompt + response, the response cut by one truncation rule for\n\
         every method. Intervals: 95% percentile bootstrap ({} resamples); gains are paired by\n\
         prompt. Diversity = prod over n = 2..4 of (1 - rep_n / 100), averaged over responses.\n\
         {wins}. Slowdown: seconds per token over the base's.\n\n![reward and diversity](chart.svg)\n",
        report.prompts,
        report.reward,
        report.coherence_encoder,
        table(&report.methods),
        report.bootstrap.resamples,
    )
}

/// `chart.svg`: a panel per metric (average reward with its 95% interval, the judge's reward
/// with its interval when there is a judge, diversity, coherence), a horizontal bar per method
/// with the method names on the vertical axis, the base on top.
pub fn chart(methods: &[MethodReport]) -> Result<String> {
    let bar = |v: f64, ci: Option<[f64; 2]>| Bar { value: v, ci };
    let mut panels = vec![(
        "average reward (95% CI)",
        methods
            .iter()
            .map(|m| bar(m.avg_reward, Some(m.avg_reward_ci95)))
            .collect::<Vec<_>>(),
    )];
    if methods.iter().any(|m| m.judge.is_some()) {
        panels.push((
            "judge reward (95% CI)",
            methods
                .iter()
                .map(|m| match &m.judge {
                    Some(j) => bar(j.avg_reward, Some(j.avg_reward_ci95)),
                    None => bar(f64::NAN, None),
                })
                .collect(),
        ));
    }
    panels.push((
        "diversity",
        methods.iter().map(|m| bar(m.diversity, None)).collect(),
    ));
    panels.push((
        "coherence",
        methods.iter().map(|m| bar(m.coherence, None)).collect(),
    ));
    let names: Vec<&str> = methods.iter().map(|m| m.name.as_str()).collect();
    bar_panels(&names, &panels)
}

/// A method's bar: its value and, when known, its interval.
#[derive(Debug, Clone, Copy)]
struct Bar {
    value: f64,
    ci: Option<[f64; 2]>,
}

// Text sizes (px) of the charts' titles and labels.
const TITLE_SIZE: f64 = 18.0;
const LABEL_SIZE: f64 = 15.0;
/// A generous width of a character of the label font, as a share of its size: the SVG backend
/// cannot measure text, so the label area is sized by this estimate.
const CHAR_WIDTH: f64 = 0.62;
/// Height of one method's row in the bar panels.
const ROW_HEIGHT: u32 = 30;

/// A colour per method (cycling past eight).
const COLORS: [RGBColor; 8] = [
    RGBColor(0x7f, 0x8c, 0x8d),
    RGBColor(0x34, 0x98, 0xdb),
    RGBColor(0xe6, 0x7e, 0x22),
    RGBColor(0x27, 0xae, 0x60),
    RGBColor(0x8e, 0x44, 0xad),
    RGBColor(0xc0, 0x39, 0x2b),
    RGBColor(0x16, 0xa0, 0x85),
    RGBColor(0xd4, 0xac, 0x0d),
];

/// The minor grid lines.
const LIGHT_GREY: RGBColor = RGBColor(0xf0, 0xf0, 0xf0);

/// An axis number: at most four decimals, trailing zeros dropped, never "-0".
fn tick(v: &f64) -> String {
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// Draws `panels` (title, a bar per name) two to a row as SVG text.
fn bar_panels(names: &[&str], panels: &[(&str, Vec<Bar>)]) -> Result<String> {
    let n = names.len().max(1);
    let longest = names.iter().map(|s| s.chars().count()).max().unwrap_or(0);
    let label_area = (longest as f64 * LABEL_SIZE * CHAR_WIDTH).ceil() as u32 + 16;
    let (panel_w, panel_h) = (360 + label_area, 90 + ROW_HEIGHT * n as u32);
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(cols);
    let size = (panel_w * cols as u32, panel_h * rows as u32);
    // Row `seg` from the bottom holds method `n - 1 - seg`: the base on top.
    let segment = |i: usize| n - 1 - i;
    let label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(seg) | SegmentValue::Exact(seg) if *seg < n => names
            .get(n - 1 - seg)
            .map_or(String::new(), |s| s.to_string()),
        _ => String::new(),
    };
    render(size, |root| {
        for (area, (title, bars)) in root.split_evenly((rows, cols)).iter().zip(panels) {
            let (lo, hi) = bar_range(bars);
            let mut chart = ChartBuilder::on(area)
                .caption(*title, ("sans-serif", TITLE_SIZE))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(label_area)
                .build_cartesian_2d(lo..hi, (0..n - 1).into_segmented())
                .map_err(chart_error)?;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n)
                .y_label_formatter(&label)
                .x_labels(5)
                .x_label_formatter(&tick)
                .light_line_style(LIGHT_GREY)
                .label_style(("sans-serif", LABEL_SIZE))
                .draw()
                .map_err(chart_error)?;
            let thickness = ROW_HEIGHT / 5;
            let drawn = || bars.iter().enumerate().filter(|(_, b)| b.value.is_finite());
            chart
                .draw_series(drawn().map(|(i, b)| {
                    let seg = segment(i);
                    let mut rect = Rectangle::new(
                        [
                            (0.0, SegmentValue::Exact(seg)),
                            (b.value, SegmentValue::Exact(seg + 1)),
                        ],
                        COLORS[i % COLORS.len()].filled(),
                    );
                    rect.set_margin(thickness, thickness, 0, 0);
                    rect
                }))
                .map_err(chart_error)?;
            chart
                .draw_series(drawn().filter_map(|(i, b)| {
                    let [l, u] =
                        b.ci.filter(|[l, u]| l.is_finite() && u.is_finite() && u > l)?;
                    Some(ErrorBar::new_horizontal(
                        SegmentValue::CenterOf(segment(i)),
                        l,
                        b.value,
                        u,
                        BLACK.stroke_width(1),
                        8,
                    ))
                }))
                .map_err(chart_error)?;
            chart
                .draw_series(drawn().map(|(i, b)| {
                    let end = b.ci.map_or(b.value, |[_, u]| u.max(b.value)).max(0.0);
                    EmptyElement::at((end, SegmentValue::CenterOf(segment(i))))
                        + Text::new(
                            format!("{:.3}", b.value),
                            (6, 0),
                            ("sans-serif", LABEL_SIZE)
                                .into_font()
                                .color(&BLACK)
                                .pos(Pos::new(HPos::Left, VPos::Center)),
                        )
                }))
                .map_err(chart_error)?;
        }
        Ok(())
    })
}

/// The value axis of a bar panel: zero, every finite value and interval end, with room on the
/// right for the value labels.
fn bar_range(bars: &[Bar]) -> (f64, f64) {
    let ends = bars.iter().flat_map(|b| {
        [
            b.value,
            b.ci.map_or(b.value, |c| c[0]),
            b.ci.map_or(b.value, |c| c[1]),
        ]
    });
    let (lo, hi) = ends
        .filter(|v| v.is_finite())
        .fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = if hi - lo > 1e-12 { hi - lo } else { 1.0 };
    let left = if lo < 0.0 { lo - 0.05 * span } else { lo };
    (left, hi + 0.3 * span)
}

/// A line chart of metrics against a knob (e.g. reward, diversity and coherence against the
/// controller's step size): a panel per series, x = the knob's values `xs`, each series a line
/// through its points (a non-finite value leaves a gap), `chosen` marked by a dashed vertical
/// line. Returns the SVG text.
pub fn knob_chart(
    title: &str,
    knob: &str,
    xs: &[f64],
    series: &[(&str, Vec<f64>)],
    chosen: Option<f64>,
) -> Result<String> {
    if xs.is_empty() || xs.iter().any(|x| !x.is_finite()) {
        return Err(Error::KnobValues {
            knob: knob.to_owned(),
            values: xs.to_vec(),
        });
    }
    if let Some((name, ys)) = series.iter().find(|(_, ys)| ys.len() != xs.len()) {
        return Err(Error::KnobSeriesLength {
            series: (*name).to_owned(),
            len: ys.len(),
            knob_values: xs.len(),
        });
    }
    let (xlo, xhi) = padded(xs.iter().copied().chain(chosen));
    let cols = series.len().clamp(1, 3);
    let rows = series.len().div_ceil(cols).max(1);
    let (panel_w, panel_h) = (380, 300);
    let size = (panel_w * cols as u32, panel_h * rows as u32 + 40);
    render(size, |root| {
        let root = root
            .titled(title, ("sans-serif", TITLE_SIZE + 2.0))
            .map_err(chart_error)?;
        let areas = root.split_evenly((rows, cols));
        for (i, (area, (name, ys))) in areas.iter().zip(series).enumerate() {
            let (ylo, yhi) = padded(ys.iter().copied());
            let mut chart = ChartBuilder::on(area)
                .caption(*name, ("sans-serif", TITLE_SIZE))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(xlo..xhi, ylo..yhi)
                .map_err(chart_error)?;
            chart
                .configure_mesh()
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&tick)
                .y_label_formatter(&tick)
                .light_line_style(LIGHT_GREY)
                .x_desc(knob)
                .label_style(("sans-serif", LABEL_SIZE))
                .axis_desc_style(("sans-serif", LABEL_SIZE))
                .draw()
                .map_err(chart_error)?;
            let color = COLORS[(i + 1) % COLORS.len()];
            let points: Vec<(f64, f64)> = xs.iter().copied().zip(ys.iter().copied()).collect();
            // Runs of finite points, each its own line.
            for run in points.split(|(_, y)| !y.is_finite()) {
                chart
                    .draw_series(LineSeries::new(run.iter().copied(), color.stroke_width(2)))
                    .map_err(chart_error)?;
            }
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|(_, y)| y.is_finite())
                        .map(|&p| Circle::new(p, 4, color.filled())),
                )
                .map_err(chart_error)?;
            if let Some(x) = chosen {
                chart
                    .draw_series(DashedLineSeries::new(
                        [(x, ylo), (x, yhi)],
                        6,
                        4,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(chart_error)?;
            }
        }
        Ok(())
    })
}

/// The finite values' range with 8% room on each side (a unit around a single value; 0..1
/// when there is none).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = if hi - lo > 1e-12 {
        hi - lo
    } else {
        lo.abs().max(1.0)
    };
    (lo - 0.08 * span, hi + 0.08 * span)
}

/// Draws on a white SVG canvas of `size` pixels and returns the SVG text.
fn render(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>,
) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        draw(&root)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

fn chart_error(e: impl std::fmt::Display) -> Error {
    Error::Chart(e.to_string())
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
    write_atomic(&out.join("chart.svg"), chart(&report.methods)?.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JudgeMetrics;

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
            slowdown_vs_base: Some(1.5),
            judge: None,
            policy_win_rate_vs_reference: None,
            policy_win_rate_vs_base: None,
        }
    }

    fn judged(name: &str, reward: f64, judge: f64) -> MethodReport {
        MethodReport {
            judge: Some(JudgeMetrics {
                avg_reward: judge,
                avg_reward_ci95: [judge - 0.25, judge + 0.25],
                gain_vs_base: -0.5,
                gain_vs_base_ci95: [-0.75, -0.25],
            }),
            win_rate_vs_base: 0.25,
            policy_win_rate_vs_base: Some(0.625),
            ..method(name, reward, Some(0.125))
        }
    }

    #[test]
    fn the_table_has_a_row_per_method_with_its_numbers() {
        let table = table(&[
            method("base", 1.0, Some(0.5)),
            MethodReport {
                slowdown_vs_base: None,
                ..method("rc", -2.0, None)
            },
        ]);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[0],
            "| method | avg reward [95% CI] | gain vs base [95% CI] | diversity | coherence | win vs reference | win vs base | words | s/token | slowdown |"
        );
        assert_eq!(rows[1], format!("|{}", "---|".repeat(10)));
        assert_eq!(
            rows[2],
            "| base | 1.000 [0.500, 1.500] | +0.250 [-0.125, +0.500] | 0.750 | 0.500 | 50.0% | 62.5% | 12.2 | 0.0625 | 1.50x |"
        );
        assert!(rows[3].starts_with("| rc | -2.000 [-2.500, -1.500] |"));
        assert!(rows[3].contains("| - | 62.5% |"), "{}", rows[3]);
        assert!(rows[3].ends_with("| 0.0625 | - |"), "{}", rows[3]);
    }

    #[test]
    fn with_a_judge_the_table_has_its_columns_and_its_win_rates() {
        let table = table(&[judged("base", 1.0, 3.0), judged("rc", 2.0, -1.0)]);
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(
            rows[0],
            "| method | avg reward [95% CI] | gain vs base [95% CI] | judge reward [95% CI] | judge gain vs base [95% CI] | diversity | coherence | win vs reference (judge) | win vs base (judge) | words | s/token | slowdown |"
        );
        assert_eq!(
            rows[3],
            "| rc | 2.000 [1.500, 2.500] | +0.250 [-0.125, +0.500] | -1.000 [-1.250, -0.750] | -0.500 [-0.750, -0.250] | 0.750 | 0.500 | 12.5% | 25.0% | 12.2 | 0.0625 | 1.50x |"
        );
    }

    /// The `<text>` elements of an SVG: (x, y, font size, text).
    fn svg_texts(svg: &str) -> Vec<(f64, f64, f64, String)> {
        let attr = |tag: &str, name: &str| -> f64 {
            let at = tag.find(&format!(" {name}=\"")).expect(name) + name.len() + 3;
            let end = tag[at..].find('"').expect("quote");
            tag[at..at + end].parse().expect("number")
        };
        svg.split("<text")
            .skip(1)
            .map(|t| {
                let (tag, rest) = t.split_once('>').expect("tag");
                let text = rest.split("</text>").next().expect("text").trim();
                (
                    attr(tag, "x"),
                    attr(tag, "y"),
                    attr(tag, "font-size"),
                    text.to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_chart_has_a_bar_and_a_label_per_method_and_panel() {
        let svg = chart(&[method("base", 1.0, None), method("rc", 2.0, None)]).expect("chart");
        assert!(svg.starts_with("<svg"), "{svg}");
        // The background, then a bar per method in each of three panels (reward, diversity,
        // coherence).
        assert_eq!(svg.matches("<rect").count(), 1 + 3 * 2, "{svg}");
        let texts = svg_texts(&svg);
        for name in ["base", "rc"] {
            assert_eq!(
                texts.iter().filter(|t| t.3 == name).count(),
                3,
                "{name}: {svg}"
            );
        }
        for title in ["average reward (95% CI)", "diversity", "coherence"] {
            assert!(texts.iter().any(|t| t.3 == title), "{title}");
        }
        assert!(!svg.contains("judge reward"));
        // Each method's value is written beside its bar.
        assert!(texts.iter().any(|t| t.3 == "2.000"), "{svg}");

        let svg = chart(&[judged("base", 1.0, 3.0), judged("rc", 2.0, -1.0)]).expect("chart");
        assert_eq!(svg.matches("<rect").count(), 1 + 4 * 2, "{svg}");
        let texts = svg_texts(&svg);
        assert!(texts.iter().any(|t| t.3 == "judge reward (95% CI)"));
        assert!(
            texts.iter().any(|t| t.3 == "-1.000"),
            "the judge's value: {svg}"
        );
        assert_eq!(texts.iter().filter(|t| t.3 == "rc").count(), 4);
    }

    #[test]
    fn eight_long_method_names_do_not_overlap() {
        let names = [
            "base",
            "prompting",
            "static-re",
            "best-of-n",
            "args",
            "value-guided",
            "re-control",
            "re-control+prompting",
        ];
        let methods: Vec<MethodReport> = names
            .iter()
            .enumerate()
            .map(|(i, n)| method(&format!("{n} (a long label)"), i as f64 - 2.0, None))
            .collect();
        let svg = chart(&methods).expect("chart");
        let width: f64 = {
            let at = svg.find("width=\"").expect("width") + 7;
            svg[at..at + svg[at..].find('"').expect("quote")]
                .parse()
                .expect("number")
        };
        let labels: Vec<(f64, f64, f64, String)> = svg_texts(&svg)
            .into_iter()
            .filter(|t| methods.iter().any(|m| m.name == t.3))
            .collect();
        assert_eq!(
            labels.len(),
            3 * names.len(),
            "a label per method and panel"
        );
        for (i, a) in labels.iter().enumerate() {
            // Labels end at x (anchored at their end); at a generous character width each fits
            // in its panel's column (two columns).
            let left = a.0 - a.3.chars().count() as f64 * a.2 * CHAR_WIDTH;
            let column = if a.0 < width / 2.0 { 0.0 } else { width / 2.0 };
            assert!(left >= column, "{a:?} runs out of its panel");
            for b in &labels[i + 1..] {
                if (a.0 - b.0).abs() < 1.0 {
                    assert!((a.1 - b.1).abs() >= a.2.max(b.2), "{a:?} and {b:?} overlap");
                }
            }
        }
    }

    #[test]
    fn ticks_are_short_and_never_negative_zero() {
        assert_eq!(tick(&-0.0), "0");
        assert_eq!(tick(&-0.00001), "0");
        assert_eq!(tick(&0.5), "0.5");
        assert_eq!(tick(&-1.0), "-1");
        assert_eq!(tick(&120.0), "120");
        assert_eq!(tick(&0.00125), "0.0013");
    }

    #[test]
    fn knob_charts_have_a_panel_per_series_and_mark_the_choice() {
        let xs = [0.0, 0.5, 1.0, 2.0];
        let series = [
            ("reward", vec![1.0, 1.5, 1.75, 1.25]),
            ("diversity", vec![0.8, 0.75, f64::NAN, 0.5]),
            ("coherence", vec![0.6, 0.6, 0.55, 0.4]),
        ];
        let svg = knob_chart("sweep", "alpha", &xs, &series, Some(1.0)).expect("chart");
        let texts = svg_texts(&svg);
        for title in ["sweep", "reward", "diversity", "coherence"] {
            assert_eq!(texts.iter().filter(|t| t.3 == title).count(), 1, "{title}");
        }
        assert_eq!(texts.iter().filter(|t| t.3 == "alpha").count(), 3);
        // A point per finite value.
        assert_eq!(svg.matches("<circle").count(), 4 + 3 + 4, "{svg}");
        let without = knob_chart("sweep", "alpha", &xs, &series, None).expect("chart");
        assert!(svg.matches("<polyline").count() > without.matches("<polyline").count());

        let err = knob_chart("s", "alpha", &xs, &[("reward", vec![1.0])], None).expect_err("short");
        assert_eq!(
            err.to_string(),
            "knob chart: series \"reward\" has 1 values for 4 knob values"
        );
        let err = knob_chart("s", "alpha", &[], &[], None).expect_err("no knob values");
        assert_eq!(
            err.to_string(),
            "knob chart: alpha needs finite values, got []"
        );
    }
}
