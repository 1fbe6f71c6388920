//! CRIU's RPC protocol (`criu swrk <fd>`, messages of `images/rpc.proto`):
//! the few fields a restore uses, and the conversation on the socket.
//!
//! Why RPC for restores: with `notify_scripts`, CRIU tells its caller each
//! stage on the socket and waits for the answer, where an action script is
//! a fork and exec of a shell at every stage (seven or so, about 1.3 ms
//! each here, most of them while the restore's tasks wait), and the stages
//! the daemon acts on (`pre-restore`, `pre-resume`) exec'd this binary too.
//! The messages are proto2: unknown fields in CRIU's answers are skipped.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{MsgFlags, recv, send};
use prost::Message as _;

use super::proto::{NOTIFY, RESTORE, Request, Response};

/// How a conversation ended.
#[derive(Debug, PartialEq)]
pub(super) enum Outcome {
    /// CRIU restored the tree: its root's pid.
    Restored(i32),
    /// CRIU said it failed (its message, if any).
    Failed(Option<String>),
    /// The socket closed, or CRIU said something unreadable or unexpected.
    Gone(String),
}

/// The largest message read (CRIU's are a few hundred bytes).
const MAX_MESSAGE: usize = 64 << 10;

/// Sends `req` on `sock` (a `SOCK_SEQPACKET` to `criu swrk`), then answers
/// every notification with `stage(name)` until the final answer. Blocking.
pub(super) fn converse(
    sock: &OwnedFd,
    req: &Request,
    stage: &mut dyn FnMut(&str) -> bool,
) -> Outcome {
    if let Err(e) = send(
        sock.as_raw_fd(),
        &req.encode_to_vec(),
        MsgFlags::MSG_NOSIGNAL,
    ) {
        return Outcome::Gone(format!("cannot send the request: {e}"));
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) => return Outcome::Gone("CRIU closed the socket".into()),
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Outcome::Gone(format!("cannot read CRIU's answer: {e}")),
        };
        let resp = match Response::decode(&buf[..n]) {
            Ok(r) => r,
            Err(e) => return Outcome::Gone(format!("an unreadable answer from CRIU: {e}")),
        };
        match answer(&resp, stage) {
            Step::Reply(go) => {
                let reply = Request {
                    kind: NOTIFY,
                    opts: None,
                    notify_success: Some(go),
                };
                if let Err(e) = send(
                    sock.as_raw_fd(),
                    &reply.encode_to_vec(),
                    MsgFlags::MSG_NOSIGNAL,
                ) {
                    return Outcome::Gone(format!("cannot answer CRIU: {e}"));
                }
            }
            Step::Done(outcome) => return outcome,
        }
    }
}

/// What to do with one of CRIU's answers.
#[derive(Debug, PartialEq)]
enum Step {
    /// A notification: answer it (go on, or fail the stage).
    Reply(bool),
    Done(Outcome),
}

fn answer(resp: &Response, stage: &mut dyn FnMut(&str) -> bool) -> Step {
    match resp.kind {
        NOTIFY => {
            let name = resp
                .notify
                .as_ref()
                .and_then(|n| n.script.as_deref())
                .unwrap_or_default();
            Step::Reply(stage(name))
        }
        RESTORE if resp.success => match &resp.restore {
            Some(r) if r.pid > 0 => Step::Done(Outcome::Restored(r.pid)),
            _ => Step::Done(Outcome::Gone("CRIU restored no pid".into())),
        },
        RESTORE => Step::Done(Outcome::Failed(resp.cr_errmsg.clone())),
        other => Step::Done(Outcome::Gone(format!(
            "CRIU answered a request of type {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{CG_IGNORE, Notify, Opts, RestoreResp};
    use super::*;

    fn notify(script: &str) -> Response {
        Response {
            kind: NOTIFY,
            success: true,
            restore: None,
            notify: Some(Notify {
                script: Some(script.into()),
                pid: Some(7),
            }),
            cr_errno: None,
            cr_errmsg: None,
        }
    }

    #[test]
    fn notifications_are_answered_by_the_stage_and_the_end_is_the_pid_or_the_error() {
        let mut seen = Vec::new();
        let mut stage = |s: &str| {
            seen.push(s.to_owned());
            s != "pre-resume"
        };
        assert_eq!(
            answer(&notify("pre-restore"), &mut stage),
            Step::Reply(true)
        );
        assert_eq!(
            answer(&notify("pre-resume"), &mut stage),
            Step::Reply(false)
        );
        assert_eq!(seen, ["pre-restore", "pre-resume"]);
        let done = |success, pid: Option<i32>, msg: Option<&str>| Response {
            kind: RESTORE,
            success,
            restore: pid.map(|pid| RestoreResp { pid }),
            notify: None,
            cr_errno: None,
            cr_errmsg: msg.map(str::to_owned),
        };
        let mut any = |_: &str| true;
        assert_eq!(
            answer(&done(true, Some(42), None), &mut any),
            Step::Done(Outcome::Restored(42))
        );
        assert!(matches!(
            answer(&done(true, Some(0), None), &mut any),
            Step::Done(Outcome::Gone(_))
        ));
        assert_eq!(
            answer(&done(false, None, Some("no root")), &mut any),
            Step::Done(Outcome::Failed(Some("no root".into())))
        );
    }

    #[test]
    fn a_request_encodes_as_rpc_proto_says() {
        let req = Request {
            kind: RESTORE,
            opts: Some(Opts {
                images_dir_fd: 7,
                rst_sibling: Some(true),
                manage_cgroups_mode: Some(CG_IGNORE),
                ..Opts::default()
            }),
            notify_success: None,
        };
        #[rustfmt::skip]
        let opts: &[u8] = &[
            0x08, 0x07,       // images_dir_fd (1) = 7
            0xd0, 0x01, 0x01, // rst_sibling (26) = true
            0x90, 0x02, 0x00, // manage_cgroups_mode (34) = IGNORE (0): set, so sent
        ];
        // type (1) = RESTORE (2), then opts (2), length-delimited
        let mut want = vec![0x08, 0x02, 0x12, opts.len() as u8];
        want.extend_from_slice(opts);
        assert_eq!(req.encode_to_vec(), want);
        // A garbage answer is an error, not a panic.
        assert!(Response::decode(&[0xff, 0xff, 0xff][..]).is_err());
    }
}
