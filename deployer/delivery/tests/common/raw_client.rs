//! A minimal NBD client over a unix socket, to speak the wire protocol
//! directly (what QEMU would not send).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub async fn go(sock: &std::path::Path, name: &str) -> Result<(UnixStream, u64, u16), String> {
    let mut s = UnixStream::connect(sock).await.unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).await.unwrap(); // fixed newstyle, no zeroes
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).await.unwrap();
    let (mut size, mut flags) = (0, 0);
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await.unwrap();
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        match kind {
            1 => return Ok((s, size, flags)),
            3 if u16::from_be_bytes([body[0], body[1]]) == 0 => {
                size = u64::from_be_bytes(body[2..10].try_into().unwrap());
                flags = u16::from_be_bytes(body[10..12].try_into().unwrap());
            }
            3 => {}
            k if k & (1 << 31) != 0 => return Err(String::from_utf8_lossy(&body).into_owned()),
            k => panic!("unexpected reply {k}"),
        }
    }
}

/// Sends one request; returns the reply's error and data (for reads).
pub async fn request(s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r.extend_from_slice(payload);
    s.write_all(&r).await.unwrap();
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(u32::from_be_bytes(head[..4].try_into().unwrap()), 0x6744_6698);
    assert_eq!(u64::from_be_bytes(head[8..16].try_into().unwrap()), cookie);
    let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 && kind == 0 { len as usize } else { 0 }];
    s.read_exact(&mut data).await.unwrap();
    (error, data)
}

/// Sends a read request without waiting for its reply.
pub async fn send_read(s: &mut UnixStream, cookie: u64, offset: u64, len: u32) {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    s.write_all(&r).await.unwrap();
}

/// Whether the server has closed `s` (end of stream or an error), waiting
/// at most `limit` for it; bytes it sends meanwhile are skipped.
pub async fn closed_within(s: &mut UnixStream, limit: std::time::Duration) -> bool {
    let mut buf = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}
