//! The model's tokenizer (`tokenizer.json`) and its optional chat template
//! (`tokenizer_config.json` `chat_template`, or `chat_template.jinja` as transformers 5 writes it).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// One chat message for a chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A tokenizer with the special tokens and chat template of its model directory.
#[derive(Debug)]
pub struct LmTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    /// Special token strings by name (`bos_token`, `eos_token`, `unk_token`, `pad_token`), as
    /// chat templates see them.
    special: Vec<(String, String)>,
}

impl LmTokenizer {
    /// Loads `tokenizer.json` and, where present, `tokenizer_config.json` and
    /// `chat_template.jinja` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "tokenizer.json",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            crate::config::read_json(&config_path)?
        } else {
            Value::Null
        };
        let special = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|&name| token_string(config.get(name)?).map(|t| (name.to_owned(), t)))
            .collect();
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else {
            match config.get("chat_template") {
                Some(Value::String(t)) => Some(t.clone()),
                // A list of named templates: take the default one.
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
                _ => None,
            }
        };
        Ok(Self {
            inner,
            path,
            chat_template,
            special,
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. a
    /// leading `<s>`), as transformers does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Text of `ids`, special tokens left out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&id| u32::try_from(id).map_err(|_| self.error(format!("invalid token id {id}"))))
            .collect::<Result<_>>()?;
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| self.error(e))
    }

    /// Whether `other` maps every token (added tokens included) to the same id: token ids of
    /// one are then valid, with the same meaning, for the other.
    pub fn same_vocabulary(&self, other: &LmTokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// A special token string (`"bos_token"`, `"eos_token"`, ...) from `tokenizer_config.json`.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    /// Whether the model directory has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template(...,
    /// tokenize=False)` does (Jinja with `trim_blocks` and `lstrip_blocks`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(format!(
                "{} has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)",
                self.path.parent().unwrap_or(Path::new(".")).display()
            ))
        })?;
        render_chat_template(template, messages, add_generation_prompt, &self.special)
    }
}

impl recontrol_data::ChatRenderer for LmTokenizer {
    fn render_chat(&self, messages: &[recontrol_data::Turn]) -> recontrol_data::Result<String> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|t| ChatMessage {
                role: t.role.as_str().to_owned(),
                content: t.text.clone(),
            })
            .collect();
        self.apply_chat_template(&messages, true)
            .map_err(|e| recontrol_data::Error::ChatTemplate {
                source: Box::new(e),
            })
    }
}

/// A special token as written in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Renders a Hugging Face chat template with minijinja, set up like transformers' sandboxed
/// Jinja environment (trim/lstrip blocks, loop controls, Python string methods,
/// `raise_exception`).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    special: &[(String, String)],
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    let mut ctx = serde_json::Map::new();
    ctx.insert(
        "messages".to_owned(),
        serde_json::to_value(messages).map_err(|e| Error::ChatTemplate(e.to_string()))?,
    );
    ctx.insert(
        "add_generation_prompt".to_owned(),
        Value::Bool(add_generation_prompt),
    );
    for (name, token) in special {
        ctx.insert(name.clone(), Value::String(token.clone()));
    }
    env.get_template("chat")
        .and_then(|t| t.render(minijinja::Value::from(minijinja::value::Serde(&ctx))))
        .map_err(|e| Error::ChatTemplate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: content.to_owned(),
        }
    }

    #[test]
    fn renders_like_hf_jinja() -> Result<()> {
        // A Vicuna-like template using trim/lstrip blocks, a Python string method and loop.last.
        let template = "{{ bos_token }}\n{% for m in messages %}\n  {% if m['role'] == 'user' %}\nUSER: {{ m['content'].strip() }}\n  {% else %}\nASSISTANT: {{ m['content'] }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\nASSISTANT:\n{% endif %}";
        let special = vec![
            ("bos_token".to_owned(), "<s>".to_owned()),
            ("eos_token".to_owned(), "</s>".to_owned()),
        ];
        let out = render_chat_template(
            template,
            &[msg("user", "  hi "), msg("assistant", "yo")],
            true,
            &special,
        )?;
        assert_eq!(out, "<s>\nUSER: hi\nASSISTANT: yo</s>\nASSISTANT:\n");
        Ok(())
    }

    #[test]
    fn raise_exception_is_an_error() {
        let err = render_chat_template("{{ raise_exception('no system role') }}", &[], false, &[])
            .expect_err("template raises")
            .to_string();
        assert!(err.contains("no system role"), "{err}");
    }
}
