//! Private-key files on disk: written to a temporary file in the same
//! directory and then published by rename (replacing) or hard link (only if
//! absent), so a reader never sees half a key, a symlink at the path is
//! replaced rather than written through, and two processes creating the same
//! key file never overwrite each other's key.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use tracing::warn;

/// Reads a private-key file, warning if users other than its owner may read
/// or write it.
pub(crate) fn read_private(path: &Path) -> io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    warn_if_exposed(path, &file.metadata()?);
    let mut contents = Vec::new();
    file.read_to_end(&mut contents)?;
    Ok(contents)
}

/// Whether the mode lets group or others at the file (Unix; never elsewhere).
pub(crate) fn is_exposed(metadata: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        metadata.permissions().mode() & 0o077 != 0
    }
    #[cfg(not(unix))]
    {
        let _ = metadata;
        false
    }
}

fn warn_if_exposed(path: &Path, metadata: &std::fs::Metadata) {
    if is_exposed(metadata) {
        #[cfg(unix)]
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            format!("{:o}", metadata.permissions().mode() & 0o777)
        };
        #[cfg(not(unix))]
        let mode = String::new();
        warn!(
            key_file = %path.display(),
            mode,
            "key file is accessible to group or others; chmod 600 it"
        );
    }
}

/// Writes `contents` to `path` (mode 0600), replacing what is there; a
/// symlink at `path` is replaced, its target left alone.
pub(crate) fn write_replacing(path: &Path, contents: &[u8]) -> io::Result<()> {
    let temp = TempFile::write(path, contents)?;
    std::fs::rename(&temp.path, path)?;
    temp.published();
    sync_dir(path);
    Ok(())
}

/// Writes `contents` to `path` (mode 0600) only if nothing is there yet;
/// `Ok(false)` when something already was (another process won the race).
pub(crate) fn write_new(path: &Path, contents: &[u8]) -> io::Result<bool> {
    let temp = TempFile::write(path, contents)?;
    // link(2) fails if the path exists, symlinks included: create-new
    // semantics with the content complete before the name appears.
    let linked = match std::fs::hard_link(&temp.path, path) {
        Ok(()) => true,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => false,
        Err(err) => return Err(err),
    };
    drop(temp);
    if linked {
        sync_dir(path);
    }
    Ok(linked)
}

/// A temporary file beside the target, removed unless published.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn write(target: &Path, contents: &[u8]) -> io::Result<Self> {
        let dir = match target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
        let path = dir.join(format!(
            ".{}.{}.{:016x}.tmp",
            name.to_string_lossy(),
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut options = OpenOptions::new();
        // create_new (O_CREAT | O_EXCL) never follows a symlink.
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&path)?;
        let temp = Self { path, keep: false };
        file.write_all(contents)?;
        file.sync_all()?;
        Ok(temp)
    }

    /// The file was renamed into place: nothing to remove.
    fn published(mut self) {
        self.keep = true;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes a rename or link durable (best effort: not every platform can).
fn sync_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}
