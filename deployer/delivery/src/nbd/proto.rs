//! NBD wire constants and messages (network byte order), after the
//! protocol document (`doc/proto.md` of the NBD project).

use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Server greeting magic: "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle option magic: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// FLUSH is accepted.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Several connections see the same data.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE (prefetch hint) is accepted.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Ask about an export.
pub const OPT_INFO: u32 = 6;
/// Ask about an export and start transmission.
pub const OPT_GO: u32 = 7;

/// Structured replies (needed for holes).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option replies.
pub const REP_ACK: u32 = 1;
/// One export in a list.
pub const REP_SERVER: u32 = 2;
/// Information about an export.
pub const REP_INFO: u32 = 3;
/// Error: option not supported.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Error: malformed option.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Errors (errno values as NBD defines them).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// The server is shutting the export down.
pub const ESHUTDOWN: u32 = 108;

/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Chunk flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: offset, then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: offset and length of a run of zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: error, message length, message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Command flag: the client wants the read in one chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;

/// The largest request served (also advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;

/// Client option header.
#[derive(Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct OptionHeader {
    /// IHAVEOPT.
    pub magic: U64,
    /// Option code.
    pub option: U32,
    /// Length of the data that follows.
    pub length: U32,
}

/// Server option reply header.
#[derive(Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct OptionReply {
    /// REPLY_MAGIC.
    pub magic: U64,
    /// The option answered.
    pub option: U32,
    /// Reply type.
    pub reply: U32,
    /// Length of the data that follows.
    pub length: U32,
}

/// Transmission request.
#[derive(Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Request {
    /// REQUEST_MAGIC.
    pub magic: U32,
    /// Command flags.
    pub flags: U16,
    /// Command.
    pub kind: U16,
    /// Client's cookie, echoed.
    pub cookie: U64,
    /// Offset.
    pub offset: U64,
    /// Length.
    pub length: U32,
}

/// Simple reply header.
#[derive(Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct SimpleReply {
    /// SIMPLE_REPLY_MAGIC.
    pub magic: U32,
    /// 0 or an errno.
    pub error: U32,
    /// The request's cookie.
    pub cookie: U64,
}

/// Structured reply chunk header.
#[derive(Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ChunkHeader {
    /// STRUCTURED_REPLY_MAGIC.
    pub magic: U32,
    /// REPLY_FLAG_*.
    pub flags: U16,
    /// REPLY_TYPE_*.
    pub kind: U16,
    /// The request's cookie.
    pub cookie: U64,
    /// Payload length.
    pub length: U32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_sizes_match_the_protocol() {
        assert_eq!(size_of::<OptionHeader>(), 16);
        assert_eq!(size_of::<OptionReply>(), 20);
        assert_eq!(size_of::<Request>(), 28);
        assert_eq!(size_of::<SimpleReply>(), 16);
        assert_eq!(size_of::<ChunkHeader>(), 20);
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
