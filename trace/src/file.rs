//! The binary trace file (`.bctrace`). TRACE-FORMAT.md is the specification.
//!
//! A 128-byte little-endian header, a JSON block describing the recorder,
//! then fixed-size 48-byte records. The record count and a CRC of the records
//! are written when the trace is finished, so a trace cut short (a crash, a
//! full disk, a partial copy) is detected and reported, never used silently.

use std::io::{self, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};
use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::record::{Class, Op, Record};

/// First eight bytes of a trace file.
pub const MAGIC: [u8; 8] = *b"BCTRACE\n";
/// Size of the header.
pub const HEADER_SIZE: u32 = 128;
/// Size of one record.
pub const RECORD_SIZE: u32 = 48;
/// Largest info block a reader accepts.
pub const MAX_INFO_LEN: u32 = 1 << 20;
const UNFINISHED: u64 = u64::MAX;

/// The bytes of the regular file at `path`: a FIFO or device is refused
/// without blocking on it, and no more is read than the file's length.
fn read_regular(path: &std::path::Path) -> Result<Vec<u8>, TraceError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(flags.bits() as i32).open(path).map_err(TraceError::Io)?;
    let meta = file.metadata().map_err(TraceError::Io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(TraceError::NotAFile(match () {
            () if kind.is_dir() => "a directory",
            () if kind.is_fifo() => "a FIFO",
            () if kind.is_char_device() || kind.is_block_device() => "a device",
            () => "not a regular file",
        }));
    }
    let len = usize::try_from(meta.len()).map_err(|_| TraceError::Io(io::ErrorKind::OutOfMemory.into()))?;
    let mut bytes = Vec::with_capacity(len);
    // One byte more than the length tells a file that grows while read.
    file.take(meta.len() + 1).read_to_end(&mut bytes).map_err(TraceError::Io)?;
    Ok(bytes)
}

/// On-disk trace header.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawTraceHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// 1.
    pub version_major: U16,
    /// 0.
    pub version_minor: U16,
    /// 128.
    pub header_size: U32,
    /// Features a reader must know (none defined).
    pub incompatible: U64,
    /// Features a reader may ignore (none defined).
    pub compatible: U64,
    /// 48.
    pub record_size: U32,
    /// 0: guest offsets; 1: offsets in the image file (e.g. qcow2 host offsets).
    pub offset_space: u8,
    /// Zero.
    pub reserved0: [u8; 3],
    /// Number of records; all ones while the trace is being written.
    pub record_count: U64,
    /// Records the recorder lost (0 is the only clean value).
    pub lost_records: U64,
    /// Size of the traced image in bytes (0: unknown).
    pub image_size: U64,
    /// BLAKE3 of the traced image (all zero: unknown).
    pub image_digest: [u8; 32],
    /// Length of the JSON info block after the header.
    pub info_length: U32,
    /// CRC-32C of the info block and the records.
    pub body_crc32c: U32,
    /// Zero.
    pub reserved1: [u8; 20],
    /// CRC-32C of the header with this field zeroed.
    pub header_crc32c: U32,
}
const _: () = assert!(size_of::<RawTraceHeader>() == HEADER_SIZE as usize);

/// On-disk record.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRecord {
    /// Nanoseconds since the trace started.
    pub t_ns: U64,
    /// Offset.
    pub offset: U64,
    /// Length requested.
    pub length: U64,
    /// Bytes transferred or negative errno.
    pub result: I64,
    /// Thread id.
    pub tid: U32,
    /// 0 read, 1 write.
    pub op: u8,
    /// 0 data, 1 metadata.
    pub class: u8,
    /// Syscall that carried the request (0 unknown).
    pub source: u8,
    /// Zero.
    pub reserved: [u8; 9],
}
const _: () = assert!(size_of::<RawRecord>() == RECORD_SIZE as usize);

/// Which offsets the records hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetSpace {
    /// Guest disk offsets (raw images, or mapped from qcow2).
    #[default]
    Guest,
    /// Offsets in the image file, not yet mapped to the guest.
    ImageFile,
}

/// What was traced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageIdentity {
    /// Size in bytes (0 when unknown).
    pub size: u64,
    /// BLAKE3 of the image, when known.
    pub digest: Option<[u8; 32]>,
}

/// Who recorded the trace, and how. Free-form JSON beyond `recorder`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceInfo {
    /// Program and method, e.g. `bootcache 0.1.0 (csv import)`.
    pub recorder: String,
    /// Anything else (command line, marker, aio mode...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

/// A whole trace in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trace {
    /// The traced image.
    pub image: ImageIdentity,
    /// Which offsets the records hold.
    pub space: OffsetSpace,
    /// Records the recorder lost.
    pub lost_records: u64,
    /// Recorder information.
    pub info: TraceInfo,
    /// The records, in the order recorded.
    pub records: Vec<Record>,
}

/// Errors reading a trace file.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The body checksum does not match.
    #[error("trace records are corrupt (checksum {stored:#010x}, computed {computed:#010x})")]
    BadBodyChecksum {
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
    /// A header field is invalid.
    #[error("invalid trace header field {field}: {why}")]
    BadField {
        /// Field name.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// The header checksum does not match.
    #[error("trace header is corrupt (checksum mismatch)")]
    BadHeaderChecksum,
    /// The info block is not valid JSON.
    #[error("trace info block is invalid")]
    BadInfo(#[source] serde_json::Error),
    /// Not a trace file.
    #[error("not a bootcache trace (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// A record holds a value no recorder writes.
    #[error("record {index}: {why}")]
    BadRecord {
        /// Record number.
        index: u64,
        /// Why.
        why: &'static str,
    },
    /// I/O failed.
    #[error("cannot read or write the trace")]
    Io(#[source] io::Error),
    /// The path is not a regular file (a FIFO, a device, a directory).
    #[error("{0}, not a trace file")]
    NotAFile(&'static str),
    /// Bytes after the last record.
    #[error("{0} unexpected bytes after the last record")]
    TrailingBytes(u64),
    /// The file ends before all records promised by the header.
    #[error("trace is truncated: header promises {expected} records, file holds {complete} complete records and {stray} stray bytes")]
    Truncated {
        /// Records promised.
        expected: u64,
        /// Complete records present.
        complete: u64,
        /// Bytes of a partial record at the end.
        stray: u64,
    },
    /// The recorder never finished the trace.
    #[error("trace was never finished (the recorder stopped early); it holds {complete} complete records")]
    Unfinished {
        /// Complete records present.
        complete: u64,
    },
    /// A version this reader does not know.
    #[error("unsupported trace version {major}.{minor} or features {incompatible:#x}")]
    Unsupported {
        /// Major.
        major: u16,
        /// Minor.
        minor: u16,
        /// Incompatible bits.
        incompatible: u64,
    },
}

impl RawTraceHeader {
    fn crc(&self) -> u32 {
        let mut c = self.clone();
        c.header_crc32c = U32::ZERO;
        crc32c::crc32c(c.as_bytes())
    }
}

fn to_raw(r: &Record) -> RawRecord {
    RawRecord {
        t_ns: U64::new(r.t_ns),
        offset: U64::new(r.offset),
        length: U64::new(r.length),
        result: I64::new(r.result),
        tid: U32::new(r.tid),
        op: match r.op {
            Op::Read => 0,
            Op::Write => 1,
        },
        class: match r.class {
            Class::Data => 0,
            Class::Metadata => 1,
        },
        source: r.source,
        reserved: [0; 9],
    }
}

fn from_raw(index: u64, r: &RawRecord) -> Result<Record, TraceError> {
    let bad = |why| TraceError::BadRecord { index, why };
    let op = match r.op {
        0 => Op::Read,
        1 => Op::Write,
        _ => return Err(bad("unknown operation")),
    };
    let class = match r.class {
        0 => Class::Data,
        1 => Class::Metadata,
        _ => return Err(bad("unknown class")),
    };
    if r.offset.get().checked_add(r.length.get()).is_none() {
        return Err(bad("offset + length overflows"));
    }
    Ok(Record {
        t_ns: r.t_ns.get(),
        offset: r.offset.get(),
        length: r.length.get(),
        result: r.result.get(),
        op,
        class,
        tid: r.tid.get(),
        source: r.source,
    })
}

impl Trace {
    /// The boot reads' bytes in first-access order (the boot set D, each
    /// byte at the time it was first read).
    pub fn first_access_order(&self) -> crate::AccessOrder {
        crate::AccessOrder::from_timed(self.records.iter().filter_map(|r| Some((r.boot_bytes()?, r.t_ns))))
    }

    /// Parses a whole trace file held in memory.
    ///
    /// # Errors
    /// A bad header, a truncated or unfinished body, bad records.
    pub fn parse(bytes: &[u8]) -> Result<Trace, TraceError> {
        let (raw, _) = RawTraceHeader::ref_from_prefix(bytes).map_err(|_| TraceError::Truncated {
            expected: 0,
            complete: 0,
            stray: bytes.len() as u64,
        })?;
        if raw.magic != MAGIC {
            return Err(TraceError::BadMagic(raw.magic));
        }
        let (major, minor, incompatible) = (raw.version_major.get(), raw.version_minor.get(), raw.incompatible.get());
        if major != 1 || incompatible != 0 {
            return Err(TraceError::Unsupported { major, minor, incompatible });
        }
        if raw.crc() != raw.header_crc32c.get() && !cfg!(fuzzing) {
            return Err(TraceError::BadHeaderChecksum);
        }
        let field = |field, why: String| TraceError::BadField { field, why };
        if raw.header_size.get() != HEADER_SIZE || raw.record_size.get() != RECORD_SIZE {
            return Err(field("header_size", format!("header {} / record {}", raw.header_size, raw.record_size)));
        }
        let space = match raw.offset_space {
            0 => OffsetSpace::Guest,
            1 => OffsetSpace::ImageFile,
            n => return Err(field("offset_space", format!("unknown value {n}"))),
        };
        let info_len = raw.info_length.get();
        if info_len > MAX_INFO_LEN {
            return Err(field("info_length", format!("{info_len} exceeds {MAX_INFO_LEN}")));
        }
        let body = &bytes[HEADER_SIZE as usize..];
        let info_bytes =
            body.get(..info_len as usize).ok_or(TraceError::Truncated { expected: 0, complete: 0, stray: body.len() as u64 })?;
        let recs = &body[info_len as usize..];
        let complete = recs.len() as u64 / u64::from(RECORD_SIZE);
        let stray = recs.len() as u64 % u64::from(RECORD_SIZE);
        let expected = raw.record_count.get();
        if expected == UNFINISHED {
            return Err(TraceError::Unfinished { complete });
        }
        if complete < expected {
            return Err(TraceError::Truncated { expected, complete, stray });
        }
        if complete > expected || stray != 0 {
            return Err(TraceError::TrailingBytes(recs.len() as u64 - expected * u64::from(RECORD_SIZE)));
        }
        let computed = crc32c::crc32c(body);
        if computed != raw.body_crc32c.get() && !cfg!(fuzzing) {
            return Err(TraceError::BadBodyChecksum { stored: raw.body_crc32c.get(), computed });
        }
        let info = serde_json::from_slice(info_bytes).map_err(TraceError::BadInfo)?;
        let raws = <[RawRecord]>::ref_from_bytes(recs).map_err(|_| TraceError::TrailingBytes(stray))?;
        let records = raws.iter().enumerate().map(|(i, r)| from_raw(i as u64, r)).collect::<Result<_, _>>()?;
        let digest = (raw.image_digest != [0; 32]).then_some(raw.image_digest);
        Ok(Trace {
            image: ImageIdentity { size: raw.image_size.get(), digest },
            space,
            lost_records: raw.lost_records.get(),
            info,
            records,
        })
    }

    /// Reads a trace file.
    ///
    /// # Errors
    /// I/O errors and everything [`Trace::parse`] reports.
    pub fn open(path: &std::path::Path) -> Result<Trace, TraceError> {
        Trace::parse(&read_regular(path)?)
    }

    /// Writes the whole trace to `out`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_to<W: Write + Seek>(&self, out: W) -> Result<W, TraceError> {
        let mut w = TraceWriter::new(out, &self.image, self.space, &self.info)?;
        for r in &self.records {
            w.push(r)?;
        }
        w.lost(self.lost_records);
        w.finish()
    }
}

/// Streams records to a trace file; the header is completed by [`TraceWriter::finish`].
#[derive(Debug)]
pub struct TraceWriter<W: Write + Seek> {
    out: W,
    header: RawTraceHeader,
    crc: u32,
    count: u64,
}

impl<W: Write + Seek> TraceWriter<W> {
    /// Starts a trace: writes an unfinished header and the info block.
    ///
    /// # Errors
    /// I/O errors.
    pub fn new(mut out: W, image: &ImageIdentity, space: OffsetSpace, info: &TraceInfo) -> Result<Self, TraceError> {
        let info_bytes = serde_json::to_vec(info).map_err(|e| TraceError::Io(e.into()))?;
        let header = RawTraceHeader {
            magic: MAGIC,
            version_major: U16::new(1),
            version_minor: U16::new(0),
            header_size: U32::new(HEADER_SIZE),
            incompatible: U64::ZERO,
            compatible: U64::ZERO,
            record_size: U32::new(RECORD_SIZE),
            offset_space: match space {
                OffsetSpace::Guest => 0,
                OffsetSpace::ImageFile => 1,
            },
            reserved0: [0; 3],
            record_count: U64::new(UNFINISHED),
            lost_records: U64::ZERO,
            image_size: U64::new(image.size),
            image_digest: image.digest.unwrap_or([0; 32]),
            info_length: U32::new(u32::try_from(info_bytes.len()).unwrap_or(u32::MAX)),
            body_crc32c: U32::ZERO,
            reserved1: [0; 20],
            header_crc32c: U32::ZERO,
        };
        let mut h = header.clone();
        h.header_crc32c = U32::new(h.crc());
        out.write_all(h.as_bytes()).map_err(TraceError::Io)?;
        out.write_all(&info_bytes).map_err(TraceError::Io)?;
        Ok(TraceWriter { out, header, crc: crc32c::crc32c(&info_bytes), count: 0 })
    }

    /// Appends one record.
    ///
    /// # Errors
    /// I/O errors.
    pub fn push(&mut self, r: &Record) -> Result<(), TraceError> {
        let raw = to_raw(r);
        self.crc = crc32c::crc32c_append(self.crc, raw.as_bytes());
        self.out.write_all(raw.as_bytes()).map_err(TraceError::Io)?;
        self.count += 1;
        Ok(())
    }

    /// Records how many records the recorder lost.
    pub fn lost(&mut self, n: u64) {
        self.header.lost_records = U64::new(n);
    }

    /// Completes the header.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self) -> Result<W, TraceError> {
        self.header.record_count = U64::new(self.count);
        self.header.body_crc32c = U32::new(self.crc);
        self.header.header_crc32c = U32::new(self.header.crc());
        self.out.seek(SeekFrom::Start(0)).map_err(TraceError::Io)?;
        self.out.write_all(self.header.as_bytes()).map_err(TraceError::Io)?;
        self.out.seek(SeekFrom::End(0)).map_err(TraceError::Io)?;
        self.out.flush().map_err(TraceError::Io)?;
        Ok(self.out)
    }
}
