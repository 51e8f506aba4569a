//! Prompt formats (dataset dialogue -> model input text) and the one truncation rule that every
//! stage applies to generated responses.

use serde::{Deserialize, Serialize};

use crate::datasets::PromptRecord;
use crate::dialogue::{Role, Turn};
use crate::{Error, Result};

/// The paper's "+prompting" instruction (Vicuna's system prompt).
pub const HELPFUL_INSTRUCTION: &str = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// How a dialogue becomes model input text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptFormat {
    /// The prompt text as the dataset has it.
    Raw,
    /// "\n\nHuman: ...\n\nAssistant:" as in HH-RLHF.
    Hh,
    /// Vicuna v1.1: "USER: ... ASSISTANT:".
    Vicuna,
    /// The model's own chat template.
    ChatTemplate,
}

impl PromptFormat {
    /// The name used on the command line and in stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Hh => "hh",
            Self::Vicuna => "vicuna",
            Self::ChatTemplate => "chat-template",
        }
    }
}

/// Renders chat messages with a model's chat template (implemented by the `lm` crate's
/// tokenizer; kept as a trait so this crate needs no model).
pub trait ChatRenderer {
    /// The template applied to `messages` with the generation prompt added; a failure is
    /// [`Error::ChatTemplate`] around the renderer's own error.
    fn render_chat(&self, messages: &[Turn]) -> Result<String>;
}

/// Model input text for a prompt, with an optional instruction before it (the paper's
/// "+prompting"). `chat` is needed for [`PromptFormat::ChatTemplate`].
pub fn render_prompt(
    format: PromptFormat,
    record: &PromptRecord,
    instruction: Option<&str>,
    chat: Option<&dyn ChatRenderer>,
) -> Result<String> {
    let turns = &record.dialogue.turns;
    Ok(match format {
        PromptFormat::Raw => match instruction {
            None => record.raw.clone(),
            Some(i) if record.raw.starts_with('\n') => format!("{i}{}", record.raw),
            Some(i) => format!("{i}\n\n{}", record.raw),
        },
        PromptFormat::Hh => {
            let mut text = instruction.unwrap_or_default().to_owned();
            for turn in turns {
                let marker = match turn.role {
                    Role::System => {
                        text.push_str(&turn.text);
                        continue;
                    }
                    Role::User => "\n\nHuman:",
                    Role::Assistant => "\n\nAssistant:",
                };
                text.push_str(marker);
                if !turn.text.is_empty() {
                    text.push(' ');
                    text.push_str(&turn.text);
                }
            }
            text.push_str("\n\nAssistant:");
            text
        }
        PromptFormat::Vicuna => {
            let mut text = match instruction {
                Some(i) => format!("{i} "),
                None => String::new(),
            };
            for turn in turns {
                match turn.role {
                    Role::System => text.push_str(&format!("{} ", turn.text)),
                    Role::User => text.push_str(&format!("USER: {} ", turn.text)),
                    Role::Assistant => text.push_str(&format!("ASSISTANT: {}</s>", turn.text)),
                }
            }
            text.push_str("ASSISTANT:");
            text
        }
        PromptFormat::ChatTemplate => {
            let chat = chat.ok_or(Error::NoChatRenderer)?;
            let mut messages = Vec::with_capacity(turns.len() + 1);
            if let Some(i) = instruction {
                messages.push(Turn {
                    role: Role::System,
                    text: i.to_owned(),
                });
            }
            messages.extend(turns.iter().cloned());
            chat.render_chat(&messages)?
        }
    })
}

/// A whole dialogue as LM training text in the HH format, each assistant turn (the final
/// `reply` too) followed by `eos`, so a model learns to end its replies.
pub fn dialogue_document(turns: &[Turn], reply: &str, eos: &str) -> String {
    let mut text = String::new();
    for turn in turns {
        match turn.role {
            Role::System => text.push_str(&turn.text),
            Role::User => {
                text.push_str("\n\nHuman: ");
                text.push_str(&turn.text);
            }
            Role::Assistant => {
                text.push_str("\n\nAssistant: ");
                text.push_str(&turn.text);
                text.push_str(eos);
            }
        }
    }
    text.push_str("\n\nAssistant: ");
    text.push_str(reply);
    text.push_str(eos);
    text
}

/// Turn markers of the supported formats. A response is cut where one of them starts a line
/// (or follows whitespace): the model has begun to write the next turn itself.
pub const TURN_MARKERS: [&str; 4] = ["Human:", "Assistant:", "USER:", "ASSISTANT:"];

/// The one truncation rule: cut a generated response at a hallucinated next turn and drop
/// trailing whitespace. Labelling, scoring and evaluation all call this.
pub fn truncate_response(response: &str) -> &str {
    let cut = TURN_MARKERS
        .iter()
        .filter_map(|marker| {
            response.match_indices(marker).map(|(i, _)| i).find(|&i| {
                i == 0
                    || response[..i]
                        .chars()
                        .next_back()
                        .is_some_and(char::is_whitespace)
            })
        })
        .min()
        .unwrap_or(response.len());
    response[..cut].trim_end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dialogue::Dialogue;

    fn record() -> PromptRecord {
        PromptRecord {
            index: 0,
            raw: "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tea?\n\nAssistant:".to_owned(),
            dialogue: Dialogue {
                turns: vec![
                    Turn {
                        role: Role::User,
                        text: "hi".into(),
                    },
                    Turn {
                        role: Role::Assistant,
                        text: "hello".into(),
                    },
                    Turn {
                        role: Role::User,
                        text: "tea?".into(),
                    },
                ],
            },
        }
    }

    struct Brackets;
    impl ChatRenderer for Brackets {
        fn render_chat(&self, messages: &[Turn]) -> Result<String> {
            Ok(messages
                .iter()
                .map(|m| format!("[{}]{}", m.role.as_str(), m.text))
                .collect::<String>()
                + "[assistant]")
        }
    }

    #[test]
    fn formats_render_the_dialogue() -> Result<()> {
        let r = record();
        assert_eq!(render_prompt(PromptFormat::Raw, &r, None, None)?, r.raw);
        assert_eq!(
            render_prompt(PromptFormat::Hh, &r, None, None)?,
            r.raw,
            "hh reproduces HH text"
        );
        assert_eq!(
            render_prompt(PromptFormat::Vicuna, &r, Some("Be nice."), None)?,
            "Be nice. USER: hi ASSISTANT: hello</s>USER: tea? ASSISTANT:"
        );
        assert_eq!(
            render_prompt(
                PromptFormat::ChatTemplate,
                &r,
                Some("Be nice."),
                Some(&Brackets)
            )?,
            "[system]Be nice.[user]hi[assistant]hello[user]tea?[assistant]"
        );
        assert_eq!(
            render_prompt(PromptFormat::Raw, &r, Some(HELPFUL_INSTRUCTION), None)?,
            format!("{HELPFUL_INSTRUCTION}{}", r.raw)
        );
        let q = PromptRecord {
            index: 1,
            raw: "Why?".into(),
            dialogue: Dialogue::question("Why?"),
        };
        assert_eq!(
            render_prompt(PromptFormat::Hh, &q, None, None)?,
            "\n\nHuman: Why?\n\nAssistant:"
        );
        assert!(render_prompt(PromptFormat::ChatTemplate, &q, None, None).is_err());
        assert_eq!(
            render_prompt(PromptFormat::ChatTemplate, &q, None, None).map_err(|e| e.to_string()),
            Err("the chat-template format needs a model with a chat template".to_owned())
        );
        Ok(())
    }

    #[test]
    fn dialogue_documents_end_assistant_turns_with_eos() {
        let r = record();
        assert_eq!(
            dialogue_document(&r.dialogue.turns, "Green tea.", "</s>"),
            "\n\nHuman: hi\n\nAssistant: hello</s>\n\nHuman: tea?\n\nAssistant: Green tea.</s>"
        );
    }

    #[test]
    fn truncation_cuts_hallucinated_turns_only() {
        assert_eq!(
            truncate_response(" Sure, boil water.\n\nHuman: and then?\n\nAssistant: wait"),
            " Sure, boil water."
        );
        assert_eq!(truncate_response(" Fine. USER: more"), " Fine.");
        assert_eq!(truncate_response("Human: hi"), "");
        assert_eq!(
            truncate_response(" A NonHuman:thing stays  \n"),
            " A NonHuman:thing stays"
        );
        assert_eq!(truncate_response(" plain"), " plain");
    }
}
