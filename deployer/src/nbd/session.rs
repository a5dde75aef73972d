//! One NBD connection: handshake, then transmission.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Semaphore, mpsc};
use zerocopy::{FromBytes, IntoBytes};

use super::proto::*;
use super::{Export, NbdServer};

/// Longest option payload accepted (names are at most 4096 bytes).
const MAX_OPTION: u32 = 8 << 10;
/// Replies of one connection queued for sending.
const IN_FLIGHT: usize = 64;
/// Bytes of reads one connection may have in flight (in 4 KiB units), so a
/// client cannot make the server hold more than this for it.
const IN_FLIGHT_PAGES: u32 = (64 << 20) / 4096;

pub(super) async fn run<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(server: Arc<NbdServer>, stream: S) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    match handshake(&server, &mut rd, &mut wr).await {
        Ok(Some(export)) => {
            if let Err(e) = transmission(export, rd, wr).await {
                tracing::debug!(error = %e, "NBD connection ended");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "NBD handshake failed"),
    }
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

/// Negotiates; returns the export chosen, or `None` if the client left.
async fn handshake(
    server: &NbdServer,
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
) -> io::Result<Option<Arc<dyn Export>>> {
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
                return Ok(Some(export));
            }
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
                            for v in [1u32, 4096, MAX_REQUEST] {
                                d.extend_from_slice(&v.to_be_bytes());
                            }
                            reply(wr, option, REP_INFO, &d).await?;
                        }
                        reply(wr, option, REP_ACK, &[]).await?;
                        if option == OPT_GO {
                            wr.flush().await?;
                            return Ok(Some(export));
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

type Frame = (SimpleReply, Vec<u8>);

fn frame(cookie: u64, error: u32, data: Vec<u8>) -> Frame {
    (SimpleReply { magic: SIMPLE_REPLY_MAGIC.into(), error: error.into(), cookie: cookie.into() }, data)
}

async fn transmission(
    export: Arc<dyn Export>,
    mut rd: impl AsyncRead + Unpin,
    wr: impl AsyncWrite + Unpin + Send + 'static,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Frame>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        while let Some((head, data)) = rx.recv().await {
            wr.write_all(head.as_bytes()).await?;
            wr.write_all(&data).await?;
            if rx.is_empty() {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        wr.shutdown().await
    });
    let permits = Arc::new(Semaphore::new(IN_FLIGHT_PAGES as usize));
    let pages = |len: u32| len.div_ceil(4096).max(1);
    let size = export.size();
    let result = loop {
        let mut head = [0u8; size_of::<Request>()];
        if let Err(e) = rd.read_exact(&mut head).await {
            break if e.kind() == io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
        }
        let Ok(req) = Request::read_from_bytes(&head) else { break Err(io::Error::other("short request")) };
        if req.magic.get() != REQUEST_MAGIC {
            break Err(io::Error::other("bad request magic"));
        }
        let (cookie, offset, length) = (req.cookie.get(), req.offset.get(), req.length.get());
        let in_range = offset.checked_add(u64::from(length)).is_some_and(|end| end <= size);
        match req.kind.get() {
            CMD_READ if !in_range || length > MAX_REQUEST => {
                let _ = tx.send(frame(cookie, EINVAL, Vec::new())).await;
            }
            CMD_READ => {
                let Ok(permit) = Arc::clone(&permits).acquire_many_owned(pages(length)).await else { break Ok(()) };
                let (export, tx) = (Arc::clone(&export), tx.clone());
                tokio::spawn(async move {
                    let f = match export.read(offset, length).await {
                        Ok(data) if data.len() == length as usize => frame(cookie, 0, data),
                        Ok(_) => frame(cookie, EIO, Vec::new()),
                        Err(e) => {
                            tracing::warn!(offset, length, error = %e, "NBD read failed; the client gets EIO");
                            frame(cookie, EIO, Vec::new())
                        }
                    };
                    let _ = tx.send(f).await;
                    drop(permit);
                });
            }
            CMD_WRITE => {
                // Consume the payload, then refuse: the export is read-only.
                if length > MAX_REQUEST {
                    break Err(io::Error::other("write larger than the maximum request"));
                }
                let mut sink = (&mut rd).take(u64::from(length));
                tokio::io::copy(&mut sink, &mut tokio::io::sink()).await?;
                let _ = tx.send(frame(cookie, EPERM, Vec::new())).await;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let _ = tx.send(frame(cookie, EPERM, Vec::new())).await;
            }
            CMD_FLUSH => {
                let _ = tx.send(frame(cookie, 0, Vec::new())).await;
            }
            CMD_CACHE if in_range => {
                // A hint: fetch into the cache without sending data back.
                let length = length.min(MAX_REQUEST);
                let Ok(permit) = Arc::clone(&permits).acquire_many_owned(pages(length)).await else { break Ok(()) };
                let (export, tx) = (Arc::clone(&export), tx.clone());
                tokio::spawn(async move {
                    let error = if export.read(offset, length).await.is_ok() { 0 } else { EIO };
                    let _ = tx.send(frame(cookie, error, Vec::new())).await;
                    drop(permit);
                });
            }
            CMD_DISC => break Ok(()),
            _ => {
                let _ = tx.send(frame(cookie, EINVAL, Vec::new())).await;
            }
        }
    };
    drop(tx);
    // Replies still being produced are sent before the connection closes.
    writer.await.map_err(io::Error::other)??;
    result
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
