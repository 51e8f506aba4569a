//! JSON Lines files (plain or gzip-compressed): one JSON object per line, blank lines ignored.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// Opens a file for reading, decompressing it if it starts with the gzip magic bytes.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io)?;
    let file = std::fs::File::open(path).map_err(io)?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        ))))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

/// One record and the line it came from (1-based).
#[derive(Debug, Clone)]
pub struct Line {
    pub number: usize,
    pub value: Value,
}

/// Records of a JSONL file. A line that is not a JSON object is an error naming file:line, or
/// with `skip_bad` is counted in the second result and left out.
pub fn read_lines(path: &Path, skip_bad: bool) -> Result<(Vec<Line>, usize)> {
    let mut records = Vec::new();
    let mut skipped = 0;
    for (i, line) in open_maybe_gz(path)?.lines().enumerate() {
        let number = i + 1;
        let line = line.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(value @ Value::Object(_)) => records.push(Line { number, value }),
            Ok(_) if skip_bad => skipped += 1,
            Ok(other) => {
                return Err(Error::Record {
                    path: path.to_owned(),
                    line: number,
                    message: format!("expected a JSON object, found {}", kind_of(&other)),
                })
            }
            Err(_) if skip_bad => skipped += 1,
            Err(source) => {
                return Err(Error::Json {
                    path: path.to_owned(),
                    line: number,
                    source,
                })
            }
        }
    }
    Ok((records, skipped))
}

/// The string field `field` of a record, or an error naming file:line.
pub fn string_field<'a>(path: &Path, line: &'a Line, field: &str) -> Result<&'a str> {
    let record_error = |message: String| Error::Record {
        path: path.to_owned(),
        line: line.number,
        message,
    };
    match line.value.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(record_error(format!(
            "field {field:?} is {}, expected a string",
            kind_of(other)
        ))),
        None => Err(record_error(format!("record has no field {field:?}"))),
    }
}

/// Reads the string field `field` of every record of a JSONL file.
pub fn read_prompts(path: &Path, field: &str) -> Result<Vec<String>> {
    let (lines, _) = read_lines(path, false)?;
    if lines.is_empty() {
        return Err(Error::Empty {
            path: path.to_owned(),
        });
    }
    lines
        .iter()
        .map(|line| string_field(path, line, field).map(str::to_owned))
        .collect()
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
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
    use std::io::Write;

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
    fn reads_gzip() -> Result<()> {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(f.path()).expect("create"),
            flate2::Compression::default(),
        );
        gz.write_all(b"{\"prompt\": \"zipped\"}\n").expect("write");
        gz.finish().expect("finish");
        assert_eq!(read_prompts(f.path(), "prompt")?, vec!["zipped"]);
        Ok(())
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let cases = [
            ("{\"prompt\": \"a\"}\n{oops\n", ":2: malformed JSON"),
            ("[1]\n", ":1: expected a JSON object, found an array"),
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

    #[test]
    fn skip_bad_counts_what_it_skips() -> Result<()> {
        let f = file("{\"a\": 1}\n{oops\n[2]\n{\"a\": 2}\n");
        let (lines, skipped) = read_lines(f.path(), true)?;
        assert_eq!(skipped, 2);
        assert_eq!(lines.iter().map(|l| l.number).collect::<Vec<_>>(), [1, 4]);
        Ok(())
    }
}
