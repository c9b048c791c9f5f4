//! Incremental detokenization: turns a growing list of token ids into text deltas.
//!
//! Decoding each token alone is wrong twice over: a multi-byte character may be split across
//! tokens, and some decoders (SentencePiece's leading-space rule) depend on the tokens before.
//! So we decode a small window twice — the tokens already emitted (`prefix_offset..read_offset`)
//! and the same window plus the new tokens — and emit the difference once it no longer ends in
//! an incomplete character (U+FFFD).

/// Something that turns token ids into text (the tokenizer; a fake in tests).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String, String>;
}

#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push<D: Decode + ?Sized>(&mut self, decoder: &D, id: u32) -> Result<String, String> {
        self.ids.push(id);
        let before = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = decoder.decode(&self.ids[self.prefix_offset..])?;
        if after.ends_with('\u{FFFD}') || after.len() <= before.len() {
            return Ok(String::new());
        }
        let Some(delta) = after.get(before.len()..) else {
            return Ok(String::new());
        };
        let delta = delta.to_string();
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(delta)
    }

    /// Text of tokens still held back (an incomplete character at the end of generation).
    pub fn flush<D: Decode + ?Sized>(&mut self, decoder: &D) -> Result<String, String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let before = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = decoder.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
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

    #[test]
    fn flush_releases_an_incomplete_tail() {
        let mut inc = IncrementalDecoder::default();
        assert_eq!(inc.push(&Bytes, u32::from(b'a')).unwrap(), "a");
        assert_eq!(inc.push(&Bytes, 0xE2).unwrap(), "");
        assert_eq!(inc.flush(&Bytes).unwrap(), "\u{FFFD}");
        assert_eq!(inc.flush(&Bytes).unwrap(), "");
    }
}
