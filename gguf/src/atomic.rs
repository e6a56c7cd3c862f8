//! Replacing a file atomically: the new contents go to a temporary file in the same folder, which is flushed, synced
//! and renamed over the target, then the folder is synced. A reader (or a crash) sees the old file or the whole new
//! one, never a part; on any error the temporary file is removed and the target is left as it was. The GGUF writer,
//! ferrite's session files, chat transcripts and `.npy` outputs all write through here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// `.NAME.tmp-PID-N` next to `path`: unique per process and call, so concurrent writers never share one.
pub fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Syncs the folder holding `path`, so a rename into it is durable (best effort: not every platform can sync a
/// folder).
pub fn sync_parent(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `path` through a new temporary file beside it (see [`temp_path`]): `fill(tmp, out)` writes the contents
/// into `out` (buffered, `capacity` bytes); then the data is flushed and synced, the file renamed over `path` and the
/// folder synced. `io_err(file, e)` turns an I/O error on `file` into the caller's error. On any error the temporary
/// file is removed and `path` is untouched.
pub fn write_atomically<T, E>(
    path: &Path,
    capacity: usize,
    fill: impl FnOnce(&Path, &mut BufWriter<File>) -> Result<T, E>,
    io_err: impl Fn(&Path, io::Error) -> E,
) -> Result<T, E> {
    write_file_atomically(
        path,
        |tmp, file| {
            let mut out = BufWriter::with_capacity(capacity, file);
            let value = fill(tmp, &mut out)?;
            let file = out.into_inner().map_err(|e| io_err(tmp, e.into_error()))?;
            Ok((value, file))
        },
        &io_err,
    )
}

/// [`write_atomically`] for a caller that writes the temporary file its own way: `fill(tmp, file)` gets the new
/// file and gives it back, written, for the sync and the rename.
pub fn write_file_atomically<T, E>(
    path: &Path,
    fill: impl FnOnce(&Path, File) -> Result<(T, File), E>,
    io_err: impl Fn(&Path, io::Error) -> E,
) -> Result<T, E> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        let (value, file) = fill(&tmp, file)?;
        file.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        Ok(value)
    })();
    match result {
        Ok(value) => {
            sync_parent(path);
            Ok(value)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        fs::write(&path, b"old").unwrap();
        // A failing fill leaves the old file and no temporary file.
        let err = write_atomically(
            &path,
            64,
            |_, out| {
                out.write_all(b"partial")?;
                Err::<(), _>(io::Error::other("boom"))
            },
            |_, e| e,
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // A complete one replaces it.
        let n = write_atomically(
            &path,
            64,
            |_, out| out.write_all(b"new").map(|()| 3),
            |_, e| e,
        )
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Into a missing folder: an error naming the temporary file's problem, nothing created.
        let missing = dir.path().join("no/such/file");
        assert!(write_atomically(&missing, 64, |_, _| Ok(()), |_, e| e).is_err());
    }
}
