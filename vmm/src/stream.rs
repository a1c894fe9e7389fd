//! The migration stream: a header, then typed, length-prefixed sections,
//! then an end marker; the destination answers with one acknowledgement.
//!
//! ```text
//!  "BATONMIG" version:u32
//!  section: tag:u8 len:u64 payload[len]
//!    1 CONFIG  memory:u64 vcpus:u32
//!    2 RAM     first_page:u64 count:u32 pages[count * 4096]
//!    3 VCPU    id:u32 kvm_regs kvm_sregs        (this build's layouts)
//!    4 DEVICE  consumed:u32
//!    255 END   (empty)
//!  ack: 0 | 1 len:u32 message[len]
//! ```
//!
//! I9: anything unknown, truncated or inconsistent fails the incoming side
//! with an error that says what and where; nothing is skipped.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::vcpu::VcpuState;

pub const MAGIC: &[u8; 8] = b"BATONMIG";
pub const VERSION: u32 = 1;
pub const PAGE: usize = 4096;

pub const CONFIG: u8 = 1;
pub const RAM: u8 = 2;
pub const VCPU: u8 = 3;
pub const DEVICE: u8 = 4;
pub const END: u8 = 255;

/// Largest section accepted (a RAM run of 16 MiB plus its header).
pub const MAX_SECTION: u64 = (16 << 20) + 12;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("i/o on the migration stream")]
    Io(#[from] std::io::Error),
    #[error("not a baton migration stream (bad magic)")]
    BadMagic,
    #[error("migration stream version {0} is not supported (this build speaks {VERSION})")]
    Version(u32),
    #[error("unknown section type {0}")]
    UnknownSection(u8),
    #[error("section {tag} of {len} bytes: {why}")]
    BadSection { tag: u8, len: u64, why: String },
}

/// One decoded section.
#[derive(Debug)]
pub enum Section {
    Config { memory: u64, vcpus: u32 },
    Ram { first_page: u64, data: Vec<u8> },
    Vcpu { id: u32, state: Box<VcpuState> },
    Device { consumed: u32 },
    End,
}

const REGS: usize = std::mem::size_of::<kvm_bindings::kvm_regs>();
const SREGS: usize = std::mem::size_of::<kvm_bindings::kvm_sregs>();

fn vcpu_bytes(st: &VcpuState) -> Vec<u8> {
    let mut v = Vec::with_capacity(REGS + SREGS);
    // SAFETY: kvm_regs and kvm_sregs are plain C structs of integers with no
    // padding-dependent invariants; reading their bytes is sound.
    unsafe {
        v.extend_from_slice(std::slice::from_raw_parts(std::ptr::addr_of!(st.regs).cast::<u8>(), REGS));
        v.extend_from_slice(std::slice::from_raw_parts(std::ptr::addr_of!(st.sregs).cast::<u8>(), SREGS));
    }
    v
}

fn vcpu_from(b: &[u8]) -> Option<VcpuState> {
    if b.len() != REGS + SREGS {
        return None;
    }
    // SAFETY: the lengths match the structs exactly, the reads are unaligned
    // reads of plain integer structs, and every bit pattern is a valid value.
    unsafe {
        let regs = std::ptr::read_unaligned(b.as_ptr().cast::<kvm_bindings::kvm_regs>());
        let sregs = std::ptr::read_unaligned(b[REGS..].as_ptr().cast::<kvm_bindings::kvm_sregs>());
        Some(VcpuState { regs, sregs })
    }
}

pub async fn write_header<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(MAGIC).await?;
    w.write_u32(VERSION).await
}

async fn section<W: AsyncWrite + Unpin>(w: &mut W, tag: u8, parts: &[&[u8]]) -> std::io::Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    w.write_u8(tag).await?;
    w.write_u64(len as u64).await?;
    for p in parts {
        w.write_all(p).await?;
    }
    Ok(())
}

pub async fn write_config<W: AsyncWrite + Unpin>(w: &mut W, memory: u64, vcpus: u32) -> std::io::Result<()> {
    section(w, CONFIG, &[&memory.to_be_bytes(), &vcpus.to_be_bytes()]).await
}

pub async fn write_ram<W: AsyncWrite + Unpin>(w: &mut W, first_page: u64, pages: &[u8]) -> std::io::Result<()> {
    section(w, RAM, &[&first_page.to_be_bytes(), &((pages.len() / PAGE) as u32).to_be_bytes(), pages]).await
}

pub async fn write_vcpu<W: AsyncWrite + Unpin>(w: &mut W, id: u32, st: &VcpuState) -> std::io::Result<()> {
    section(w, VCPU, &[&id.to_be_bytes(), &vcpu_bytes(st)]).await
}

pub async fn write_device<W: AsyncWrite + Unpin>(w: &mut W, consumed: u32) -> std::io::Result<()> {
    section(w, DEVICE, &[&consumed.to_be_bytes()]).await
}

pub async fn write_end<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    section(w, END, &[]).await?;
    w.flush().await
}

pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), StreamError> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m).await?;
    if &m != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let v = r.read_u32().await?;
    if v != VERSION {
        return Err(StreamError::Version(v));
    }
    Ok(())
}

/// Read and check the next section.
pub async fn read_section<R: AsyncRead + Unpin>(r: &mut R) -> Result<Section, StreamError> {
    let tag = r.read_u8().await?;
    let len = r.read_u64().await?;
    let bad = |why: &str| StreamError::BadSection { tag, len, why: why.to_string() };
    if !matches!(tag, CONFIG | RAM | VCPU | DEVICE | END) {
        return Err(StreamError::UnknownSection(tag));
    }
    if len > MAX_SECTION {
        return Err(bad("too large"));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).await?;
    let u32_at = |at: usize| p.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| {
        p.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    };
    match tag {
        CONFIG if len == 12 => Ok(Section::Config { memory: u64_at(0).ok_or_else(|| bad("short"))?, vcpus: u32_at(8).ok_or_else(|| bad("short"))? }),
        RAM => {
            let first_page = u64_at(0).ok_or_else(|| bad("short header"))?;
            let count = u32_at(8).ok_or_else(|| bad("short header"))? as usize;
            if len as usize != 12 + count * PAGE {
                return Err(bad("page count does not match the length"));
            }
            Ok(Section::Ram { first_page, data: p[12..].to_vec() })
        }
        VCPU => {
            let id = u32_at(0).ok_or_else(|| bad("short"))?;
            let state = vcpu_from(&p[4..]).ok_or_else(|| bad("vCPU state of another layout"))?;
            Ok(Section::Vcpu { id, state: Box::new(state) })
        }
        DEVICE if len == 4 => Ok(Section::Device { consumed: u32_at(0).ok_or_else(|| bad("short"))? }),
        END if len == 0 => Ok(Section::End),
        _ => Err(bad("wrong length")),
    }
}

pub async fn write_ack<W: AsyncWrite + Unpin>(w: &mut W, result: Result<(), &str>) -> std::io::Result<()> {
    match result {
        Ok(()) => w.write_u8(0).await?,
        Err(msg) => {
            w.write_u8(1).await?;
            w.write_u32(msg.len() as u32).await?;
            w.write_all(msg.as_bytes()).await?;
        }
    }
    w.flush().await
}

pub async fn read_ack<R: AsyncRead + Unpin>(r: &mut R) -> Result<Result<(), String>, StreamError> {
    match r.read_u8().await? {
        0 => Ok(Ok(())),
        1 => {
            let n = r.read_u32().await?.min(64 << 10) as usize;
            let mut m = vec![0u8; n];
            r.read_exact(&mut m).await?;
            Ok(Err(String::from_utf8_lossy(&m).into_owned()))
        }
        other => Err(StreamError::BadSection { tag: other, len: 0, why: "bad acknowledgement".into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    async fn parse_all(bytes: &[u8]) -> Result<Vec<Section>, StreamError> {
        let mut r = bytes;
        read_header(&mut r).await?;
        let mut out = Vec::new();
        loop {
            let s = read_section(&mut r).await?;
            let end = matches!(s, Section::End);
            out.push(s);
            if end {
                return Ok(out);
            }
        }
    }

    #[test]
    fn a_well_formed_stream_round_trips_and_every_truncation_fails() {
        rt().block_on(async {
            let mut w = Vec::new();
            write_header(&mut w).await.unwrap();
            write_config(&mut w, 64 << 20, 1).await.unwrap();
            write_ram(&mut w, 3, &[7u8; 2 * PAGE]).await.unwrap();
            write_device(&mut w, 42).await.unwrap();
            write_end(&mut w).await.unwrap();
            let s = parse_all(&w).await.unwrap();
            assert!(matches!(s[1], Section::Ram { first_page: 3, ref data } if data.len() == 2 * PAGE));
            assert!(matches!(s[2], Section::Device { consumed: 42 }));
            for cut in [0, 5, 12, 20, w.len() / 2, w.len() - 1] {
                assert!(parse_all(&w[..cut]).await.is_err(), "truncated at {cut}");
            }
            let mut bad = w.clone();
            bad[12] = 9; // the first section's tag
            assert!(matches!(parse_all(&bad).await, Err(StreamError::UnknownSection(9))));
        });
    }

    proptest::proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&VERSION.to_be_bytes());
            v.extend_from_slice(&bytes);
            let _ = rt().block_on(parse_all(&v));
            let _ = rt().block_on(parse_all(&bytes));
        }
    }
}
