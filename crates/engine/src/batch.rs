//! Splitting a large prediction job for any batch scheduler (Slurm arrays, Kubernetes Jobs,
//! xargs): a list file of images, contiguous shards of it, and reading back a score table so a
//! re-run skips the images already scored.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::outputs::unique_names;
use crate::run::Item;

/// The images named in a list file, one path a line; blank lines and lines starting with `#` are
/// left out, relative paths are taken from the current folder. Output names are the paths
/// relative to the folder all listed files share, so they are the same whichever shard a file
/// falls in. Files are not opened here: a missing one fails (or is skipped) when its turn comes.
pub fn list_inputs(list: &Path) -> Result<Vec<Item>> {
    let text = std::fs::read_to_string(list)
        .with_context(|| format!("{}: cannot read the image list", list.display()))?;
    let paths: Vec<PathBuf> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect();
    if paths.is_empty() {
        bail!("{}: the image list names no image (one path a line)", list.display());
    }
    // Names come from absolute paths with `..` resolved, so none climbs out of the output folder.
    let cwd = std::env::current_dir().context("the current folder")?;
    let absolute: Vec<PathBuf> = paths.iter().map(|p| lexically_absolute(&cwd, p)).collect();
    let root = common_folder(&absolute);
    let files: Vec<(PathBuf, Option<PathBuf>)> =
        absolute.into_iter().map(|p| (p, Some(root.clone()))).collect();
    let names = unique_names(&files, false);
    Ok(paths
        .into_iter()
        .zip(names)
        .map(|(path, name)| Item { path, name, label: None, kind: String::new(), mask: None })
        .collect())
}

/// `path` joined to `cwd` when relative, with `.` and `..` steps resolved without touching the disk.
fn lexically_absolute(cwd: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in cwd.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The deepest folder holding every (absolute, resolved) path.
fn common_folder(paths: &[PathBuf]) -> PathBuf {
    fn folder(p: &Path) -> Vec<Component<'_>> {
        p.parent().unwrap_or(Path::new("")).components().collect()
    }
    let mut common = folder(&paths[0]);
    for p in &paths[1..] {
        let other = folder(p);
        let same = common.iter().zip(&other).take_while(|(a, b)| a == b).count();
        common.truncate(same);
    }
    common.iter().collect()
}

/// One of `count` contiguous parts of an input list (`index` from 0): shards 0, 1, …, count-1
/// concatenated give the whole list in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Shard> {
        let parsed =
            s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Shard { index, count }),
            _ => bail!("--shard must be I/N with 0 <= I < N (e.g. 0/4 for the first of four), got '{s}'"),
        }
    }
}

impl Shard {
    /// The items of this shard: sizes differ by at most one.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        let n = items.len();
        let (start, end) = (n * self.index / self.count, n * (self.index + 1) / self.count);
        items.into_iter().skip(start).take(end - start).collect()
    }
}

/// The complete records of CSV text as written by vigil (RFC 4180 quoting): a last line without
/// its line break — a row cut short by a crash — is left out.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    let mut records = Vec::new();
    let (mut record, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, complete.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, '\r') => {}
            (false, c) => field.push(c),
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_and_cover_the_list() {
        let items: Vec<usize> = (0..10).collect();
        let parts: Vec<Vec<usize>> =
            (0..4).map(|i| Shard { index: i, count: 4 }.select(items.clone())).collect();
        assert_eq!(parts.concat(), items);
        assert!(parts.iter().all(|p| p.len() == 2 || p.len() == 3), "{parts:?}");
        assert_eq!(Shard { index: 0, count: 3 }.select(vec![1]), Vec::<i32>::new());
        assert_eq!("2/4".parse::<Shard>().unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0", "-1/2"] {
            let err = bad.parse::<Shard>().unwrap_err().to_string();
            assert!(err.contains("--shard"), "{bad}: {err}");
        }
    }

    #[test]
    fn csv_parsing_reads_quotes_and_drops_a_cut_row() {
        let text = "a,b\n\"x,1\",\"say \"\"hi\"\"\"\nlast,cut";
        assert_eq!(
            parse_csv(text),
            vec![vec!["a".to_string(), "b".into()], vec!["x,1".into(), "say \"hi\"".into()]]
        );
    }

    #[test]
    fn listed_files_are_named_below_their_common_folder() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "# images\n/data/a/good/1.png\n\n/data/a/bad/1.png\n/data/x/../b/1.jpg\n")
            .unwrap();
        let names: Vec<String> = list_inputs(&list).unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a/good/1", "a/bad/1", "b/1"]);
        std::fs::write(&list, "\n# nothing\n").unwrap();
        assert!(list_inputs(&list).unwrap_err().to_string().contains("names no image"));
    }
}
