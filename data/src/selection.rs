//! Which records of a dataset a stage uses ([`PromptSelection`]: a side of the seeded split, a
//! limit, a job-array shard), and the prompts file (`recontrol data prompts`): one
//! [`PromptLine`] per selected prompt, read by `generate --prompts` and `eval --reference`.

use serde::{Deserialize, Serialize};

use crate::datasets::{Dataset, PromptRecord};
use crate::format::{render_prompt, ChatRenderer, PromptFormat};
use crate::split::{Split, SplitSpec};
use crate::{Error, Result};

/// A job-array shard: `K/N` takes records K, K+N, K+2N, ... (K from 0 to N-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("expected K/N, got {s:?}"))?;
        let index: usize = k
            .parse()
            .map_err(|_| format!("K in {s:?} is not a number"))?;
        let count: usize = n
            .parse()
            .map_err(|_| format!("N in {s:?} is not a number"))?;
        if count == 0 || index >= count {
            return Err(format!("expected 0 <= K < N, got {s:?}"));
        }
        Ok(Self { index, count })
    }
}

/// Which prompts of a dataset a stage uses: a side of the seeded split, the first `limit` of
/// it, and of those every `shard.count`-th from `shard.index`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptSelection {
    pub split: Split,
    /// Seed of the split (a prompt's side depends only on its text and this seed).
    pub split_seed: u64,
    /// Share of prompts on the test side.
    pub test_fraction: f64,
    pub limit: Option<usize>,
    pub shard: Option<Shard>,
}

impl Default for PromptSelection {
    fn default() -> Self {
        Self {
            split: Split::Train,
            split_seed: 0,
            test_fraction: 0.1,
            limit: None,
            shard: None,
        }
    }
}

/// The records of `dataset` that `selection` picks, in file order.
pub fn select_prompts<'a>(
    dataset: &'a Dataset,
    selection: &PromptSelection,
) -> Result<Vec<&'a PromptRecord>> {
    if !(0.0..=1.0).contains(&selection.test_fraction) {
        return Err(Error::TestFraction(selection.test_fraction));
    }
    let spec = SplitSpec {
        seed: selection.split_seed,
        test_fraction: selection.test_fraction,
    };
    let mut records = spec.select(&dataset.prompts, selection.split);
    if let Some(limit) = selection.limit {
        records.truncate(limit);
    }
    if let Some(shard) = selection.shard {
        records = records
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % shard.count == shard.index)
            .map(|(_, r)| r)
            .collect();
    }
    Ok(records)
}

/// One line of a prompts file: the prompt as the model gets it, its record index in the
/// dataset, and the dataset's preferred response where the data has pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLine {
    pub prompt: String,
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The same prompt rendered with an instruction (a chat template's system message, or
    /// text before the prompt): what the "+prompting" variant decodes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructed: Option<String>,
}

/// How the prompts of a prompts file are rendered.
#[derive(Clone, Copy)]
pub struct LineRendering<'a> {
    pub format: PromptFormat,
    /// Also render each prompt with this instruction ([`PromptLine::instructed`]).
    pub instruction: Option<&'a str>,
    /// The model's chat template, for [`PromptFormat::ChatTemplate`].
    pub chat: Option<&'a dyn ChatRenderer>,
}

impl std::fmt::Debug for LineRendering<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineRendering")
            .field("format", &self.format)
            .field("instruction", &self.instruction)
            .field("chat", &self.chat.is_some())
            .finish()
    }
}

impl<'a> LineRendering<'a> {
    /// Rendering in `format` without instruction or chat template.
    pub fn plain(format: PromptFormat) -> Self {
        Self {
            format,
            instruction: None,
            chat: None,
        }
    }
}

/// The prompts file of `dataset`: the selected records rendered as `rendering` says, each
/// with its reference response when the data has one.
pub fn prompt_lines(
    dataset: &Dataset,
    selection: &PromptSelection,
    rendering: &LineRendering<'_>,
) -> Result<Vec<PromptLine>> {
    let chosen: std::collections::HashMap<usize, &str> = dataset
        .pairs
        .iter()
        .flatten()
        .map(|p| (p.prompt.index, p.chosen.as_str()))
        .collect();
    select_prompts(dataset, selection)?
        .into_iter()
        .map(|r| {
            let render =
                |instruction| render_prompt(rendering.format, r, instruction, rendering.chat);
            Ok(PromptLine {
                prompt: render(None)?,
                index: r.index,
                reference: chosen.get(&r.index).map(|c| (*c).to_owned()),
                instructed: rendering.instruction.map(|i| render(Some(i))).transpose()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse() {
        assert_eq!("0/3".parse(), Ok(Shard { index: 0, count: 3 }));
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!("a/2".parse::<Shard>().is_err());
    }

    #[test]
    fn selection_takes_the_side_then_the_limit_then_the_shard() {
        let lines: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"prompt": "question {i}"}}"#))
            .collect();
        let dir = std::env::temp_dir().join(format!("recontrol-sel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("p.jsonl");
        std::fs::write(&path, lines.join("\n")).expect("write");
        let dataset = Dataset::read(&path, &crate::ReadOptions::default()).expect("read");
        let all = PromptSelection {
            split: Split::All,
            ..PromptSelection::default()
        };
        assert_eq!(select_prompts(&dataset, &all).expect("all").len(), 40);
        let test = PromptSelection {
            split: Split::Test,
            test_fraction: 0.5,
            ..PromptSelection::default()
        };
        let test_side = select_prompts(&dataset, &test).expect("test");
        let train_side = select_prompts(
            &dataset,
            &PromptSelection {
                split: Split::Train,
                ..test.clone()
            },
        )
        .expect("train");
        assert_eq!(test_side.len() + train_side.len(), 40);
        let sharded = PromptSelection {
            limit: Some(7),
            shard: Some(Shard { index: 1, count: 3 }),
            ..test.clone()
        };
        let picked: Vec<usize> = select_prompts(&dataset, &sharded)
            .expect("shard")
            .iter()
            .map(|r| r.index)
            .collect();
        let expected: Vec<usize> = test_side[..7]
            .iter()
            .skip(1)
            .step_by(3)
            .map(|r| r.index)
            .collect();
        assert_eq!(picked, expected);
        let bad = PromptSelection {
            test_fraction: 1.5,
            ..PromptSelection::default()
        };
        assert!(select_prompts(&dataset, &bad).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn prompt_lines_carry_the_reference_of_pairs() {
        let dir = std::env::temp_dir().join(format!("recontrol-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("hh.jsonl");
        std::fs::write(
            &path,
            r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}"#,
        )
        .expect("write");
        let dataset = Dataset::read(&path, &crate::ReadOptions::default()).expect("read");
        let all = PromptSelection {
            split: Split::All,
            ..PromptSelection::default()
        };
        let lines =
            prompt_lines(&dataset, &all, &LineRendering::plain(PromptFormat::Hh)).expect("lines");
        assert_eq!(
            lines,
            [PromptLine {
                prompt: "\n\nHuman: hi\n\nAssistant:".into(),
                index: 0,
                reference: Some("hello".into()),
                instructed: None,
            }]
        );
        let rendering = LineRendering {
            instruction: Some("Be kind."),
            ..LineRendering::plain(PromptFormat::Hh)
        };
        let instructed = prompt_lines(&dataset, &all, &rendering).expect("lines");
        assert_eq!(
            instructed[0].instructed.as_deref(),
            Some("Be kind.\n\nHuman: hi\n\nAssistant:")
        );
        assert_eq!(
            serde_json::to_string(&lines[0]).expect("json"),
            r#"{"prompt":"\n\nHuman: hi\n\nAssistant:","index":0,"reference":"hello"}"#
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
