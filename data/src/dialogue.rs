//! Dialogues: the turns before the assistant's next reply, parsed from the HH-RLHF
//! "\n\nHuman: ... \n\nAssistant: ..." text format.

use serde::{Deserialize, Serialize};

/// The HH-RLHF user turn marker.
pub const HUMAN_MARKER: &str = "\n\nHuman:";
/// The HH-RLHF assistant turn marker.
pub const ASSISTANT_MARKER: &str = "\n\nAssistant:";

/// Who speaks a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role name chat templates use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One turn of a dialogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub text: String,
}

/// A prompt: the turns so far, the assistant to speak next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dialogue {
    pub turns: Vec<Turn>,
}

impl Dialogue {
    /// A one-turn dialogue: a user question.
    pub fn question(text: &str) -> Self {
        Self {
            turns: vec![Turn {
                role: Role::User,
                text: text.trim().to_owned(),
            }],
        }
    }

    /// Number of characters of all turns (for length statistics).
    pub fn chars(&self) -> usize {
        self.turns.iter().map(|t| t.text.chars().count()).sum()
    }
}

/// Splits HH-format text into turns. The text must start with a turn marker (leading
/// whitespace aside); turn texts are trimmed.
pub fn parse_hh_turns(text: &str) -> crate::Result<Vec<Turn>> {
    let markers = [
        (HUMAN_MARKER, Role::User),
        (ASSISTANT_MARKER, Role::Assistant),
    ];
    // Markers are matched with their leading "\n\n"; tolerate a text that starts without it.
    let padded;
    let mut rest = if text.starts_with("\n\n") {
        text
    } else {
        padded = format!("\n\n{}", text.trim_start());
        padded.as_str()
    };
    let mut turns = Vec::new();
    while !rest.is_empty() {
        let (marker, role) = markers
            .iter()
            .find(|(m, _)| rest.starts_with(m))
            .ok_or_else(|| crate::Error::TurnMarker {
                found: rest.chars().take(30).collect(),
            })?;
        let body = &rest[marker.len()..];
        let end = markers
            .iter()
            .filter_map(|(m, _)| body.find(m))
            .min()
            .unwrap_or(body.len());
        turns.push(Turn {
            role: *role,
            text: body[..end].trim().to_owned(),
        });
        rest = &body[end..];
    }
    if turns.is_empty() {
        return Err(crate::Error::NoTurns);
    }
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_turns_and_consecutive_assistant_turns() -> crate::Result<()> {
        let t = parse_hh_turns("\n\nHuman: hi there\n\nAssistant: Hello!\n\nAssistant: Anything else?\n\nHuman: no\n\nAssistant:")?;
        let roles: Vec<Role> = t.iter().map(|t| t.role).collect();
        assert_eq!(
            roles,
            [
                Role::User,
                Role::Assistant,
                Role::Assistant,
                Role::User,
                Role::Assistant
            ]
        );
        assert_eq!(t[0].text, "hi there");
        assert_eq!(t[4].text, "");
        Ok(())
    }

    #[test]
    fn rejects_text_without_markers() {
        let err = parse_hh_turns("just text")
            .expect_err("no markers")
            .to_string();
        assert!(err.contains("expected \"Human:\""), "{err}");
    }
}
