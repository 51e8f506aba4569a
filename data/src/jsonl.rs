//! JSON Lines files: one JSON object per line, blank lines ignored.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Reads the string field `field` of every record of a JSONL file.
pub fn read_prompts(path: &Path, field: &str) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut prompts = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(&line).map_err(|source| Error::Json {
            path: path.to_owned(),
            line: line_no,
            source,
        })?;
        let record_error = |message: String| Error::Record {
            path: path.to_owned(),
            line: line_no,
            message,
        };
        match record.get(field) {
            Some(Value::String(s)) => prompts.push(s.clone()),
            Some(other) => {
                return Err(record_error(format!(
                    "field {field:?} is {}, expected a string",
                    kind_of(other)
                )))
            }
            None => return Err(record_error(format!("record has no field {field:?}"))),
        }
    }
    if prompts.is_empty() {
        return Err(Error::Empty {
            path: path.to_owned(),
        });
    }
    Ok(prompts)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), text).expect("write");
        f
    }

    #[test]
    fn reads_a_field_and_skips_blank_lines() -> Result<()> {
        let f = file("{\"prompt\": \"a\", \"x\": 1}\n\n{\"prompt\": \"b\"}\n");
        assert_eq!(read_prompts(f.path(), "prompt")?, vec!["a", "b"]);
        Ok(())
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let cases = [
            ("{\"prompt\": \"a\"}\n{oops\n", ":2: malformed JSON"),
            (
                "{\"prompt\": 3}\n",
                ":1: field \"prompt\" is a number, expected a string",
            ),
            ("{\"text\": \"a\"}\n", ":1: record has no field \"prompt\""),
            ("\n\n", ": no records"),
        ];
        for (text, want) in cases {
            let f = file(text);
            let err = read_prompts(f.path(), "prompt")
                .expect_err(want)
                .to_string();
            assert!(err.starts_with(&f.path().display().to_string()), "{err}");
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }
}
