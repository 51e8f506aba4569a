//! Rule-based rewards from a small TOML spec: weighted word lists, regular expressions and
//! length terms. For objectives that need no model, and for tests with a known right answer.
//!
//! ```toml
//! bias = 0.0
//!
//! [[term]]
//! kind = "words"            # occurrences of these words (whole words, any case)
//! words = ["sorry", "cannot"]
//! weight = 1.0
//!
//! [[term]]
//! kind = "regex"            # matches of a pattern
//! pattern = "(?i)\\bkill"
//! weight = -2.0
//!
//! [[term]]
//! kind = "length"           # length in words (or "chars"), or its distance to a target
//! unit = "words"
//! target = 40
//! weight = -0.01
//! on = "response"           # each term reads the response (default) or prompt + response
//! ```

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;

use crate::{Error, Result, RewardSource};

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Target {
    #[default]
    Response,
    Text,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Unit {
    #[default]
    Words,
    Chars,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
enum TermSpec {
    Words {
        words: Vec<String>,
        weight: f64,
        #[serde(default)]
        on: Target,
    },
    Regex {
        pattern: String,
        weight: f64,
        #[serde(default)]
        on: Target,
    },
    Length {
        #[serde(default)]
        unit: Unit,
        target: Option<f64>,
        weight: f64,
        #[serde(default)]
        on: Target,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    bias: f64,
    #[serde(default)]
    term: Vec<TermSpec>,
}

#[derive(Debug)]
enum Feature {
    Matches(Regex),
    Length { unit: Unit, target: Option<f64> },
}

#[derive(Debug)]
struct Term {
    feature: Feature,
    weight: f64,
    on: Target,
}

/// A reward computed from rules.
#[derive(Debug)]
pub struct RuleReward {
    path: PathBuf,
    bias: f64,
    terms: Vec<Term>,
}

impl RuleReward {
    /// Reads and checks a rules file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses a rules spec (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let spec: Spec = toml::from_str(text)
            .map_err(|e| Error::invalid(path, e.to_string().replace('\n', " ")))?;
        if spec.term.is_empty() {
            return Err(Error::invalid(path, "no [[term]] given"));
        }
        let finite = |value: f64, setting: &'static str| -> Result<f64> {
            if value.is_finite() {
                Ok(value)
            } else {
                Err(Error::NotFinite {
                    path: path.to_owned(),
                    setting,
                    value,
                })
            }
        };
        let bias = finite(spec.bias, "bias")?;
        let terms = spec
            .term
            .into_iter()
            .map(|t| {
                Ok(match t {
                    TermSpec::Words { words, weight, on } => {
                        if words.is_empty() || words.iter().any(|w| w.trim().is_empty()) {
                            return Err(Error::invalid(path, "a words term needs non-empty words"));
                        }
                        let alternatives: Vec<String> =
                            words.iter().map(|w| regex::escape(w.trim())).collect();
                        let pattern = format!(r"(?i)\b(?:{})\b", alternatives.join("|"));
                        Term {
                            feature: Feature::Matches(
                                Regex::new(&pattern)
                                    .map_err(|e| Error::invalid(path, e.to_string()))?,
                            ),
                            weight: finite(weight, "weight")?,
                            on,
                        }
                    }
                    TermSpec::Regex {
                        pattern,
                        weight,
                        on,
                    } => Term {
                        feature: Feature::Matches(Regex::new(&pattern).map_err(|e| {
                            Error::invalid(
                                path,
                                format!(
                                    "pattern {pattern:?}: {}",
                                    e.to_string().replace('\n', " ")
                                ),
                            )
                        })?),
                        weight: finite(weight, "weight")?,
                        on,
                    },
                    TermSpec::Length {
                        unit,
                        target,
                        weight,
                        on,
                    } => Term {
                        feature: Feature::Length { unit, target },
                        weight: finite(weight, "weight")?,
                        on,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            path: path.to_owned(),
            bias,
            terms,
        })
    }

    /// The reward of one (prompt, response) pair (the response cut by the shared rule).
    pub fn reward(&self, prompt: &str, response: &str) -> f64 {
        let response = recontrol_data::truncate_response(response);
        let text = format!("{prompt}{response}");
        self.bias
            + self
                .terms
                .iter()
                .map(|t| {
                    let input = match t.on {
                        Target::Response => response,
                        Target::Text => text.as_str(),
                    };
                    let value = match &t.feature {
                        Feature::Matches(re) => re.find_iter(input).count() as f64,
                        Feature::Length { unit, target } => {
                            let n = match unit {
                                Unit::Words => input.split_whitespace().count(),
                                Unit::Chars => input.chars().count(),
                            } as f64;
                            target.map_or(n, |t| (n - t).abs())
                        }
                    };
                    t.weight * value
                })
                .sum::<f64>()
    }
}

impl RewardSource for RuleReward {
    fn score(&mut self, pairs: &[(String, String)]) -> Result<Vec<f32>> {
        Ok(pairs
            .iter()
            .map(|(p, r)| self.reward(p, r) as f32)
            .collect())
    }

    fn describe(&self) -> String {
        format!("rules {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<RuleReward> {
        RuleReward::parse(text, Path::new("rules.toml"))
    }

    #[test]
    fn hand_computed_rewards() -> Result<()> {
        let r = rules(
            r#"
            bias = 0.5
            [[term]]
            kind = "words"
            words = ["sorry", "can't"]
            weight = 2.0
            [[term]]
            kind = "regex"
            pattern = "(?i)kill"
            weight = -3.0
            [[term]]
            kind = "length"
            target = 4
            weight = -0.5
            [[term]]
            kind = "length"
            unit = "chars"
            on = "text"
            weight = 0.01
            "#,
        )?;
        // Response "Sorry, I can't. Killing is wrong." (the next turn is cut off):
        // words: "Sorry", "can't" = 2 -> +4; regex: "Kill" = 1 -> -3; length 6 words, |6-4| -> -1;
        // chars of "Q:" + response = 2 + 34 = 36 -> +0.36; bias 0.5.
        let got = r.reward("Q:", " Sorry, I can't. Killing is wrong.\n\nHuman: ok");
        assert!((got - (0.5 + 4.0 - 3.0 - 1.0 + 0.36)).abs() < 1e-9, "{got}");
        // Whole words only: "sorrying" is no match.
        assert!((r.reward("", "sorrying") - (0.5 - 1.5 + 0.08)).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn bad_specs_are_named() {
        let cases = [
            ("", "no [[term]]"),
            ("[[term]]\nkind = \"vibes\"\nweight = 1.0", "vibes"),
            (
                "[[term]]\nkind = \"regex\"\npattern = \"(\"\nweight = 1.0",
                "pattern \"(\"",
            ),
            (
                "[[term]]\nkind = \"words\"\nwords = []\nweight = 1.0",
                "non-empty words",
            ),
            (
                "[[term]]\nkind = \"length\"\nweight = nan",
                "weight must be finite",
            ),
            ("[[term]]\nkind = \"length\"\nweigth = 1.0", "weigth"),
        ];
        for (text, want) in cases {
            let err = rules(text).expect_err(want).to_string();
            assert!(
                err.starts_with("rules.toml: ") && err.contains(want),
                "{err} lacks {want}"
            );
        }
    }
}
