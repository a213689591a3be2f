//! Files laid out in ranges of a key, found from their Parquet statistics.
//!
//! Tables are often written sorted by a key (TPC-H's lineitem and orders by order key, event
//! logs by time): the row groups, read in order, hold non-decreasing, non-overlapping ranges of
//! that column. A scan of such files can be split at row-group boundaries into parts that each
//! hold one range of the key. Parts cut that way need no shuffle to group or join by the key,
//! and another relation joined on it can be cut to the same ranges by a filter instead of being
//! broadcast whole (the Parquet reader skips the row groups outside a range by their
//! statistics).

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::SystemTime;

use polars::prelude::*;
use polars_parquet::parquet::statistics::Statistics;
use polars_parquet::read::{FileMetadata, read_metadata};

/// A scan's row groups, in the order the scan reads them, with the range of one key column.
#[derive(Debug, Clone)]
pub struct Clustered {
    /// The key column.
    pub key: PlSmallStr,
    units: Vec<Unit>,
}

/// One row group of one file.
#[derive(Debug, Clone, Copy)]
struct Unit {
    file: usize,
    rows: u64,
    min: i64,
    max: i64,
}

/// A part of a split scan: files `files` (indices into the scan's paths), of whose rows (in
/// order) it reads `slice` (offset, length) or all, holding the keys `>= low` (`None`: from the
/// smallest).
#[derive(Debug, Clone, PartialEq)]
pub struct RangePart {
    pub files: std::ops::Range<usize>,
    pub slice: Option<(u64, u64)>,
    pub low: Option<i64>,
}

/// Whether a column of this type is compared by its Parquet statistics as a 64-bit integer
/// (signed integers and dates; unsigned 32/64-bit values are stored reinterpreted as signed).
fn integer_key(dtype: &DataType) -> bool {
    matches!(
        dtype,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::Date
    )
}

/// The first of `columns` (in the order of `schema`, the files' columns) by whose ranges `paths` are laid out: every row
/// group has statistics without nulls, and each starts at or after the end of the one before.
/// `None` when no column is, or a file is not a readable local Parquet file.
pub fn clustered(paths: &[PlRefPath], schema: &Schema, columns: &[PlSmallStr]) -> Option<Clustered> {
    let candidates: Vec<&PlSmallStr> = schema
        .iter()
        .filter(|(name, dtype)| integer_key(dtype) && columns.contains(name))
        .map(|(name, _)| name)
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let files = footers(paths)?;
    'columns: for key in candidates {
        let mut units = Vec::new();
        for (file, md) in files.iter().enumerate() {
            for rg in &md.row_groups {
                let Some(mut chunks) = rg.columns_under_root_iter(key) else { continue 'columns };
                let (Some(chunk), None) = (chunks.next(), chunks.next()) else { continue 'columns };
                let (min, max) = match chunk.statistics(&md.footer_buf) {
                    Some(Ok(Statistics::Int32(s))) if s.null_count == Some(0) => match (s.min_value, s.max_value) {
                        (Some(a), Some(b)) => (a as i64, b as i64),
                        _ => continue 'columns,
                    },
                    Some(Ok(Statistics::Int64(s))) if s.null_count == Some(0) => match (s.min_value, s.max_value) {
                        (Some(a), Some(b)) => (a, b),
                        _ => continue 'columns,
                    },
                    _ => continue 'columns,
                };
                units.push(Unit { file, rows: rg.num_rows() as u64, min, max });
            }
        }
        let ordered = units.windows(2).all(|w| w[0].max <= w[1].min) && units.iter().all(|u| u.min <= u.max);
        if ordered && !units.is_empty() {
            return Some(Clustered { key: key.clone(), units });
        }
    }
    None
}

impl Clustered {
    pub fn rows(&self) -> u64 {
        self.units.iter().map(|u| u.rows).sum()
    }

    /// Splits the scan into at most `n` parts of about equal rows, cut only between row groups
    /// whose key ranges do not touch (a key never spans two parts). Fewer than two parts:
    /// `None`.
    pub fn split(&self, n: usize) -> Option<Vec<RangePart>> {
        let total = self.rows();
        // Rows before each unit (and, last, all rows), and where a cut may go.
        let mut before = Vec::with_capacity(self.units.len() + 1);
        let mut acc = 0;
        for u in &self.units {
            before.push(acc);
            acc += u.rows;
        }
        before.push(acc);
        let cuttable: Vec<usize> =
            (1..self.units.len()).filter(|&i| self.units[i - 1].max < self.units[i].min).collect();
        let mut cuts: Vec<usize> = Vec::new();
        for k in 1..n as u64 {
            let target = k * total / n as u64;
            let best = cuttable.iter().copied().min_by_key(|&i| before[i].abs_diff(target))?;
            if cuts.last().is_none_or(|&last| best > last) {
                cuts.push(best);
            }
        }
        if cuts.is_empty() {
            return None;
        }
        let bounds: Vec<usize> = std::iter::once(0).chain(cuts).chain(std::iter::once(self.units.len())).collect();
        let parts = bounds
            .windows(2)
            .map(|w| {
                let (start, end) = (w[0], w[1]);
                let (first, last) = (self.units[start].file, self.units[end - 1].file);
                let file_start = self.units.iter().position(|u| u.file == first).unwrap();
                let whole_files = (start == file_start) && self.units.get(end).is_none_or(|u| u.file != last);
                let slice = (!whole_files).then(|| (before[start] - before[file_start], before[end] - before[start]));
                RangePart { files: first..last + 1, slice, low: (start > 0).then(|| self.units[start].min) }
            })
            .collect();
        Some(parts)
    }
}

/// The footers of `paths`, in order; many are read on several threads (a scan of a thousand
/// files waits on a thousand reads otherwise: opening each, reading and decoding its footer).
fn footers(paths: &[PlRefPath]) -> Option<Vec<Arc<FileMetadata>>> {
    const FILES_PER_THREAD: usize = 32;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(paths.len() / FILES_PER_THREAD).max(1);
    if threads == 1 {
        return paths.iter().map(|p| metadata(p.as_str())).collect();
    }
    let chunk = paths.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let readers: Vec<_> = paths
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|p| metadata(p.as_str())).collect::<Option<Vec<_>>>()))
            .collect();
        let parts: Option<Vec<Vec<_>>> = readers.into_iter().map(|r| r.join().ok().flatten()).collect();
        parts.map(|p| p.concat())
    })
}

/// A local Parquet file's footer, read once per file version (size and modification time).
fn metadata(path: &str) -> Option<Arc<FileMetadata>> {
    type Key = (String, u64, SystemTime);
    static CACHE: LazyLock<Mutex<HashMap<Key, Arc<FileMetadata>>>> = LazyLock::new(Default::default);
    let path = path.strip_prefix("file://").unwrap_or(path);
    let stat = std::fs::metadata(path).ok()?;
    let key = (path.to_string(), stat.len(), stat.modified().ok()?);
    if let Some(md) = CACHE.lock().unwrap().get(&key) {
        return Some(md.clone());
    }
    let md = Arc::new(read_metadata(&mut File::open(path).ok()?).ok()?);
    let mut cache = CACHE.lock().unwrap();
    if cache.len() >= 4096 {
        cache.clear();
    }
    cache.insert(key, md.clone());
    Some(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units(ranges: &[(usize, u64, i64, i64)]) -> Clustered {
        Clustered {
            key: "k".into(),
            units: ranges.iter().map(|&(file, rows, min, max)| Unit { file, rows, min, max }).collect(),
        }
    }

    #[test]
    fn parts_are_whole_files_when_files_are_the_ranges() {
        let c = units(&[(0, 10, 1, 5), (0, 10, 6, 9), (1, 10, 10, 15), (1, 10, 16, 20)]);
        let parts = c.split(2).unwrap();
        assert_eq!(
            parts,
            vec![
                RangePart { files: 0..1, slice: None, low: None },
                RangePart { files: 1..2, slice: None, low: Some(10) },
            ]
        );
    }

    #[test]
    fn a_file_is_sliced_between_its_row_groups() {
        let c = units(&[(0, 10, 1, 5), (0, 10, 6, 9), (0, 10, 10, 15), (0, 10, 16, 20)]);
        let parts = c.split(2).unwrap();
        assert_eq!(
            parts,
            vec![
                RangePart { files: 0..1, slice: Some((0, 20)), low: None },
                RangePart { files: 0..1, slice: Some((20, 20)), low: Some(10) },
            ]
        );
    }

    #[test]
    fn a_key_spanning_two_row_groups_is_never_cut() {
        // Key 9 ends the first row group and starts the second: the only cut is before the third.
        let c = units(&[(0, 10, 1, 9), (0, 10, 9, 12), (1, 10, 13, 20), (1, 10, 21, 30)]);
        let parts = c.split(4).unwrap();
        let lows: Vec<Option<i64>> = parts.iter().map(|p| p.low).collect();
        assert_eq!(lows, vec![None, Some(13), Some(21)]);
        assert_eq!(parts[0], RangePart { files: 0..1, slice: None, low: None });
        assert_eq!(parts[1], RangePart { files: 1..2, slice: Some((0, 10)), low: Some(13) });
        assert!(units(&[(0, 10, 1, 5), (0, 10, 5, 9)]).split(2).is_none());
    }
}
