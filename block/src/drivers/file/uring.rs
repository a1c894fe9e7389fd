// TEMPORARY STUB, replaced by the real module.
use std::os::fd::OwnedFd;
use std::sync::Arc;
use crate::buf::IoBuf;
#[derive(Debug)]
pub struct Uring;
impl Uring {
    pub fn new(_e: u32) -> std::io::Result<Arc<Self>> { Err(std::io::Error::other("stub")) }
    pub async fn read_at(&self, _fd: &Arc<OwnedFd>, _o: u64, b: IoBuf, _bo: usize) -> (IoBuf, std::io::Result<usize>) { (b, Err(std::io::Error::other("stub"))) }
    pub async fn write_at(&self, _fd: &Arc<OwnedFd>, _o: u64, b: IoBuf, _bo: usize, _d: bool) -> (IoBuf, std::io::Result<usize>) { (b, Err(std::io::Error::other("stub"))) }
    pub async fn fsync(&self, _fd: &Arc<OwnedFd>, _d: bool) -> std::io::Result<()> { Ok(()) }
    pub async fn fallocate(&self, _fd: &Arc<OwnedFd>, _o: u64, _l: u64, _m: i32) -> std::io::Result<()> { Ok(()) }
}
