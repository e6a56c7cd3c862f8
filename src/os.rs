//! The few system calls ferrite makes (locking memory, memory and file advice, the page size, direct reads), on
//! the libc crate: the only place with libc calls.

use std::fs::File;
use std::io;
use std::path::Path;

/// The size of a memory page (`sysconf(_SC_PAGESIZE)`); None where the system does not say.
pub fn page_size() -> Option<usize> {
    // SAFETY: sysconf only reads a constant of the system; it takes no pointers.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page).ok().filter(|p| *p > 0)
}

/// Locks `bytes` (e.g. a range of the model's map) in RAM with `mlock`: their pages are read in now and never paged
/// out. Fails where `ulimit -l` is too small or off Linux-like systems.
pub fn lock_memory(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    // SAFETY: mlock only changes how the pages of a valid mapped range are kept; it reads no Rust-visible state
    // (Linux rounds the start down to a page boundary).
    let rc = unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// What a program tells the OS about how it reads a file (`posix_fadvise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileAdvice {
    /// Reads come in no order: read exactly what is asked, nothing ahead (`POSIX_FADV_RANDOM`).
    Random,
    /// The range will not be read again soon: its page cache can go now (`POSIX_FADV_DONTNEED`).
    DontNeed,
}

/// Gives the OS `advice` about `len` bytes of `file` at `offset` (0 and 0: the whole file). A hint: failures are
/// ignored (and it does nothing where the system has no `posix_fadvise`). The expert reader uses it when memory is
/// tight, so reads leave no page cache behind (readahead past a slab, or the slab itself, would push out the pool
/// or the resident weights under a cgroup limit).
pub fn advise_file(file: &File, offset: u64, len: u64, advice: FileAdvice) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    {
        use std::os::fd::AsRawFd;
        let code = match advice {
            FileAdvice::Random => libc::POSIX_FADV_RANDOM,
            FileAdvice::DontNeed => libc::POSIX_FADV_DONTNEED,
        };
        let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len))
        else {
            return;
        };
        // SAFETY: a plain system call on an open descriptor; it changes only how the kernel caches the file.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, code) };
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    {
        let _ = (file, offset, len, advice);
    }
}

/// Asks for the whole pages inside `ptr..ptr + len` (a buffer about to be filled) to be backed by transparent huge
/// pages (`madvise(MADV_HUGEPAGE)`): a fault per 2 MiB instead of per 4 KiB while it fills, fewer TLB misses when it
/// is read. A hint: a no-op off Linux, and errors are ignored.
pub fn advise_huge_pages(ptr: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    advise_memory(ptr, len, libc::MADV_HUGEPAGE, PageSpan::Inside);
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len);
}

/// Maps the pages around `bytes` (e.g. a slice of a file map about to be read) in one call
/// (`madvise(MADV_POPULATE_READ)`), where a file map would otherwise take a fault per page. A hint: a no-op off
/// Linux, and errors are ignored (kernels before 5.14 refuse the advice).
pub fn populate_read(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    advise_memory(
        bytes.as_ptr(),
        bytes.len(),
        libc::MADV_POPULATE_READ,
        PageSpan::Around,
    );
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// Which whole pages a byte range advises.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageSpan {
    /// The pages that lie wholly inside the range (none of a neighbour's bytes are touched).
    Inside,
    /// The pages the range touches.
    Around,
}

/// `madvise(advice)` over the whole pages `span` of `ptr..ptr + len`.
#[cfg(target_os = "linux")]
fn advise_memory(ptr: *const u8, len: usize, advice: libc::c_int, span: PageSpan) {
    let Some(page) = page_size() else {
        return;
    };
    if len == 0 || !page.is_power_of_two() {
        return;
    }
    let (start, end) = (ptr as usize, ptr as usize + len);
    let (start, end) = match span {
        PageSpan::Inside => ((start + page - 1) & !(page - 1), end & !(page - 1)),
        PageSpan::Around => (start & !(page - 1), (end + page - 1) & !(page - 1)),
    };
    if end > start {
        // SAFETY: both advices used here only change how pages are backed or mapped (huge pages, page-table
        // entries for a read), never their contents; ranges outside a mapping fail with an error that is ignored.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
    }
}

/// Opens `path` for reading with `O_DIRECT` (reads bypass the page cache); None where the system or the file system
/// does not allow it.
pub fn open_direct(path: &Path) -> Option<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Whether `e` is `EINVAL`: what a file system that opens files with `O_DIRECT` but cannot read them so answers.
pub fn is_invalid_argument(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_size_is_a_power_of_two() {
        let page = page_size().unwrap();
        assert!(page >= 4096 && page.is_power_of_two(), "{page}");
    }

    #[test]
    fn locking_nothing_succeeds() {
        assert!(lock_memory(&[]).is_ok());
    }

    #[test]
    fn hints_on_a_buffer_and_a_file_leave_them_unchanged() {
        let mut buf = vec![7u8; 3 * 4096 + 5];
        advise_huge_pages(buf.as_mut_ptr(), buf.len());
        populate_read(&buf);
        assert!(buf.iter().all(|&b| b == 7));
        let file = tempfile::tempfile().unwrap();
        advise_file(&file, 0, 0, FileAdvice::Random);
        advise_file(&file, 0, 4096, FileAdvice::DontNeed);
    }

    #[test]
    fn einval_is_an_invalid_argument() {
        assert!(is_invalid_argument(&io::Error::from_raw_os_error(
            libc::EINVAL
        )));
        assert!(!is_invalid_argument(&io::Error::from(
            io::ErrorKind::UnexpectedEof
        )));
    }
}
