//! Config edits that fail the test when they miss. `str::replace` on a config's text
//! silently does nothing when the pattern is absent (a test then runs with a config it
//! did not mean); these edits panic instead, naming what they did not find.

/// `text` with every `from` replaced by `to`; fails the test when `text` has no `from`.
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "config edit: {from:?} is not in the text, so it cannot become {to:?}:\n{text}"
    );
    text.replace(from, to)
}

/// A config file's text under edit: `Pglb::config(...)` or a fragment of one (e.g. a
/// `[listen.check]` table), or a shipped file (keepalived, pgbouncer.ini) for `edit`.
///
/// ```ignore
/// let config = ConfigText::new(Pglb::config(port, "", &servers))
///     .set("global", "maxconn", 3)
///     .set("listen", "balance", "leastconn")
///     .build();
/// ```
#[derive(Clone, Debug)]
pub struct ConfigText(String);

impl ConfigText {
    pub fn new(text: impl Into<String>) -> ConfigText {
        ConfigText(text.into())
    }

    /// Sets `key` of TOML table `table` (`global`, `listen` for the first `[[listen]]`,
    /// `listen.check`, `stats`, ...) to `value`: replaces the key's line in that table, or
    /// adds the line right after the table's header. Fails the test when there is no such
    /// table.
    pub fn set(mut self, table: &str, key: &str, value: impl Into<toml::Value>) -> ConfigText {
        let line = format!("{key} = {}", value.into());
        let mut lines: Vec<String> = self.0.split('\n').map(str::to_owned).collect();
        let header = table_header(&lines, table)
            .unwrap_or_else(|| panic!("config edit: no [{table}] for {line:?} in:\n{}", self.0));
        let end = lines[header + 1..]
            .iter()
            .position(|l| l.trim_start().starts_with('['))
            .map_or(lines.len(), |i| header + 1 + i);
        let existing = (header + 1..end).find(|&i| {
            lines[i]
                .trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        });
        match existing {
            Some(i) => lines[i] = line,
            None => lines.insert(header + 1, line),
        }
        self.0 = lines.join("\n");
        self
    }

    /// Inserts `text` (whole tables, e.g. another `[[listen]]`) right before the header of
    /// table `table`. Fails the test when there is no such table.
    pub fn insert_before(mut self, table: &str, text: &str) -> ConfigText {
        let mut lines: Vec<String> = self.0.split('\n').map(str::to_owned).collect();
        let header = table_header(&lines, table).unwrap_or_else(|| {
            panic!("config edit: no [{table}] to insert before in:\n{}", self.0)
        });
        lines.insert(header, text.trim_end_matches('\n').to_owned());
        self.0 = lines.join("\n");
        self
    }

    /// Every `from` replaced by `to` (see [`edit`]): for the edits `set` cannot say.
    pub fn edit(self, from: &str, to: &str) -> ConfigText {
        ConfigText(edit(&self.0, from, to))
    }

    pub fn build(self) -> String {
        self.0
    }
}

/// The line of `[table]` or the first `[[table]]`.
fn table_header(lines: &[String], table: &str) -> Option<usize> {
    let (single, array) = (format!("[{table}]"), format!("[[{table}]]"));
    lines.iter().position(|l| {
        let code = l.split('#').next().unwrap_or("").trim();
        code == single || code == array
    })
}
