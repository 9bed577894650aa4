//! The few filesystem calls std and nix do not wrap: extended attributes and a whiteout mknod.
//! Each is one small safe function returning `io::Result`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Turns a libc return code (0 or -1 with errno) into a result.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

/// `lsetxattr(2)`: sets an extended attribute on `path` without following a final symlink.
pub fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let path = cstring(path.as_os_str().as_bytes())?;
    let name = cstring(name)?;
    // SAFETY: `path` and `name` are NUL-terminated strings that outlive the call; `value` is a
    // valid buffer of `value.len()` bytes that the kernel only reads.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc)
}

/// `fsetxattr(2)`: sets an extended attribute on an open file.
pub fn fsetxattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: `fd` is a valid open descriptor for the duration of the borrow; `name` is
    // NUL-terminated and `value` is a valid buffer the kernel only reads.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc)
}

/// `syncfs(2)`: flushes the filesystem that `file` is on.
pub fn syncfs(file: &std::fs::File) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the duration of the borrow; syncfs only reads it.
    let rc = unsafe { libc::syncfs(file.as_raw_fd()) };
    check(rc)
}
