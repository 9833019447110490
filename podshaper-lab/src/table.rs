//! Result tables for people: aligned plain text for a terminal, Markdown for docs/.

/// A table of strings with a header row. Cells that look numeric are right-aligned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Column names.
    pub header: Vec<String>,
    /// Rows, each as long as the header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new<S: Into<String>>(header: impl IntoIterator<Item = S>) -> Self {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells render empty, extra cells are dropped.
    pub fn push<S: Into<String>>(&mut self, row: impl IntoIterator<Item = S>) {
        let mut row: Vec<String> = row.into_iter().map(Into::into).collect();
        row.resize(self.header.len(), String::new());
        self.rows.push(row);
    }

    fn widths(&self) -> Vec<usize> {
        self.header
            .iter()
            .enumerate()
            .map(|(i, h)| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([h.chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    }

    // Numbers align right; placeholders ("-", "error", empty) do not make a column textual.
    fn right_aligned(&self, col: usize) -> bool {
        let numeric = |s: &str| {
            let digits = s.strip_prefix('-').unwrap_or(s);
            digits.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        };
        let placeholder = |s: &str| matches!(s, "" | "-" | "error");
        let mut cells = self.rows.iter().map(|r| r[col].as_str());
        cells.clone().any(numeric) && cells.all(|c| numeric(c) || placeholder(c))
    }

    /// Plain text, columns separated by two spaces.
    pub fn to_text(&self) -> String {
        let w = self.widths();
        let line = |cells: &[String], header: bool| {
            let parts: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if !header && self.right_aligned(i) {
                        format!("{c:>width$}", width = w[i])
                    } else {
                        format!("{c:<width$}", width = w[i])
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.header, true) + "\n";
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        out += &(rule.join("  ") + "\n");
        for r in &self.rows {
            out += &(line(r, false) + "\n");
        }
        out
    }

    /// A GitHub-flavoured Markdown table.
    pub fn to_markdown(&self) -> String {
        let esc = |s: &String| s.replace('|', "\\|");
        let mut out = format!(
            "| {} |\n",
            self.header.iter().map(esc).collect::<Vec<_>>().join(" | ")
        );
        let align: Vec<&str> = (0..self.header.len())
            .map(|i| if self.right_aligned(i) { "--:" } else { "---" })
            .collect();
        out += &format!("| {} |\n", align.join(" | "));
        for r in &self.rows {
            out += &format!("| {} |\n", r.iter().map(esc).collect::<Vec<_>>().join(" | "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(["shaper", "ratio"]);
        t.push(["podshaper", "0.98"]);
        t.push(["tbf-cni", "12.30"]);
        t.push(["broken", "error"]);
        t
    }

    #[test]
    fn text_aligns_numbers_right() {
        let text = sample().to_text();
        assert_eq!(
            text,
            "shaper     ratio\n---------  -----\npodshaper   0.98\ntbf-cni    12.30\nbroken     error\n"
        );
    }

    #[test]
    fn markdown_has_alignment_row() {
        let md = sample().to_markdown();
        assert_eq!(
            md,
            "| shaper | ratio |\n| --- | --: |\n| podshaper | 0.98 |\n| tbf-cni | 12.30 |\n| broken | error |\n"
        );
    }
}
