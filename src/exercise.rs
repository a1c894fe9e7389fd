//! `baton exercise`: the block layer end to end on one image file.
//!
//! Opens `raw` over `file` (as libvirt stacks them), attaches a guest-style
//! exclusive writer (so QEMU's tools see the image as in use), adds a dirty
//! bitmap, runs random verified writes, then shows the handover primitive:
//! every node inactivated at once, writes refused with EPERM and the file
//! unchanged, and everything reactivated with the data intact.

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{BlockError, Graph, IoBuf, PermSet, WriteFlags};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The raw image to use. It must exist unless --create is given.
    image: std::path::PathBuf,
    /// Create the image with this size (e.g. 64M, 1G); refuses to overwrite an existing file.
    #[arg(long, value_name = "SIZE")]
    create: Option<String>,
    /// I/O engine: threads or io_uring (QEMU's aio=).
    #[arg(long, default_value = "io_uring", value_parser = ["threads", "io_uring"])]
    aio: String,
    /// Open with O_DIRECT (QEMU's cache.direct=on).
    #[arg(long)]
    direct: bool,
    /// How long to run the write workload.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    queue_depth: usize,
    /// Block size of the workload in bytes.
    #[arg(long, default_value_t = 4096)]
    block_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ExerciseError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("cannot create {path}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("verification failed: {0}")]
    Verify(String),
}

fn pattern_byte(block: u64, generation: u64) -> u8 {
    ((block.wrapping_mul(31) ^ generation.wrapping_mul(131)) % 255) as u8 + 1
}

pub async fn run(a: Args) -> Result<(), ExerciseError> {
    let path = a.image.display().to_string();
    if let Some(size) = &a.create {
        let size = block::schema::parse_size(size)
            .ok_or_else(|| ExerciseError::Usage(format!("--create: '{size}' is not a size")))?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&a.image)
            .map_err(|source| ExerciseError::Create { path: path.clone(), source })?;
        f.set_len(size).map_err(|source| ExerciseError::Create { path: path.clone(), source })?;
        println!("created {path} ({size} bytes, sparse)");
    }
    if a.block_size == 0 || a.block_size % 512 != 0 {
        return Err(ExerciseError::Usage("--block-size must be a non-zero multiple of 512".into()));
    }
    if a.queue_depth == 0 {
        return Err(ExerciseError::Usage("--queue-depth must be at least 1".into()));
    }

    let graph = Arc::new(Graph::new());
    graph
        .blockdev_add(&json!({"driver": "file", "node-name": "file0", "filename": path, "aio": a.aio, "cache": {"direct": a.direct}}))
        .await?;
    let top = graph.blockdev_add(&json!({"driver": "raw", "node-name": "disk0", "file": "file0"})).await?;
    let blocks = top.length() / a.block_size as u64;
    if blocks == 0 {
        return Err(ExerciseError::Usage(format!("{path} is smaller than one {}-byte block", a.block_size)));
    }
    let engine = graph.find("file0")?.file().map(|f| f.engine_name()).unwrap_or("?");
    println!("opened {path}: {} bytes, engine {engine}, nodes disk0 (raw) -> file0 (file)", top.length());

    let disk = Arc::new(graph.attach("disk0", "guest disk", PermSet::GUEST_WRITER, true)?);
    let bitmap = graph.bitmap_add("disk0", "bitmap0", None, false)?;
    println!("holding the image as an exclusive writer (QEMU's tools now refuse to write it); bitmap0 added");

    // The workload: each task owns the blocks congruent to its index, so
    // generations per block are known without coordination.
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds.max(0.0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..a.queue_depth as u64 {
        let disk = disk.clone();
        let (bs, qd) = (a.block_size, a.queue_depth as u64);
        tasks.push(tokio::spawn(async move {
            let mut gens: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
            let mut buf = IoBuf::zeroed(bs);
            let mut ops = 0u64;
            while Instant::now() < deadline {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let slots = (blocks - t).div_ceil(qd);
                let block = t + (rng % slots.max(1)) * qd;
                if block >= blocks {
                    continue;
                }
                let g = gens.get(&block).copied().unwrap_or(0) + 1;
                buf.fill(pattern_byte(block, g));
                buf = disk.write(block * bs as u64, buf, WriteFlags::default()).await?;
                gens.insert(block, g);
                ops += 1;
            }
            Ok::<_, BlockError>((gens, ops))
        }));
    }
    let mut written = Vec::new();
    let mut ops = 0;
    for t in tasks {
        let (gens, n) = t.await.map_err(|e| ExerciseError::Verify(e.to_string()))??;
        ops += n;
        written.extend(gens);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {ops} blocks of {} bytes at queue depth {} in {secs:.2}s: {:.0} IOPS, {:.1} MiB/s",
        a.block_size,
        a.queue_depth,
        ops as f64 / secs,
        ops as f64 * a.block_size as f64 / secs / (1 << 20) as f64
    );

    verify(&disk, &written, a.block_size).await?;
    println!("verified {} distinct blocks, every one holds its latest generation", written.len());
    println!("bitmap0: {} bytes dirty", bitmap.count_bytes());

    graph.inactivate_all().await?;
    let states: Vec<String> = graph
        .nodes()
        .iter()
        .map(|n| format!("{}={}", n.name(), if n.is_active() { "active" } else { "inactive" }))
        .collect();
    println!("inactivate_all: quiesced, flushed, flipped: {}", states.join(" "));
    let before = std::fs::read(&a.image).ok();
    match disk.write(0, IoBuf::zeroed(a.block_size), WriteFlags::default()).await {
        Err(e) if e.errno() == 1 => println!("write while inactive: refused with EPERM ({e})"),
        Err(e) => return Err(ExerciseError::Verify(format!("write while inactive failed with the wrong error: {e}"))),
        Ok(_) => return Err(ExerciseError::Verify("write while inactive succeeded".into())),
    }
    if before.is_some() && std::fs::read(&a.image).ok() != before {
        return Err(ExerciseError::Verify("the file changed while inactive".into()));
    }
    graph.activate_all().await?;
    verify(&disk, &written, a.block_size).await?;
    println!("activate_all: every node active, image lock re-taken, data verified again");
    Ok(())
}

async fn verify(disk: &block::BlockBackend, written: &[(u64, u64)], bs: usize) -> Result<(), ExerciseError> {
    let mut buf = IoBuf::zeroed(bs);
    for &(block, g) in written {
        buf = disk.read(block * bs as u64, buf).await?;
        let want = pattern_byte(block, g);
        if let Some(pos) = buf.iter().position(|&b| b != want) {
            return Err(ExerciseError::Verify(format!(
                "block {block} byte {pos}: want {want:#x} (generation {g}), found {:#x}",
                buf[pos]
            )));
        }
    }
    Ok(())
}
