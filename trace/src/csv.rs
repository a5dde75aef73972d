//! CSV import and export.
//!
//! Import needs a header line naming at least `t_ns`, `offset` and `length`
//! (in any order); optional columns are `op` (`r`/`read`/`w`/`write`), `tid`
//! and `result`. Rows without `result` are taken as fully successful.

use std::io::{Read, Write};

use crate::record::{Class, Op, Record};

/// Errors importing or exporting CSV.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// A row has a value that does not parse.
    #[error("line {line}: column {column}: {why}")]
    BadValue {
        /// 1-based line number.
        line: u64,
        /// Column name.
        column: &'static str,
        /// Why.
        why: String,
    },
    /// The CSV itself is malformed.
    #[error("malformed CSV")]
    Csv(#[source] csv::Error),
    /// A line longer than any row of numbers (binary data, not CSV).
    #[error("line {line} is longer than {MAX_LINE} bytes: not a CSV trace")]
    LineTooLong {
        /// 1-based line number.
        line: u64,
    },
    /// A required column is missing from the header line.
    #[error("CSV header lacks the column `{0}` (need t_ns,offset,length)")]
    MissingColumn(&'static str),
}

struct Columns {
    t: usize,
    offset: usize,
    length: usize,
    op: Option<usize>,
    tid: Option<usize>,
    result: Option<usize>,
}

fn columns(headers: &csv::StringRecord) -> Result<Columns, CsvError> {
    let find = |name| headers.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let need = |name| find(name).ok_or(CsvError::MissingColumn(name));
    Ok(Columns {
        t: need("t_ns")?,
        offset: need("offset")?,
        length: need("length")?,
        op: find("op"),
        tid: find("tid"),
        result: find("result"),
    })
}

fn field<T: std::str::FromStr>(row: &csv::StringRecord, i: usize, line: u64, column: &'static str) -> Result<T, CsvError>
where
    T::Err: std::fmt::Display,
{
    let raw = row.get(i).unwrap_or("").trim();
    raw.parse().map_err(|e: T::Err| CsvError::BadValue { line, column, why: format!("{raw:?}: {e}") })
}

/// The longest line accepted: a row of a few numbers is far shorter.
pub const MAX_LINE: usize = 4096;

/// Fails a read once a line grows past [`MAX_LINE`], so that a stream
/// without newlines (`/dev/zero`) is refused instead of buffered forever.
struct LineLimit<R> {
    inner: R,
    line: u64,
    len: usize,
}

impl<R: Read> Read for LineLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            if b == b'\n' {
                self.line += 1;
                self.len = 0;
            } else {
                self.len += 1;
                if self.len > MAX_LINE {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, LongLine(self.line)));
                }
            }
        }
        Ok(n)
    }
}

/// The error [`LineLimit`] reads fail with.
#[derive(Debug)]
struct LongLine(u64);
impl std::fmt::Display for LongLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {} too long", self.0)
    }
}
impl std::error::Error for LongLine {}

fn csv_error(e: csv::Error) -> CsvError {
    if let csv::ErrorKind::Io(io) = e.kind()
        && let Some(LongLine(line)) = io.get_ref().and_then(|i| i.downcast_ref::<LongLine>())
    {
        return CsvError::LineTooLong { line: *line };
    }
    CsvError::Csv(e)
}

/// Reads records from CSV.
///
/// # Errors
/// A missing column or a value that does not parse, with its line number.
pub fn import(input: impl Read) -> Result<Vec<Record>, CsvError> {
    let limited = LineLimit { inner: input, line: 1, len: 0 };
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).comment(Some(b'#')).flexible(true).from_reader(limited);
    let cols = columns(rdr.headers().map_err(csv_error)?)?;
    let mut out = Vec::new();
    for row in rdr.records() {
        let row = row.map_err(csv_error)?;
        let line = row.position().map_or(0, |p| p.line());
        let t_ns = field(&row, cols.t, line, "t_ns")?;
        let offset: u64 = field(&row, cols.offset, line, "offset")?;
        let length: u64 = field(&row, cols.length, line, "length")?;
        if offset.checked_add(length).is_none() {
            return Err(CsvError::BadValue { line, column: "length", why: "offset + length overflows".into() });
        }
        let mut r = Record::read(t_ns, offset, length);
        if let Some(i) = cols.op {
            r.op = match row.get(i).unwrap_or("").trim().to_ascii_lowercase().as_str() {
                "r" | "read" | "" => Op::Read,
                "w" | "write" => Op::Write,
                other => return Err(CsvError::BadValue { line, column: "op", why: format!("{other:?} is not read or write") }),
            };
        }
        if let Some(i) = cols.tid {
            r.tid = field(&row, i, line, "tid")?;
        }
        if let Some(i) = cols.result {
            r.result = field(&row, i, line, "result")?;
        }
        out.push(r);
    }
    Ok(out)
}

/// Writes records as CSV: `t_ns,offset,length,op,tid,result,class`.
///
/// # Errors
/// I/O errors.
pub fn export(records: &[Record], out: impl Write) -> Result<(), CsvError> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record(["t_ns", "offset", "length", "op", "tid", "result", "class"]).map_err(CsvError::Csv)?;
    for r in records {
        let op = if r.op == Op::Read { "read" } else { "write" };
        let class = if r.class == Class::Data { "data" } else { "metadata" };
        w.write_record([
            r.t_ns.to_string(),
            r.offset.to_string(),
            r.length.to_string(),
            op.into(),
            r.tid.to_string(),
            r.result.to_string(),
            class.into(),
        ])
        .map_err(CsvError::Csv)?;
    }
    w.flush().map_err(|e| CsvError::Csv(e.into()))
}
