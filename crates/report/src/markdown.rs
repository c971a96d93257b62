//! Markdown tables and CSV files, as `vigil benchmark` prints and saves them.

use std::path::Path;

use vigil_core::model_file::write_atomic;
use vigil_core::{Result, VigilError};

/// A cell that cannot break the table: pipes escaped, line breaks turned into `<br>`.
fn markdown_cell(text: &str) -> String {
    text.replace('\\', "\\\\").replace('|', "\\|").replace("\r\n", "<br>").replace(['\n', '\r'], "<br>")
}

/// A column is right-aligned when every non-empty cell is a number (optionally with a `%` or
/// `±` part), so figures line up by their digits.
fn is_numeric(cell: &str) -> bool {
    let head = cell.split('±').next().unwrap_or("").trim().trim_end_matches('%');
    head.parse::<f64>().is_ok()
}

/// A GitHub-flavoured markdown table, padded so it is also readable as plain text.
/// Rows shorter than the header are padded with empty cells; a row longer than the header
/// widens the table with unnamed columns rather than losing data.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).chain([headers.len()]).max().unwrap_or(0);
    if columns == 0 {
        return String::new();
    }
    let cell = |row: &[String], c: usize| row.get(c).map(|s| markdown_cell(s)).unwrap_or_default();
    let header: Vec<String> =
        (0..columns).map(|c| markdown_cell(headers.get(c).copied().unwrap_or(""))).collect();
    let body: Vec<Vec<String>> = rows.iter().map(|r| (0..columns).map(|c| cell(r, c)).collect()).collect();
    let width = |c: usize| {
        body.iter().map(|r| r[c].chars().count()).chain([header[c].chars().count(), 3]).max().unwrap_or(3)
    };
    let widths: Vec<usize> = (0..columns).map(width).collect();
    let numeric: Vec<bool> = (0..columns)
        .map(|c| {
            let mut filled = body.iter().map(|r| r[c].as_str()).filter(|s| !s.is_empty()).peekable();
            filled.peek().is_some() && filled.all(is_numeric)
        })
        .collect();
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let pad = " ".repeat(widths[c] - s.chars().count());
                if numeric[c] {
                    format!("{pad}{s}")
                } else {
                    format!("{s}{pad}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&header);
    let rule: Vec<String> = (0..columns)
        .map(|c| if numeric[c] { format!("{}:", "-".repeat(widths[c] - 1)) } else { "-".repeat(widths[c]) })
        .collect();
    out.push_str(&format!("| {} |\n", rule.join(" | ")));
    for row in &body {
        out.push_str(&line(row));
    }
    out
}

/// RFC 4180 quoting: a field holding a comma, quote, line break or edge whitespace is quoted,
/// with quotes doubled. Lines end with `\n`.
fn csv_field(text: &str) -> String {
    let needs_quotes = text.contains([',', '"', '\n', '\r']) || text.trim() != text;
    if needs_quotes {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// CSV text; every row must have one cell per header.
pub fn csv_string(headers: &[&str], rows: &[Vec<String>]) -> Result<String> {
    if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != headers.len()) {
        return Err(VigilError::invalid(format!(
            "CSV row {} has {} cells but there are {} columns",
            i + 1,
            row.len(),
            headers.len()
        )));
    }
    let mut out = headers.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(",");
    out.push('\n');
    for row in rows {
        out.push_str(&row.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    Ok(out)
}

/// Writes the CSV atomically, replacing an existing file: the caller decides beforehand whether
/// its output folder may be overwritten.
pub fn write_csv(path: &Path, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let text = csv_string(headers, rows).map_err(|e| VigilError::file(path, e.to_string()))?;
    write_atomic(path, text.as_bytes(), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn markdown_table_aligns_and_escapes() {
        let t = markdown_table(
            &["method", "AUROC"],
            &[row(&["patch|core", "0.97"]), row(&["two\nlines", "0.8"]), row(&["padim", ""])],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0], "| method       | AUROC |");
        assert_eq!(lines[1], "| ------------ | ----: |");
        assert_eq!(lines[2], "| patch\\|core  |  0.97 |");
        assert_eq!(lines[3], "| two<br>lines |   0.8 |");
        assert_eq!(lines[4], "| padim        |       |");
        assert!(lines.iter().all(|l| l.chars().count() == lines[0].chars().count()));
    }

    #[test]
    fn markdown_table_keeps_extra_cells_and_numeric_variants() {
        let t = markdown_table(&["a"], &[row(&["x", "95.1%"]), row(&["y", "0.9 ± 0.1"])]);
        assert!(t.starts_with("| a   |       "), "{t}");
        assert!(t.contains("|     95.1% |"), "{t}");
        assert_eq!(markdown_table(&[], &[]), "");
    }

    #[test]
    fn csv_quotes_only_where_needed() {
        let text = csv_string(
            &["name", "note"],
            &[row(&["a,b", "say \"hi\""]), row(&["plain", "line\nbreak"]), row(&[" padded", "1.5"])],
        )
        .unwrap();
        assert_eq!(text, "name,note\n\"a,b\",\"say \"\"hi\"\"\"\nplain,\"line\nbreak\"\n\" padded\",1.5\n");
        let e = csv_string(&["a", "b"], &[row(&["1"])]).unwrap_err().to_string();
        assert!(e.contains("row 1 has 1 cells") && e.contains("2 columns"), "{e}");
    }

    #[test]
    fn write_csv_replaces_atomically_and_names_the_file_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bench.csv");
        write_csv(&p, &["x"], &[row(&["1"])]).unwrap();
        write_csv(&p, &["x"], &[row(&["2"])]).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x\n2\n");
        let e = write_csv(&p, &["x"], &[row(&["1", "2"])]).unwrap_err().to_string();
        assert!(e.contains("bench.csv"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "x\n2\n", "a failed write leaves the old file");
    }
}
