//! Pseudo-terminal pairs standing in for serial devices: the daemon opens
//! the slave side like a USB UART, the test plays the device on the master.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One pty pair; dropping it closes both ends, which the reader on the
/// slave sees as the device going away (an unplug).
pub struct Pty {
    master: File,
    /// Held so the pair stays usable before the daemon opens the slave.
    _slave: File,
    pub path: PathBuf,
}

impl Pty {
    /// A pair in raw mode (no echo, no line editing), as a UART is.
    pub fn open() -> Pty {
        let mut master = 0;
        let mut slave = 0;
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the out-pointers are valid, the name buffer is larger
        // than any pts path, and null termios/winsize mean defaults.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                name.as_mut_ptr(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // openpty's descriptors are inheritable: a daemon spawned later
        // would hold the master open and never see the unplug.
        for fd in [master, slave] {
            // SAFETY: fcntl on descriptors we own.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
        // SAFETY: openpty returned two fresh descriptors that we now own.
        let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
        // SAFETY: termios is plain data; tcgetattr fills it from a valid fd.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
        }
        // SAFETY: openpty wrote a NUL-terminated path into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Pty {
            master,
            _slave: slave,
            path: PathBuf::from(path),
        }
    }

    /// A second handle on the master side, for a device thread.
    pub fn master(&self) -> File {
        self.master.try_clone().expect("clone the pty master")
    }

    /// Points the symlink `link` at this pty's slave, atomically (as udev
    /// does for `/dev/serial/by-id/...` on replug).
    pub fn link_at(&self, link: &Path) {
        let tmp = link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&self.path, &tmp).expect("create the device symlink");
        std::fs::rename(&tmp, link).expect("re-point the device symlink");
    }
}

/// Writes `bytes` to the master in one go.
pub fn send(master: &mut File, bytes: &[u8]) {
    master.write_all(bytes).expect("write to the pty master");
}

/// Reads what is available on the master within `wait` (empty if none).
pub fn receive(master: &mut File, wait: Duration) -> Vec<u8> {
    let mut fds = libc::pollfd {
        fd: master.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut fds, 1, ms) };
    if ready <= 0 || fds.revents & libc::POLLIN == 0 {
        return Vec::new();
    }
    let mut buf = [0u8; 512];
    match master.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(_) => Vec::new(),
    }
}
