//! Stop strings matched across token boundaries.
//!
//! Text is released only when it can no longer be the start of a stop string, so a stop string
//! split over several tokens is still found, and nothing of it reaches the client.

#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// No stop string yet; this text is safe to release.
    Continue(String),
    /// A stop string matched; this is the text before it. Generation ends here.
    Stopped(String),
}

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// `stops` must not contain empty strings (validation refuses them).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_string());
        }
        self.held.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_match {
            let before = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        let keep = self.partial_match_len();
        let release = self.held.len() - keep;
        StopOutcome::Continue(self.held.drain(..release).collect())
    }

    /// Text held back at the end of generation (it never became a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest tail of the held text that begins some stop string.
    fn partial_match_len(&self) -> usize {
        let held = self.held.as_str();
        held.char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|stop| stop.starts_with(&held[i..])))
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for piece in pieces {
            match matcher.push(piece) {
                StopOutcome::Continue(text) => out.push_str(&text),
                StopOutcome::Stopped(text) => {
                    out.push_str(&text);
                    return (out, true);
                }
            }
        }
        out.push_str(&matcher.finish());
        (out, false)
    }

    #[test]
    fn stop_split_over_tokens_is_found_and_trimmed() {
        assert_eq!(
            run(&["###"], &["Hello", " #", "#", "# more"]),
            ("Hello ".into(), true)
        );
    }

    #[test]
    fn partial_match_that_diverges_is_released() {
        assert_eq!(
            run(&["\nUser:"], &["a\nUs", "ually"]),
            ("a\nUsually".into(), false)
        );
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["cd", "b"], &["abcd"]), ("a".into(), true));
    }

    #[test]
    fn held_text_is_not_released_early() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("xE"), StopOutcome::Continue("x".into()));
        assert_eq!(matcher.push("N"), StopOutcome::Continue(String::new()));
        assert_eq!(matcher.finish(), "EN");
    }

    #[test]
    fn multi_byte_text_around_a_stop() {
        assert_eq!(run(&["é!"], &["café", "!", "x"]), ("caf".into(), true));
        assert_eq!(run(&["€"], &["1 €"]), ("1 ".into(), true));
    }

    #[test]
    fn no_stops_is_a_pass_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}
