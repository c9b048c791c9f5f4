//! Incremental detokenization: turns a growing list of token ids into text deltas.
//!
//! Decoding each token alone is wrong twice over: a multi-byte character may be split across
//! tokens, and some decoders (SentencePiece's leading-space rule) depend on the tokens before.
//! So we decode a small window twice — the tokens already emitted (`..read`) and the same
//! window plus the new tokens — and emit the difference once it no longer ends in an
//! incomplete character (U+FFFD).
//!
//! The window stays small whatever the model generates: skipped (special) tokens never enter
//! it, and after [`MAX_PENDING`] tokens without text it is released as it is, so each token
//! costs a bounded decode, never a rescan of everything since the last text.

/// Something that turns token ids into text (the tokenizer; a fake in tests).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String, String>;

    /// Tokens that decode to no text wherever they stand (special tokens, which decoding
    /// skips).
    fn is_skipped(&self, _id: u32) -> bool {
        false
    }
}

/// Tokens held back waiting for text: a character is at most 4 bytes, so a window this long
/// that still ends in U+FFFD (or adds nothing) will not complete, and is released as it is.
pub const MAX_PENDING: usize = 8;

#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    /// The tokens of the last release (context for the decoder), then the pending ones.
    window: Vec<u32>,
    /// Where the pending tokens start in `window`.
    read: usize,
}

impl IncrementalDecoder {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push<D: Decode + ?Sized>(&mut self, decoder: &D, id: u32) -> Result<String, String> {
        if decoder.is_skipped(id) {
            return Ok(String::new());
        }
        self.window.push(id);
        let before = decoder.decode(&self.window[..self.read])?;
        let after = decoder.decode(&self.window)?;
        let waiting = after.ends_with('\u{FFFD}') || after.len() <= before.len();
        if waiting && self.window.len() - self.read < MAX_PENDING {
            return Ok(String::new());
        }
        let delta = after.get(before.len()..).unwrap_or_default().to_string();
        self.release();
        Ok(delta)
    }

    /// Text of tokens still held back (an incomplete character at the end of generation).
    pub fn flush<D: Decode + ?Sized>(&mut self, decoder: &D) -> Result<String, String> {
        if self.read == self.window.len() {
            return Ok(String::new());
        }
        let before = decoder.decode(&self.window[..self.read])?;
        let after = decoder.decode(&self.window)?;
        self.release();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }

    /// The pending tokens become the context of the next ones.
    fn release(&mut self) {
        self.window.drain(..self.read);
        self.read = self.window.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token id = one byte, like a byte-level BPE's byte fallback.
    struct Bytes;
    impl Decode for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let bytes: Vec<u8> = ids.iter().map(|&id| id as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    /// SentencePiece-like: every token is a word with a leading space, stripped at the start.
    struct Words;
    impl Decode for Words {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let text: String = ids.iter().map(|id| format!(" w{id}")).collect();
            Ok(text.trim_start().to_string())
        }
    }

    fn stream<D: Decode>(decoder: &D, ids: &[u32]) -> Vec<String> {
        let mut inc = IncrementalDecoder::default();
        ids.iter()
            .map(|&id| inc.push(decoder, id).unwrap())
            .collect()
    }

    #[test]
    fn multi_byte_characters_split_over_tokens() {
        let text = "aé€😀z";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let deltas = stream(&Bytes, &ids);
        assert_eq!(deltas.concat(), text);
        // é is two bytes: its first byte gives nothing, its second the whole character.
        assert_eq!(deltas[1], "");
        assert_eq!(deltas[2], "é");
        assert_eq!(&deltas[6..10], ["", "", "", "😀"]);
    }

    #[test]
    fn leading_space_depends_on_previous_tokens() {
        let deltas = stream(&Words, &[1, 2, 3]);
        assert_eq!(deltas, ["w1", " w2", " w3"]);
    }

    /// Records the longest slice it was asked to decode.
    struct Counting<D> {
        inner: D,
        longest: std::cell::Cell<usize>,
    }
    impl<D: Decode> Decode for Counting<D> {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            self.longest.set(self.longest.get().max(ids.len()));
            self.inner.decode(ids)
        }
        fn is_skipped(&self, id: u32) -> bool {
            self.inner.is_skipped(id)
        }
    }

    fn counting<D: Decode>(inner: D) -> Counting<D> {
        Counting {
            inner,
            longest: std::cell::Cell::new(0),
        }
    }

    /// Words, with id 0 a special token (skipped) and id 1 a token that adds no text.
    struct WordsWithSilence;
    impl Decode for WordsWithSilence {
        fn decode(&self, ids: &[u32]) -> Result<String, String> {
            let words: Vec<u32> = ids.iter().copied().filter(|&id| id > 1).collect();
            Words.decode(&words)
        }
        fn is_skipped(&self, id: u32) -> bool {
            id == 0
        }
    }

    #[test]
    fn tokens_without_text_do_not_grow_the_window() {
        for silent in [0, 1] {
            let decoder = counting(WordsWithSilence);
            let mut ids = vec![7];
            ids.extend(std::iter::repeat_n(silent, 10_000));
            ids.push(8);
            let text = stream(&decoder, &ids).concat();
            // Skipped tokens never enter the window, so the leading space survives them; a
            // long run of other silent tokens pushes the context out.
            let expected = if silent == 0 { "w7 w8" } else { "w7w8" };
            assert_eq!(text, expected, "silent token {silent}");
            assert!(
                decoder.longest.get() <= 2 * MAX_PENDING,
                "silent token {silent}"
            );
        }
    }

    #[test]
    fn invalid_bytes_are_released_instead_of_held_forever() {
        let decoder = counting(Bytes);
        let mut ids = vec![0xFF; 10_000];
        ids.push(u32::from(b'z'));
        let text = stream(&decoder, &ids).concat();
        assert!(text.ends_with('z') && text.contains('\u{FFFD}'));
        assert!(decoder.longest.get() <= 2 * MAX_PENDING);
    }

    #[test]
    fn a_skipped_token_keeps_the_leading_space() {
        let deltas = stream(&WordsWithSilence, &[5, 0, 6]);
        assert_eq!(deltas, ["w5", "", " w6"]);
    }

    #[test]
    fn flush_releases_an_incomplete_tail() {
        let mut inc = IncrementalDecoder::default();
        assert_eq!(inc.push(&Bytes, u32::from(b'a')).unwrap(), "a");
        assert_eq!(inc.push(&Bytes, 0xE2).unwrap(), "");
        assert_eq!(inc.flush(&Bytes).unwrap(), "\u{FFFD}");
        assert_eq!(inc.flush(&Bytes).unwrap(), "");
    }
}
