//! The generation record: one line of a generations JSONL file, written by `generate` (and
//! every decoding method), read by `eval`, and extended with a `reward` by `reward score`.
//! One type for the writer and every reader.

use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::jsonl::open_maybe_gz;
use crate::{Error, Result};

/// One generated response. Only `prompt` and `response` are required when reading (a file
/// written by another tool may have just those); `generate` fills every field it knows.
/// Fields this type does not know are kept in `extra` and written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRecord {
    /// The prompt as the user gave it (without any `--prompt-prefix`): what rewards judge.
    pub prompt: String,
    /// Text the model saw before the prompt (the "+prompting" variant), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_prefix: Option<String>,
    /// The text the model decoded from, when it is not `prompt_prefix + prompt` (e.g. a chat
    /// rendering with an instruction as the system message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_prompt: Option<String>,
    /// The generation call (batch) the response came from; `seconds` is that call's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    pub response: String,
    /// Generated token ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_tokens: Option<usize>,
    /// `eos` or `length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Wall time of the generation call of this record's batch (model loading excluded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The decoding method (`plain`, `re-control`, `static-re`, `best-of-n`, `args`,
    /// `value-guided`), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// RE-Control's edits of this response, when it was controlled.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub control: Option<EditStats>,
    /// Best-of-N's candidates, when the response was chosen from several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_of: Option<BestOf>,
    /// Fields of the input this type does not know (kept by `reward score`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The reward of `prompt + truncated response`, once scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
}

/// Per-response statistics of the hidden-state edits (means over the decoding steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EditStats {
    pub edit_norm_mean: f64,
    pub edit_norm_max: f64,
    pub value_before_mean: f64,
    pub value_after_mean: f64,
}

/// The N samples best-of-N chose from: the response is `responses[chosen]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestOf {
    pub n: usize,
    /// Index of the returned sample (the first of the highest rewards).
    pub chosen: usize,
    /// Each sample's reward, in sample order (sample `j` of prompt `p` draws from random
    /// stream `p * n + j` of the seed).
    pub rewards: Vec<f64>,
    pub responses: Vec<String>,
}

impl GenerationRecord {
    /// A record of `prompt` and `response` with nothing else known.
    pub fn new(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            prompt_prefix: None,
            model_prompt: None,
            batch: None,
            response: response.into(),
            tokens: None,
            num_tokens: None,
            finish_reason: None,
            seconds: None,
            method: None,
            control: None,
            best_of: None,
            extra: serde_json::Map::new(),
            reward: None,
        }
    }
}

/// Reads a generations JSONL file (plain or gzip; blank lines skipped). A line that is not a
/// JSON object, or lacks a string `prompt` or `response`, is an error naming the file and line.
pub fn read_generations(path: &Path) -> Result<Vec<GenerationRecord>> {
    let mut records = Vec::new();
    for (i, line) in open_maybe_gz(path)?.lines().enumerate() {
        let record_error = |message: String| Error::Record {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let line = line.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let Ok(serde_json::Value::Object(object)) = serde_json::from_str(&line) else {
            return Err(record_error(
                "expected a JSON object with prompt and response".into(),
            ));
        };
        for field in ["prompt", "response"] {
            if !object.get(field).is_some_and(serde_json::Value::is_string) {
                return Err(record_error(format!("no string field {field:?}")));
            }
        }
        records.push(
            serde_json::from_value(serde_json::Value::Object(object))
                .map_err(|e| record_error(e.to_string()))?,
        );
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_line_round_trips_with_its_unknown_fields() {
        let line = r#"{"prompt":"p","response":"r","extra":1,"note":"x"}"#;
        let record: GenerationRecord = serde_json::from_str(line).expect("parse");
        assert_eq!(record.prompt, "p");
        assert_eq!(record.num_tokens, None);
        assert_eq!(record.control, None);
        assert_eq!(record.extra.len(), 2);
        assert_eq!(serde_json::to_string(&record).expect("json"), line);
    }

    #[test]
    fn a_full_record_keeps_its_field_order() {
        let record = GenerationRecord {
            prompt_prefix: Some("Be kind. ".into()),
            batch: Some(2),
            tokens: Some(vec![5, 6]),
            num_tokens: Some(2),
            finish_reason: Some("eos".into()),
            seconds: Some(0.5),
            control: Some(EditStats {
                edit_norm_mean: 1.0,
                edit_norm_max: 2.0,
                value_before_mean: -1.0,
                value_after_mean: 1.5,
            }),
            ..GenerationRecord::new("p", "r")
        };
        let text = serde_json::to_string(&record).expect("json");
        assert_eq!(
            text,
            r#"{"prompt":"p","prompt_prefix":"Be kind. ","batch":2,"response":"r","tokens":[5,6],"num_tokens":2,"finish_reason":"eos","seconds":0.5,"edit_norm_mean":1.0,"edit_norm_max":2.0,"value_before_mean":-1.0,"value_after_mean":1.5}"#
        );
        let back: GenerationRecord = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, record);
        let scored = GenerationRecord {
            reward: Some(0.25),
            ..back
        };
        assert!(serde_json::to_string(&scored)
            .expect("json")
            .ends_with(r#""value_after_mean":1.5,"reward":0.25}"#));
    }

    #[test]
    fn a_line_without_a_response_names_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("recontrol-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("g.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\":\"p\",\"response\":\"r\"}\n\n{\"prompt\":\"q\"}\n",
        )
        .expect("write");
        let err = read_generations(&path)
            .expect_err("missing response")
            .to_string();
        assert!(
            err.ends_with("g.jsonl:3: no string field \"response\""),
            "{err}"
        );
        std::fs::write(&path, "[1]\n").expect("write");
        let err = read_generations(&path)
            .expect_err("not an object")
            .to_string();
        assert!(
            err.ends_with("g.jsonl:1: expected a JSON object with prompt and response"),
            "{err}"
        );
        std::fs::write(
            &path,
            "{\"prompt\":\"p\",\"response\":\"r\",\"batch\":-1}\n",
        )
        .expect("write");
        let err = read_generations(&path).expect_err("bad batch").to_string();
        assert!(err.contains("g.jsonl:1: invalid value"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
