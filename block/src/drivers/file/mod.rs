//! `file`: a raw image in a regular file or a block device.
//!
//! Two I/O engines, as QEMU's `aio=`: `threads` runs pread/pwrite on tokio's
//! blocking pool, `io_uring` submits to a shared ring whose completions wake
//! tokio through an eventfd. `io_uring` falls back to `threads` when the
//! kernel refuses a ring. Block status uses SEEK_DATA/SEEK_HOLE; zeroes and
//! discards use fallocate.

#[allow(unsafe_code)] // submission entries and the eventfd registration
pub mod uring;

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use nix::unistd::Whence;

use crate::buf::IoBuf;
use crate::driver::*;
use crate::error::{BlockError, Op, Result};
use crate::lock::ImageLock;
use crate::perm::Perm;
use crate::sync;
use uring::Uring;

crate::qapi_enum! {
    /// QEMU's `BlockdevAioOptions` (`native` is served by the thread pool).
    pub enum BlockdevAioOptions { "threads" Threads, "native" Native, "io_uring" IoUring }
}

crate::qapi_enum! {
    /// QEMU's `OnOffAuto`, for `locking`.
    pub enum OnOffAuto { "auto" Auto, "on" On, "off" Off }
}

crate::qapi_struct! {
    /// QEMU's `BlockdevOptionsFile`, the members baton implements.
    pub struct BlockdevOptionsFile {
        "filename" filename: String,
        "aio" aio: Option<BlockdevAioOptions>,
        "locking" locking: Option<OnOffAuto>,
        /// Accepted; the ring batches what it is given.
        "aio-max-batch" aio_max_batch: Option<u64>,
    }
}

/// The `file` driver (also `host_device`: a block device is a file here).
#[derive(Debug)]
pub struct FileBdrv;

impl Driver for FileBdrv {
    const NAME: &'static str = "file";
    const ALIASES: &'static [&'static str] = &["host_device"];
    type Options = BlockdevOptionsFile;
    async fn open<'a>(&'a self, ctx: OpenCtx<'a>, o: BlockdevOptionsFile) -> Result<Opened> {
        let opts = FileOptions {
            filename: o.filename,
            aio: match o.aio {
                Some(BlockdevAioOptions::IoUring) => AioMode::IoUring,
                Some(BlockdevAioOptions::Threads | BlockdevAioOptions::Native) | None => AioMode::Threads,
            },
            direct: ctx.direct,
            discard_unmap: ctx.discard_unmap,
            locking: match o.locking {
                Some(OnOffAuto::On) => Locking::On,
                Some(OnOffAuto::Off) => Locking::Off,
                Some(OnOffAuto::Auto) | None => Locking::Auto,
            },
            read_only: ctx.read_only,
        };
        Ok(Opened::Leaf(super::Leaf::File(FileDriver::open(opts)?)))
    }
}

/// QEMU's `aio` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioMode {
    Threads,
    IoUring,
}

/// QEMU's `locking` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    Auto,
    On,
    Off,
}

/// Options of a `file` node, with QEMU's names.
#[derive(Debug, Clone)]
pub struct FileOptions {
    pub filename: String,
    pub aio: AioMode,
    /// `cache.direct`: open with O_DIRECT.
    pub direct: bool,
    /// `discard=unmap`: discards and may-unmap zeroes punch holes.
    pub discard_unmap: bool,
    pub locking: Locking,
    pub read_only: bool,
}

enum Engine {
    Threads,
    Uring(Arc<Uring>),
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Threads => "threads",
            Engine::Uring(_) => "io_uring",
        })
    }
}

/// The process-wide ring, created on first use inside a tokio runtime.
/// `None` when the kernel refused io_uring; every file node then uses threads.
fn shared_ring() -> Option<Arc<Uring>> {
    static RING: OnceLock<Option<Arc<Uring>>> = OnceLock::new();
    RING.get_or_init(|| match Uring::new(256) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "io_uring unavailable, file nodes use the thread pool");
            None
        }
    })
    .clone()
}

#[derive(Debug)]
pub struct FileDriver {
    opts: FileOptions,
    fd: Arc<OwnedFd>,
    engine: Engine,
    length: AtomicU64,
    align: u32,
    /// The image lock, `None` with `locking=off`.
    lock: Option<Mutex<ImageLock>>,
}

fn io_err(node: &str, op: Op, e: impl Into<std::io::Error>) -> BlockError {
    BlockError::Io { node: node.to_string(), op, source: e.into() }
}

impl FileDriver {
    /// Open the file. The caller (the graph) passes the node name for errors.
    pub fn open(opts: FileOptions) -> Result<Self> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(nix::libc::O_DIRECT);
        }
        let file =
            oo.open(&opts.filename).map_err(|source| BlockError::Open { path: opts.filename.clone(), source })?;
        let fd: Arc<OwnedFd> = Arc::new(file.into());
        let len = nix::unistd::lseek(fd.as_fd(), 0, Whence::SeekEnd)
            .map_err(|e| BlockError::Open { path: opts.filename.clone(), source: e.into() })?;
        let engine = match opts.aio {
            AioMode::Threads => Engine::Threads,
            AioMode::IoUring => match shared_ring() {
                Some(r) => Engine::Uring(r),
                None => Engine::Threads,
            },
        };
        let align = if opts.direct { probe_direct_alignment(&fd) } else { 1 };
        let lock = match opts.locking {
            Locking::Off => None,
            Locking::On | Locking::Auto => Some(Mutex::new(ImageLock::new(fd.clone(), opts.filename.clone()))),
        };
        Ok(Self { opts, fd, engine, length: AtomicU64::new(len as u64), align, lock })
    }

    pub fn filename(&self) -> &str {
        &self.opts.filename
    }

    pub fn options(&self) -> &FileOptions {
        &self.opts
    }

    /// The engine actually in use ("threads" or "io_uring").
    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Threads => "threads",
            Engine::Uring(_) => "io_uring",
        }
    }

    /// Hold lock bytes for `perm` taken and `shared` shared (no-op with locking=off).
    pub fn set_lock(&self, perm: Perm, shared: Perm) -> Result<()> {
        match &self.lock {
            Some(l) => sync::lock(l).apply(perm, shared),
            None => Ok(()),
        }
    }

    /// Drop every lock byte.
    pub fn release_lock(&self) {
        if let Some(l) = &self.lock {
            sync::lock(l).release();
        }
    }

    /// Bytes held, as (perm, unshared); for tests and query commands.
    pub fn held_lock(&self) -> Option<(Perm, Perm)> {
        self.lock.as_ref().map(|l| sync::lock(l).held())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        f: impl FnOnce(Arc<OwnedFd>) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let fd = self.fd.clone();
        match tokio::task::spawn_blocking(move || f(fd)).await {
            Ok(r) => r.map_err(|e| io_err(&self.opts.filename, op, e)),
            Err(e) => Err(io_err(&self.opts.filename, op, std::io::Error::other(e.to_string()))),
        }
    }

    async fn fallocate(&self, op: Op, mode: FallocateFlags, offset: u64, len: u64) -> Result<()> {
        match &self.engine {
            Engine::Uring(r) => {
                r.fallocate(&self.fd, offset, len, mode.bits()).await.map_err(|e| io_err(&self.opts.filename, op, e))
            }
            Engine::Threads => {
                self.blocking(op, move |fd| {
                    nix::fcntl::fallocate(fd.as_fd(), mode, offset as i64, len as i64).map_err(std::io::Error::from)
                })
                .await
            }
        }
    }

    async fn datasync(&self) -> Result<()> {
        match &self.engine {
            Engine::Uring(r) => r.fsync(&self.fd, true).await.map_err(|e| io_err(&self.opts.filename, Op::Flush, e)),
            Engine::Threads => {
                self.blocking(Op::Flush, |fd| nix::unistd::fdatasync(fd.as_fd()).map_err(std::io::Error::from)).await
            }
        }
    }

    /// Write zero buffers over the range (the fallback when fallocate cannot).
    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut buf = IoBuf::zeroed(CHUNK.min(len) as usize);
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            buf.set_len(n).map_err(|_| io_err(&self.opts.filename, Op::WriteZeroes, Errno::EINVAL))?;
            buf = BlockWrite::write(self, offset + done, buf, WriteFlags::default()).await?;
            done += n as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &BlockError) -> bool {
    matches!(e, BlockError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(c) if c == Errno::EOPNOTSUPP as i32 || c == Errno::ENOSYS as i32 || c == Errno::EINVAL as i32))
}

/// The smallest O_DIRECT read size the file accepts (512 or 4096).
fn probe_direct_alignment(fd: &OwnedFd) -> u32 {
    let mut buf = IoBuf::zeroed(4096);
    for align in [512u32, 4096] {
        if nix::sys::uio::pread(fd.as_fd(), &mut buf[..align as usize], 0).is_ok() {
            return align;
        }
    }
    4096
}

fn pread_full(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match nix::sys::uio::pread(fd.as_fd(), &mut buf[done..], (offset + done as u64) as i64) {
            Ok(0) => {
                // Past the end of the file (it shrank, or a block device): zeroes.
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn pwrite_full(fd: &OwnedFd, buf: &[u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match nix::sys::uio::pwrite(fd.as_fd(), &buf[done..], (offset + done as u64) as i64) {
            Ok(0) => return Err(Errno::ENOSPC.into()),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl LeafInfo for FileDriver {
    fn driver_name(&self) -> &'static str {
        "file"
    }
    fn length(&self) -> u64 {
        self.length.load(Ordering::Acquire)
    }
    fn alignment(&self) -> u32 {
        self.align
    }
    fn caps(&self) -> Caps {
        Caps {
            native_zeroes: true,
            discard: self.opts.discard_unmap,
            fast_zero: true,
            fua: true,
            block_status: true,
            parallel: true,
        }
    }
    fn refresh(&self) -> Result<()> {
        let len = nix::unistd::lseek(self.fd.as_fd(), 0, Whence::SeekEnd)
            .map_err(|e| io_err(&self.opts.filename, Op::Read, e))?;
        self.length.store(len as u64, Ordering::Release);
        Ok(())
    }
}

impl BlockRead for FileDriver {
    async fn read(&self, offset: u64, buf: IoBuf) -> Result<IoBuf> {
        match &self.engine {
            Engine::Uring(r) => {
                let mut buf = buf;
                let mut done = 0usize;
                while done < buf.len() {
                    let (b, res) = r.read_at(&self.fd, offset + done as u64, buf, done).await;
                    buf = b;
                    match res {
                        Ok(0) => {
                            buf[done..].fill(0);
                            break;
                        }
                        Ok(n) => done += n,
                        Err(e)
                            if e.raw_os_error() == Some(Errno::EINTR as i32)
                                || e.raw_os_error() == Some(Errno::EAGAIN as i32) => {}
                        Err(e) => return Err(io_err(&self.opts.filename, Op::Read, e)),
                    }
                }
                Ok(buf)
            }
            Engine::Threads => {
                let mut buf = buf;
                self.blocking(Op::Read, move |fd| pread_full(&fd, &mut buf, offset).map(|()| buf)).await
            }
        }
    }
}

impl BlockWrite for FileDriver {
    async fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> Result<IoBuf> {
        match &self.engine {
            Engine::Uring(r) => {
                let mut buf = buf;
                let mut done = 0usize;
                while done < buf.len() {
                    let (b, res) = r.write_at(&self.fd, offset + done as u64, buf, done, flags.fua).await;
                    buf = b;
                    match res {
                        Ok(0) => return Err(io_err(&self.opts.filename, Op::Write, Errno::ENOSPC)),
                        Ok(n) => done += n,
                        Err(e)
                            if e.raw_os_error() == Some(Errno::EINTR as i32)
                                || e.raw_os_error() == Some(Errno::EAGAIN as i32) => {}
                        Err(e) => return Err(io_err(&self.opts.filename, Op::Write, e)),
                    }
                }
                Ok(buf)
            }
            Engine::Threads => {
                let fua = flags.fua;
                self.blocking(Op::Write, move |fd| {
                    pwrite_full(&fd, &buf, offset)?;
                    if fua {
                        nix::unistd::fdatasync(fd.as_fd())?;
                    }
                    Ok(buf)
                })
                .await
            }
        }
    }
}

impl Flush for FileDriver {
    async fn flush(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.datasync().await
    }
}

impl WriteZeroes for FileDriver {
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.may_unmap && self.opts.discard_unmap {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(Op::WriteZeroes, punch, offset, len).await {
                Ok(()) => return self.fua_sync(flags.fua).await,
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match self
            .fallocate(
                Op::WriteZeroes,
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .await
        {
            Ok(()) => return self.fua_sync(flags.fua).await,
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
        if flags.fast {
            return Err(BlockError::Unsupported { node: self.opts.filename.clone(), what: "fast write-zeroes" });
        }
        self.write_zero_buffers(offset, len).await?;
        self.fua_sync(flags.fua).await
    }
}

impl FileDriver {
    async fn fua_sync(&self, fua: bool) -> Result<()> {
        if fua {
            self.datasync().await
        } else {
            Ok(())
        }
    }
}

impl Discard for FileDriver {
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.opts.discard_unmap {
            // discard=ignore: QEMU's default; the request succeeds and does nothing.
            return Ok(());
        }
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(Op::Discard, punch, offset, len).await {
            Err(e) if is_unsupported(&e) => Ok(()),
            r => r,
        }
    }
}

impl BlockStatus for FileDriver {
    async fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let fd = self.fd.as_fd();
        let eof = LeafInfo::length(self);
        let len = len.min(eof.saturating_sub(offset));
        let data = |l| Extent { len: l, data: true, zero: false };
        let hole = |l| Extent { len: l, data: false, zero: true };
        if len == 0 {
            return Ok(data(0));
        }
        match nix::unistd::lseek(fd, offset as i64, Whence::SeekData) {
            // No data at or after offset: the rest is a hole.
            Err(Errno::ENXIO) => Ok(hole(len)),
            Err(_) => Ok(data(len)), // SEEK_DATA unsupported: report data, as QEMU does.
            Ok(d) if (d as u64) > offset => Ok(hole(((d as u64) - offset).min(len))),
            Ok(_) => match nix::unistd::lseek(fd, offset as i64, Whence::SeekHole) {
                Ok(h) if (h as u64) > offset => Ok(data(((h as u64) - offset).min(len))),
                _ => Ok(data(len)),
            },
        }
    }
}

impl Resize for FileDriver {
    async fn truncate(&self, len: u64) -> Result<()> {
        self.blocking(Op::Truncate, move |fd| {
            nix::unistd::ftruncate(fd.as_fd(), len as i64).map_err(std::io::Error::from)
        })
        .await?;
        self.length.store(len, Ordering::Release);
        Ok(())
    }
}
