//! Tables and durations for people.

use std::time::Duration;

/// `rows` under `headers`, each column as wide as its widest cell, two spaces apart.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let mut text = String::new();
    line(&mut text, &widths, headers.iter().copied());
    for row in rows {
        line(&mut text, &widths, row.iter().map(String::as_str));
    }
    text
}

/// One row of a table: `cells` padded to `widths`, without trailing spaces.
fn line<'c>(text: &mut String, widths: &[usize], cells: impl Iterator<Item = &'c str>) {
    let mut out = String::new();
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push_str("  ");
        }
        out.push_str(cell);
        let pad = widths
            .get(i)
            .copied()
            .unwrap_or_default()
            .saturating_sub(cell.chars().count());
        out.extend(std::iter::repeat_n(' ', pad));
    }
    text.push_str(out.trim_end());
    text.push('\n');
}

/// `450ms`, `12s`, `3m 12s`, `2h 5m`, `2h`, `3d 4h`, `1d`.
pub(crate) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    let (big, small) = if days > 0 {
        ((days, 'd'), (hours, 'h'))
    } else if hours > 0 {
        ((hours, 'h'), (minutes, 'm'))
    } else if minutes > 0 {
        ((minutes, 'm'), (seconds, 's'))
    } else {
        return format!("{seconds}s");
    };
    if small.0 == 0 {
        format!("{}{}", big.0, big.1)
    } else {
        format!("{}{} {}{}", big.0, big.1, small.0, small.1)
    }
}

/// Cuts `text` to `max` characters, with `…` when cut, on one line.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(Duration::from_millis(450)), "450ms");
        assert_eq!(duration(Duration::from_secs(12)), "12s");
        assert_eq!(duration(Duration::from_secs(192)), "3m 12s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 4h"
        );
    }

    #[test]
    fn tables_align_their_columns() {
        let text = table(
            &["GROUP", "N"],
            &[
                vec!["notes".into(), "1".into()],
                vec!["a".into(), "200".into()],
            ],
        );
        assert_eq!(text, "GROUP  N\nnotes  1\na      200\n");
    }

    #[test]
    fn long_text_is_cut_on_one_line() {
        assert_eq!(cut("ab\ncd", 10), "ab cd");
        assert_eq!(cut("abcdef", 4), "abc…");
    }
}
