//! `O_DIRECT` reads: alignment, the room a slot needs for them, and the reads themselves (files are opened by
//! [`crate::os::open_direct`]).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Alignment of direct reads: file offset, length and memory address (the page size; covers devices with 512-byte
/// and 4096-byte logical blocks).
pub const DIRECT_ALIGN: usize = 4096;

/// Room for one part in a slot that takes direct reads of slabs of up to `max_slab` bytes at any offset within a
/// page: the slab rounded up to pages, plus one page for the bytes before it in its first page and after it in its
/// last.
pub fn direct_room(max_slab: u64) -> u64 {
    max_slab.next_multiple_of(DIRECT_ALIGN as u64) + DIRECT_ALIGN as u64
}

/// The pages of a buffer (at address `addr`, `len` bytes) that a direct read of the `need` bytes at file `offset`
/// into the buffer from `at` covers, and the slab's offset in its first page; None unless the slab sits at the
/// same offset within a page in memory as in the file and the pages lie within the buffer.
pub(super) fn direct_span(
    addr: usize,
    len: usize,
    at: usize,
    need: usize,
    offset: u64,
) -> Option<(std::ops::Range<usize>, usize)> {
    let lead = (offset % DIRECT_ALIGN as u64) as usize;
    if addr.checked_add(at)? % DIRECT_ALIGN != lead {
        return None;
    }
    let start = at.checked_sub(lead)?;
    let end = at.checked_add(need)?.next_multiple_of(DIRECT_ALIGN);
    (end <= len).then_some((start..end, lead))
}

/// Fills `buf` (aligned, whole pages) from `offset` of a file opened with `O_DIRECT`; the read may stop at the end
/// of the file after the first `must` bytes.
pub(super) fn read_direct(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    must: usize,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // Past a short read the offsets are no longer aligned: only the end of the file stops one.
        if done % DIRECT_ALIGN != 0 {
            break;
        }
    }
    if done < must {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}
