//! Aligned text tables for terminal output.

/// Cells longer than this are cut with an ellipsis.
const MAX_CELL: usize = 60;

/// Renders `rows` under `headers` with columns padded to their widest cell (two spaces apart, no trailing
/// spaces). Control characters in cells become spaces so one row stays one line.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let clean = |c: &str| -> String {
        let c: String = c.chars().map(|ch| if ch.is_control() { ' ' } else { ch }).collect();
        if c.chars().count() > MAX_CELL {
            let mut cut: String = c.chars().take(MAX_CELL - 1).collect();
            cut.push('…');
            cut
        } else {
            c
        }
    };
    let rows: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|c| clean(c)).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(c);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(widths[i].saturating_sub(c.chars().count())));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).take(headers.len()).collect()));
        out.push('\n');
    }
    out
}

/// An RFC 3339 time shortened to `YYYY-MM-DD HH:MM:SS` (UTC); other text is returned as it is.
pub fn time(t: &str) -> String {
    match chrono::DateTime::parse_from_rfc3339(t) {
        Ok(d) => d.with_timezone(&chrono::Utc).format("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let out = render(
            &["ID", "NAME", "DESCRIPTION"],
            &[vec!["1".into(), "alpha".into(), "".into()], vec!["22".into(), "b".into(), "x\ny".into()]],
        );
        assert_eq!(out, "ID  NAME   DESCRIPTION\n1   alpha\n22  b      x y\n");
    }

    #[test]
    fn cuts_long_cells_and_formats_times() {
        let long = "x".repeat(100);
        let out = render(&["A"], &[vec![long]]);
        assert_eq!(out.lines().nth(1).unwrap().chars().count(), MAX_CELL);
        assert_eq!(time("2026-11-25T12:00:01.123456Z"), "2026-11-25 12:00:01");
        assert_eq!(time("later"), "later");
    }
}
