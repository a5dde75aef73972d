//! One traced I/O request.

use std::ops::Range;

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Op {
    /// A read of the image.
    #[default]
    Read,
    /// A write to the image.
    Write,
}

/// What part of the image a request touched, when the recorder knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Class {
    /// Guest data (or unknown).
    #[default]
    Data,
    /// Image-format metadata (qcow2 header, L1/L2 or refcount tables).
    Metadata,
}

/// One request as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Record {
    /// Nanoseconds since the trace started.
    pub t_ns: u64,
    /// Offset of the request.
    pub offset: u64,
    /// Length requested.
    pub length: u64,
    /// Bytes transferred, or a negative errno.
    pub result: i64,
    /// Read or write.
    pub op: Op,
    /// Thread that issued it (0 when unknown).
    pub tid: u32,
    /// Data or metadata.
    pub class: Class,
    /// The syscall that carried it (0: unknown or imported; see TRACE-FORMAT.md).
    pub source: u8,
}

impl Record {
    /// A successful read of `length` bytes at `offset`.
    pub fn read(t_ns: u64, offset: u64, length: u64) -> Record {
        let result = i64::try_from(length).unwrap_or(i64::MAX);
        Record { t_ns, offset, length, result, ..Record::default() }
    }

    /// The bytes actually transferred: `[offset, offset + min(result, length))`,
    /// or `None` for failed and empty requests.
    pub fn transferred(&self) -> Option<Range<u64>> {
        let done = u64::try_from(self.result).ok()?.min(self.length);
        (done > 0).then(|| self.offset..self.offset.saturating_add(done))
    }

    /// The guest data bytes this record adds to a boot set: successful data reads only.
    pub fn boot_bytes(&self) -> Option<Range<u64>> {
        if self.op == Op::Read && self.class == Class::Data { self.transferred() } else { None }
    }
}
