//! Peer-supplied text in logs: truncated and with control characters escaped,
//! so a peer can neither flood the log nor forge lines or terminal sequences.

use std::fmt;

/// Characters of peer text kept in a log line.
pub const LOG_SAFE_MAX_CHARS: usize = 256;

/// Formats `text` for a log line: at most [`LOG_SAFE_MAX_CHARS`] characters,
/// control characters (newlines, escapes, …) shown as `\n`, `\u{1b}`, …, and
/// `…(N more bytes)` after a cut.
pub fn log_safe(text: &str) -> LogSafe<'_> {
    LogSafe(text)
}

/// What [`log_safe`] returns; formats lazily, only if the line is logged.
#[derive(Clone, Copy)]
pub struct LogSafe<'a>(&'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(LOG_SAFE_MAX_CHARS) {
            if c.is_control() || is_invisible_format(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        if let Some((cut, _)) = chars.next() {
            write!(f, "…({} more bytes)", self.0.len() - cut)?;
        }
        Ok(())
    }
}

impl fmt::Debug for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Bidirectional overrides and zero-width characters, which can make a log
/// line read differently from what it contains.
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(
            log_safe("seq-a: going away").to_string(),
            "seq-a: going away"
        );
        assert_eq!(log_safe("ünïcødé ok").to_string(), "ünïcødé ok");
        assert_eq!(log_safe("").to_string(), "");
    }

    #[test]
    fn control_characters_are_escaped() {
        let out = log_safe("a\nb\r\x1b[31mred\0\u{7f}").to_string();
        assert_eq!(out, "a\\nb\\r\\u{1b}[31mred\\u{0}\\u{7f}");
        assert!(!out.chars().any(char::is_control));
        assert_eq!(log_safe("x\u{202e}y").to_string(), "x\\u{202e}y");
    }

    #[test]
    fn long_text_is_truncated_on_a_character_boundary() {
        let long = "é".repeat(10_000);
        let out = log_safe(&long).to_string();
        let kept: String = "é".repeat(LOG_SAFE_MAX_CHARS);
        assert_eq!(
            out,
            format!("{kept}…({} more bytes)", long.len() - kept.len())
        );
        let exact = "x".repeat(LOG_SAFE_MAX_CHARS);
        assert_eq!(log_safe(&exact).to_string(), exact);
    }

    #[test]
    fn debug_quotes_the_safe_form() {
        assert_eq!(format!("{:?}", log_safe("a\nb")), "\"a\\nb\"");
    }
}
