//! Text that came from a guest (its console, its agent's hello, an exec
//! error, a command's stderr) made safe for a terminal or a log file.
//!
//! A guest chooses these bytes, so they may carry terminal escape
//! sequences (retitle the window, move the cursor, rewrite what the user
//! already saw, answer-back attacks) or bidirectional overrides that make
//! text read differently from what it is. Every place that shows guest text
//! goes through one of these functions:
//!
//! - [`text`] keeps newlines and tabs (multi-line text: a console tail);
//! - [`one_line`] also turns newlines and tabs into spaces (a name, a
//!   field of `vm show`/`vm list`, an error message).
//!
//! Each removed character is written as a visible escape (`\x1b`,
//! `\u{202e}`), so nothing is silently lost. A `\r\n` line ending is kept
//! as `\n`.

/// Whether `character` may reach a terminal as it is (besides `\n`/`\t`).
fn is_safe(character: char) -> bool {
    !(character.is_control()
        // Bidirectional embeddings, overrides and isolates.
        || ('\u{202a}'..='\u{202e}').contains(&character)
        || ('\u{2066}'..='\u{2069}').contains(&character)
        || character == '\u{200e}'
        || character == '\u{200f}'
        || character == '\u{061c}')
}

fn escape_into(out: &mut String, character: char) {
    use std::fmt::Write as _;
    let code = u32::from(character);
    if code < 0x100 {
        let _ = write!(out, "\\x{code:02x}");
    } else {
        let _ = write!(out, "\\u{{{code:x}}}");
    }
}

fn clean(input: &str, keep_lines: bool) -> String {
    let mut out = String::with_capacity(input.len());
    let mut characters = input.chars().peekable();
    while let Some(character) = characters.next() {
        match character {
            '\r' if characters.peek() == Some(&'\n') => {}
            '\n' | '\t' if keep_lines => out.push(character),
            '\n' | '\t' => out.push(' '),
            character if is_safe(character) => out.push(character),
            character => escape_into(&mut out, character),
        }
    }
    out
}

/// Guest text for a terminal, newlines and tabs kept.
#[must_use]
pub fn text(input: &str) -> String {
    clean(input, true)
}

/// Guest text for one line of output: newlines and tabs become spaces.
#[must_use]
pub fn one_line(input: &str) -> String {
    clean(input, false)
}

/// Guest bytes (not necessarily UTF-8) for a terminal, newlines kept.
#[must_use]
pub fn bytes(input: &[u8]) -> String {
    text(&String::from_utf8_lossy(input))
}

/// Serialised JSON with any character [`text`] would escape written as a
/// JSON `\uXXXX` escape instead: the same JSON value, safe on a terminal.
/// (JSON encoders escape C0 controls but leave C1 controls, DEL and
/// bidirectional overrides as they are.)
#[must_use]
pub fn json(input: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(input.len());
    for character in input.chars() {
        if is_safe(character) || matches!(character, '\n' | '\t') {
            out.push(character);
        } else {
            let mut units = [0_u16; 2];
            for unit in character.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// Whether `input` would pass [`one_line`] unchanged.
#[must_use]
pub fn is_clean_line(input: &str) -> bool {
    input.chars().all(is_safe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_made_visible() {
        assert_eq!(
            one_line("Debian\x1b]0;pwned\x07\x1b[2J"),
            "Debian\\x1b]0;pwned\\x07\\x1b[2J"
        );
        assert_eq!(one_line("a\u{9b}31mb"), "a\\x9b31mb");
        assert_eq!(one_line("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(one_line("del\x7f"), "del\\x7f");
    }

    #[test]
    fn lines_are_kept_only_in_multi_line_text() {
        assert_eq!(text("one\r\ntwo\tthree\rfour"), "one\ntwo\tthree\\x0dfour");
        assert_eq!(one_line("one\ntwo\tthree"), "one two three");
    }

    #[test]
    fn json_stays_the_same_value() {
        let value = "os\u{9b}2J\u{202e}\x1b";
        let encoded = "\"os\u{9b}2J\u{202e}\\u001b\"";
        let safe = json(encoded);
        assert_eq!(safe, "\"os\\u009b2J\\u202e\\u001b\"");
        assert!(safe.chars().all(|character| !character.is_control()));
        let back: String = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn plain_text_is_unchanged() {
        let plain = "Debian GNU/Linux 12 (bookworm) — ünïcode ok";
        assert_eq!(one_line(plain), plain);
        assert!(is_clean_line(plain));
        assert!(!is_clean_line("a\x1bb"));
        assert_eq!(bytes(b"ok\xff\n"), "ok\u{fffd}\n");
    }
}
