//! systemd's readiness protocol (`sd_notify`): when `NOTIFY_SOCKET` is set,
//! the daemon sends `READY=1` once its API answers, `STATUS=...` on lifecycle
//! changes and `STOPPING=1` on shutdown. Test harnesses use the same socket
//! to wait for readiness without polling.

use std::os::unix::net::UnixDatagram;

/// Sends one notification; a no-op without `NOTIFY_SOCKET`. Failures (the
/// listener went away) are logged at debug level, never fatal.
pub fn notify(message: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let bytes = target.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message.as_bytes(), &addr)?;
        } else {
            sock.send_to(message.as_bytes(), &target)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!(error = %e, socket = ?target, "sd_notify failed");
    }
}
