//! A choice's text as its tokens arrive: the whole token list is decoded each time (so the text
//! is exactly `recontrol generate`'s), stop sequences end it (the stop itself left out, as the
//! OpenAI API does), and a stream is only handed text that cannot change: an incomplete UTF-8
//! character (a trailing U+FFFD) and a tail that could begin a stop sequence are held back.

/// The text of one choice so far.
#[derive(Debug, Clone, Default)]
pub struct ChoiceText {
    stop: Vec<String>,
    /// The decoded text (cut before a stop sequence once one appeared).
    text: String,
    /// Bytes of `text` handed out as stream deltas.
    emitted: usize,
    /// A stop sequence appeared.
    stopped: bool,
}

impl ChoiceText {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            ..Self::default()
        }
    }

    /// Takes the decoding of every token so far; returns the new text that is safe to stream.
    pub fn update(&mut self, decoded: String) -> String {
        if self.stopped {
            return String::new();
        }
        let cut = self
            .stop
            .iter()
            .filter_map(|s| decoded.find(s.as_str()))
            .min();
        self.text = decoded;
        if let Some(cut) = cut {
            self.text.truncate(cut);
            self.stopped = true;
            return self.flush();
        }
        let mut safe = self.text.len() - self.stop_prefix_tail();
        if let Some(start) = trailing_replacement(&self.text) {
            safe = safe.min(start);
        }
        self.take_until(safe)
    }

    /// The rest of the text (at the end of the choice).
    pub fn flush(&mut self) -> String {
        self.take_until(self.text.len())
    }

    /// Whether a stop sequence ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The whole text.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take_until(&mut self, end: usize) -> String {
        // Decoding is prefix-stable for the tokenizers we load; should it not be, never hand out
        // a byte twice or split a character.
        let mut start = self.emitted.min(self.text.len());
        while !self.text.is_char_boundary(start) {
            start += 1;
        }
        if end <= start {
            return String::new();
        }
        self.emitted = end;
        self.text[start..end].to_owned()
    }

    /// Length of the longest tail of the text that is a proper prefix of a stop sequence.
    fn stop_prefix_tail(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stop {
            for (k, _) in stop.char_indices().skip(1) {
                if k > longest && self.text.ends_with(&stop[..k]) {
                    longest = k;
                }
            }
        }
        longest
    }
}

/// Where a trailing run of U+FFFD (an incomplete character) starts.
fn trailing_replacement(text: &str) -> Option<usize> {
    let trimmed = text.trim_end_matches('\u{FFFD}');
    (trimmed.len() < text.len()).then_some(trimmed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds growing decodings and returns (stream deltas joined, final text, stopped).
    fn run(stop: &[&str], decodings: &[&str]) -> (String, String, bool) {
        let mut c = ChoiceText::new(stop.iter().map(|s| s.to_string()).collect());
        let mut streamed = String::new();
        for d in decodings {
            streamed.push_str(&c.update(d.to_string()));
        }
        streamed.push_str(&c.flush());
        (streamed, c.text().to_owned(), c.stopped())
    }

    #[test]
    fn the_stream_adds_up_to_the_text() {
        let (s, t, stopped) = run(&[], &["He", "Hello", "Hello wor", "Hello world"]);
        assert_eq!(
            (s.as_str(), t.as_str(), stopped),
            ("Hello world", "Hello world", false)
        );
    }

    #[test]
    fn a_stop_sequence_ends_the_text_without_itself_and_is_never_streamed() {
        let mut c = ChoiceText::new(vec!["\nUser".to_owned()]);
        assert_eq!(c.update("Hi".into()), "Hi");
        // "\nUs" could begin the stop: held back.
        assert_eq!(c.update("Hi there\nUs".into()), " there");
        assert_eq!(c.update("Hi there\nUser: x".into()), "");
        assert!(c.stopped());
        assert_eq!(c.text(), "Hi there");
        assert_eq!(c.update("Hi there\nUser: xyz".into()), "");
        // A held tail that turns out not to be a stop is released.
        let (s, t, stopped) = run(&["\nUser"], &["a\nU", "a\nUnless"]);
        assert_eq!(
            (s.as_str(), t.as_str(), stopped),
            ("a\nUnless", "a\nUnless", false)
        );
        // The earliest of several stops wins.
        let (_, t, _) = run(&["c", "b"], &["abcabc"]);
        assert_eq!(t, "a");
    }

    #[test]
    fn an_incomplete_character_is_held_until_it_completes() {
        let mut c = ChoiceText::new(Vec::new());
        assert_eq!(c.update("caf\u{FFFD}".into()), "caf");
        assert_eq!(c.update("café".into()), "é");
        assert_eq!(c.flush(), "");
    }
}
