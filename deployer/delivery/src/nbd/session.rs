//! One NBD connection: handshake, then transmission.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use zerocopy::{FromBytes, IntoBytes};

use super::proto::*;
use super::{Export, NbdServer, ReadError};

/// Longest option payload accepted (names are at most 4096 bytes).
const MAX_OPTION: u32 = 8 << 10;
/// Replies of one connection queued for sending (their data is bounded by
/// the budgets; this bounds the small ones).
const IN_FLIGHT: usize = 64;
/// The budgets' unit.
const PAGE: u64 = 4096;

/// Pages of `bytes`, as a semaphore count.
pub(super) fn pages_of(bytes: u64) -> usize {
    usize::try_from(bytes.div_ceil(PAGE)).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS)
}

pub(super) async fn run<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(server: Arc<NbdServer>, stream: S) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let limit = server.limits.handshake_timeout;
    match tokio::time::timeout(limit, handshake(&server, &mut rd, &mut wr)).await {
        Ok(Ok(Some((export, structured)))) => {
            if let Err(e) = transmission(&server, export, structured, rd, wr).await {
                tracing::debug!(error = %e, "NBD connection ended");
            }
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "NBD handshake failed"),
        Err(_) => tracing::debug!(?limit, "NBD handshake did not end in time"),
    }
}

/// The largest read this server answers: the protocol's limit, or less if
/// a connection's budget is smaller.
fn max_read(server: &NbdServer) -> u32 {
    u32::try_from(server.limits.connection_bytes / PAGE * PAGE).unwrap_or(u32::MAX).clamp(4096, MAX_REQUEST)
}

async fn reply(wr: &mut (impl AsyncWrite + Unpin), option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let head = OptionReply {
        magic: REPLY_MAGIC.into(),
        option: option.into(),
        reply: kind.into(),
        length: u32::try_from(data.len()).unwrap_or(u32::MAX).into(),
    };
    wr.write_all(head.as_bytes()).await?;
    wr.write_all(data).await
}

/// Negotiates; returns the export chosen and whether structured replies
/// were agreed, or `None` if the client left.
async fn handshake(
    server: &NbdServer,
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
) -> io::Result<Option<(Arc<dyn Export>, bool)>> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&greeting).await?;
    wr.flush().await?;
    let client = rd.read_u32().await?;
    if client & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(io::Error::other("client does not speak fixed newstyle"));
    }
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let tflags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    let mut structured = false;
    loop {
        let mut head = [0u8; size_of::<OptionHeader>()];
        rd.read_exact(&mut head).await?;
        let head = OptionHeader::read_from_bytes(&head).map_err(|_| io::Error::other("short option"))?;
        if head.magic.get() != IHAVEOPT {
            return Err(io::Error::other("bad option magic"));
        }
        let (option, length) = (head.option.get(), head.length.get());
        if length > MAX_OPTION {
            return Err(io::Error::other(format!("option {option} of {length} bytes: too long")));
        }
        let mut data = vec![0u8; length as usize];
        rd.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = server.get(&name) else {
                    return Err(io::Error::other(format!("no export {name:?}")));
                };
                wr.write_all(&export.size().to_be_bytes()).await?;
                wr.write_all(&tflags.to_be_bytes()).await?;
                if !no_zeroes {
                    wr.write_all(&[0u8; 124]).await?;
                }
                wr.flush().await?;
                return Ok(Some((export, structured)));
            }
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                structured = true;
                reply(wr, option, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => reply(wr, option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data").await?,
            OPT_ABORT => {
                reply(wr, option, REP_ACK, &[]).await?;
                wr.flush().await?;
                return Ok(None);
            }
            OPT_LIST if data.is_empty() => {
                for name in server.names() {
                    let mut d = u32::try_from(name.len()).unwrap_or(0).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(wr, option, REP_SERVER, &d).await?;
                }
                reply(wr, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => match parse_info(&data) {
                None => reply(wr, option, REP_ERR_INVALID, b"malformed request").await?,
                Some((name, infos)) => match server.get(&name) {
                    None => reply(wr, option, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes()).await?,
                    Some(export) => {
                        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                        d.extend_from_slice(&export.size().to_be_bytes());
                        d.extend_from_slice(&tflags.to_be_bytes());
                        reply(wr, option, REP_INFO, &d).await?;
                        if infos.contains(&INFO_BLOCK_SIZE) {
                            let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                            for v in [1u32, 4096, max_read(server)] {
                                d.extend_from_slice(&v.to_be_bytes());
                            }
                            reply(wr, option, REP_INFO, &d).await?;
                        }
                        reply(wr, option, REP_ACK, &[]).await?;
                        if option == OPT_GO {
                            wr.flush().await?;
                            return Ok(Some((export, structured)));
                        }
                    }
                },
            },
            OPT_LIST => reply(wr, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data").await?,
            _ => reply(wr, option, REP_ERR_UNSUP, b"").await?,
        }
        wr.flush().await?;
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: name length, name, info count, infos.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(len)?)?;
    let rest = &data[4 + len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let infos = rest.get(2..)?;
    if infos.len() != count * 2 {
        return None;
    }
    let infos = infos.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some((String::from_utf8(name.to_vec()).ok()?, infos))
}

/// A reply as sent: the 16-byte simple reply header (or a chunk's), then
/// any data; with the budget it holds until it is written.
pub(super) struct Frame {
    bytes: Vec<u8>,
    budget: Option<Budget>,
}

/// Read budget held for a reply: this connection's pages and the server's.
struct Budget {
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

impl From<Vec<u8>> for Frame {
    fn from(bytes: Vec<u8>) -> Self {
        Frame { bytes, budget: None }
    }
}

const HEAD: usize = size_of::<SimpleReply>();

fn put_head(frame: &mut [u8], cookie: u64, error: u32) {
    let head = SimpleReply { magic: SIMPLE_REPLY_MAGIC.into(), error: error.into(), cookie: cookie.into() };
    frame[..HEAD].copy_from_slice(head.as_bytes());
}

fn frame(cookie: u64, error: u32) -> Frame {
    let mut f = vec![0u8; HEAD];
    put_head(&mut f, cookie, error);
    f.into()
}

/// A structured reply chunk: header for a payload of `payload` bytes, the
/// buffer sized to hold it (the caller fills the payload).
fn chunk(pool: &Pool, cookie: u64, flags: u16, kind: u16, payload: usize) -> Vec<u8> {
    let mut f = pool.take(CHUNK + payload);
    let head = ChunkHeader {
        magic: STRUCTURED_REPLY_MAGIC.into(),
        flags: flags.into(),
        kind: kind.into(),
        cookie: cookie.into(),
        length: u32::try_from(payload).unwrap_or(u32::MAX).into(),
    };
    f[..CHUNK].copy_from_slice(head.as_bytes());
    f
}
const CHUNK: usize = size_of::<ChunkHeader>();

fn error_chunk(pool: &Pool, cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    let mut f = chunk(pool, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len());
    f[CHUNK..CHUNK + 4].copy_from_slice(&error.to_be_bytes());
    f[CHUNK + 4..CHUNK + 6].copy_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    f[CHUNK + 6..].copy_from_slice(msg);
    f
}

/// A read answered in structured chunks: data where there is data, holes
/// where the export knows the bytes are zero (sent as a length, not bytes).
async fn structured_read(export: &dyn Export, pool: &Pool, cookie: u64, offset: u64, length: u32, one_chunk: bool) -> Vec<Vec<u8>> {
    let end = offset + u64::from(length);
    let holes = if one_chunk { Vec::new() } else { export.zeros(offset..end) };
    let mut pieces = Vec::new();
    let mut pos = offset;
    for h in holes {
        if h.start > pos {
            pieces.push((pos..h.start, false));
        }
        pieces.push((h.clone(), true));
        pos = h.end;
    }
    if pos < end {
        pieces.push((pos..end, false));
    }
    let mut frames = Vec::with_capacity(pieces.len().max(1));
    for (r, hole) in pieces {
        let len = (r.end - r.start) as usize;
        if hole {
            let mut f = chunk(pool, cookie, 0, REPLY_TYPE_OFFSET_HOLE, 12);
            f[CHUNK..CHUNK + 8].copy_from_slice(&r.start.to_be_bytes());
            f[CHUNK + 8..].copy_from_slice(&u32::try_from(len).unwrap_or(0).to_be_bytes());
            frames.push(f);
        } else {
            let mut f = chunk(pool, cookie, 0, REPLY_TYPE_OFFSET_DATA, 8 + len);
            f[CHUNK..CHUNK + 8].copy_from_slice(&r.start.to_be_bytes());
            if let Err(e) = export.read(r.start, &mut f[CHUNK + 8..]).await {
                let code = errno(&e, r.start, len as u64);
                frames.into_iter().chain([f]).for_each(|f| pool.give(f));
                return vec![error_chunk(pool, cookie, code, &e.to_string())];
            }
            frames.push(f);
        }
    }
    match frames.last_mut() {
        Some(last) => last[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes()),
        None => frames.push(chunk(pool, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)),
    }
    frames
}

/// Reply buffers, reused so that reads neither allocate nor fault in fresh
/// pages (a 1 MiB `Vec` is a new mapping every time otherwise); shared by
/// the server's connections and capped in bytes.
#[derive(Default)]
pub(super) struct Pool(std::sync::Mutex<(Vec<Vec<u8>>, usize)>);

impl Pool {
    /// Bytes of buffers kept at most.
    const KEEP_BYTES: usize = 32 << 20;
    /// Largest buffer kept.
    const LARGEST: usize = 4 << 20;

    fn take(&self, len: usize) -> Vec<u8> {
        let mut v = {
            let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let v = pool.0.pop().unwrap_or_default();
            pool.1 -= v.capacity();
            v
        };
        v.resize(len, 0);
        v
    }

    fn give(&self, v: Vec<u8>) {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.capacity() <= Self::LARGEST && pool.1 + v.capacity() <= Self::KEEP_BYTES {
            pool.1 += v.capacity();
            pool.0.push(v);
        }
    }
}

/// The connection's side of the budgets.
struct Budgets {
    connection: Arc<Semaphore>,
    server: Arc<Semaphore>,
}

impl Budgets {
    /// Waits for room for a read of `length` bytes in both budgets; `None`
    /// if the server is shutting the budget down.
    async fn take(&self, length: u32) -> Option<Budget> {
        let pages = u32::try_from(pages_of(u64::from(length).max(1))).unwrap_or(u32::MAX);
        let connection = Arc::clone(&self.connection).acquire_many_owned(pages).await.ok()?;
        let server = Arc::clone(&self.server).acquire_many_owned(pages).await.ok()?;
        Some(Budget { _connection: connection, _server: server })
    }
}

/// Reads the next request header: waits as long as the client likes for
/// its first byte, then gives the rest `limit`. `None` at a clean end.
async fn next_request(rd: &mut (impl AsyncRead + Unpin), limit: std::time::Duration) -> io::Result<Option<Request>> {
    let mut head = [0u8; size_of::<Request>()];
    if rd.read(&mut head[..1]).await? == 0 {
        return Ok(None);
    }
    match tokio::time::timeout(limit, rd.read_exact(&mut head[1..])).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "a request did not arrive whole in time")),
    }
    Request::read_from_bytes(&head).map(Some).map_err(|_| io::Error::other("short request"))
}

async fn transmission(
    server: &Arc<NbdServer>,
    export: Arc<dyn Export>,
    structured: bool,
    mut rd: impl AsyncRead + Unpin,
    wr: impl AsyncWrite + Unpin + Send + 'static,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Frame>(IN_FLIGHT);
    let returns = Arc::clone(server);
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::with_capacity(64 << 10, wr);
        while let Some(frame) = rx.recv().await {
            wr.write_all(&frame.bytes).await?;
            // Written: its bytes and its budget go back.
            returns.pool.give(frame.bytes);
            drop(frame.budget);
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    });
    let budgets =
        Budgets { connection: Arc::new(Semaphore::new(pages_of(server.limits.connection_bytes))), server: Arc::clone(&server.budget) };
    let (size, max, limit) = (export.size(), max_read(server), server.limits.request_timeout);
    let result = loop {
        let req = tokio::select! {
            r = next_request(&mut rd, limit) => r,
            // The writer failed (a client that does not read its replies).
            () = tx.closed() => break Ok(()),
        };
        let req = match req {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        };
        if req.magic.get() != REQUEST_MAGIC {
            break Err(io::Error::other("bad request magic"));
        }
        let (cookie, offset, length) = (req.cookie.get(), req.offset.get(), req.length.get());
        let in_range = offset.checked_add(u64::from(length)).is_some_and(|end| end <= size);
        match req.kind.get() {
            CMD_READ if !in_range || length > max => {
                let f = if structured {
                    error_chunk(&server.pool, cookie, EINVAL, "read outside the export or too long").into()
                } else {
                    frame(cookie, EINVAL)
                };
                let _ = tx.send(f).await;
            }
            CMD_READ => {
                let Some(budget) = budgets.take(length).await else { break Ok(()) };
                let (export, tx, server) = (Arc::clone(&export), tx.clone(), Arc::clone(server));
                let one_chunk = req.flags.get() & CMD_FLAG_DF != 0;
                tokio::spawn(async move {
                    let mut frames: Vec<Frame> = if structured {
                        structured_read(export.as_ref(), &server.pool, cookie, offset, length, one_chunk)
                            .await
                            .into_iter()
                            .map(Frame::from)
                            .collect()
                    } else {
                        vec![simple_read(export.as_ref(), &server.pool, cookie, offset, length).await.into()]
                    };
                    // The budget is released once the last frame is written.
                    if let Some(last) = frames.last_mut() {
                        last.budget = Some(budget);
                    }
                    for f in frames {
                        if tx.send(f).await.is_err() {
                            break;
                        }
                    }
                });
            }
            CMD_WRITE => {
                // Consume the payload, then refuse: the export is read-only.
                if length > MAX_REQUEST {
                    break Err(io::Error::other("write larger than the maximum request"));
                }
                let mut sink = (&mut rd).take(u64::from(length));
                match tokio::time::timeout(limit, tokio::io::copy(&mut sink, &mut tokio::io::sink())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(_) => break Err(io::Error::new(io::ErrorKind::TimedOut, "a write's payload did not arrive in time")),
                }
                let _ = tx.send(frame(cookie, EPERM)).await;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let _ = tx.send(frame(cookie, EPERM)).await;
            }
            CMD_FLUSH => {
                let _ = tx.send(frame(cookie, 0)).await;
            }
            CMD_CACHE if in_range => {
                // A hint: fetch into the cache without sending data back.
                let length = length.min(max);
                let Some(budget) = budgets.take(length).await else { break Ok(()) };
                let (export, tx, server) = (Arc::clone(&export), tx.clone(), Arc::clone(server));
                tokio::spawn(async move {
                    let mut scratch = server.pool.take(length as usize);
                    let error = if export.read(offset, &mut scratch).await.is_ok() { 0 } else { EIO };
                    server.pool.give(scratch);
                    drop(budget);
                    let _ = tx.send(frame(cookie, error)).await;
                });
            }
            CMD_DISC => break Ok(()),
            _ => {
                let _ = tx.send(frame(cookie, EINVAL)).await;
            }
        }
    };
    drop(tx);
    // Replies still being produced are sent before the connection closes.
    writer.await.map_err(io::Error::other)??;
    result
}

/// A read answered in a simple reply.
async fn simple_read(export: &dyn Export, pool: &Pool, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut f = pool.take(HEAD + length as usize);
    let error = match export.read(offset, &mut f[HEAD..]).await {
        Ok(()) => 0,
        Err(e) => {
            f.truncate(HEAD);
            errno(&e, offset, u64::from(length))
        }
    };
    put_head(&mut f, cookie, error);
    f
}

/// The errno a client gets for a read that failed (logged here, once).
fn errno(e: &ReadError, offset: u64, len: u64) -> u32 {
    let code = match e {
        ReadError::OutOfRange { .. } => EINVAL,
        ReadError::Closed { .. } => ESHUTDOWN,
        _ => EIO,
    };
    tracing::warn!(offset, len, error = %e, code, "NBD read failed");
    code
}

#[cfg(test)]
mod tests {
    use super::parse_info;

    #[test]
    fn info_requests_are_parsed_and_malformed_ones_refused() {
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(parse_info(&d), Some(("disk".into(), vec![3, 0])));
        assert_eq!(parse_info(&d[..d.len() - 1]), None, "odd info list");
        assert_eq!(parse_info(&d[..6]), None, "name cut short");
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert_eq!(parse_info(&huge), None, "name length past the data");
        assert_eq!(parse_info(&[]), None);
    }
}
