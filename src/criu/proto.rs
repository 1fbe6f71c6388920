//! The shapes of CRIU's protobuf messages this daemon reads and writes
//! (proto2, from CRIU's `images/*.proto`): the RPC of `criu swrk`
//! (`rpc.proto`, only the fields a restore uses), pagemap images
//! (`pagemap.proto`) and the statistics CRIU leaves (`stats.proto`).
//! Field numbers are CRIU's; unknown fields are skipped when decoding.
//! Every decoded message is hostile input: prost bounds what it reads and
//! fails on a malformed one (it does not check that a `required` field is
//! there: such fields are `optional` here where their absence matters).

/// `criu_req_type`.
pub(crate) const RESTORE: i32 = 2;
pub(crate) const NOTIFY: i32 = 6;

/// `criu_cg_mode`: leave cgroups alone (`--manage-cgroups=ignore`).
pub(crate) const CG_IGNORE: i32 = 0;

/// `inherit_fd`: an fd open in CRIU (swrk only) that takes the place of
/// the dumped file named `key`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct InheritFd {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(int32, required, tag = "2")]
    pub fd: i32,
}

/// `criu_opts`: only the fields a restore sets.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Opts {
    /// An fd of the caller (the socket's peer) open on the images dir.
    #[prost(int32, required, tag = "1")]
    pub images_dir_fd: i32,
    #[prost(bool, optional, tag = "4")]
    pub ext_unix_sk: Option<bool>,
    #[prost(bool, optional, tag = "8")]
    pub file_locks: Option<bool>,
    #[prost(int32, optional, tag = "9")]
    pub log_level: Option<i32>,
    /// A name in the work dir (the images dir unless told otherwise).
    #[prost(string, optional, tag = "10")]
    pub log_file: Option<String>,
    /// An fd of the caller open on the work dir (the log, the stats).
    #[prost(int32, optional, tag = "17")]
    pub work_dir_fd: Option<i32>,
    #[prost(bool, optional, tag = "12")]
    pub notify_scripts: Option<bool>,
    #[prost(string, optional, tag = "13")]
    pub root: Option<String>,
    /// The restored tree's root becomes the caller's child.
    #[prost(bool, optional, tag = "26")]
    pub rst_sibling: Option<bool>,
    #[prost(message, repeated, tag = "27")]
    pub inherit_fd: Vec<InheritFd>,
    #[prost(int32, optional, tag = "34")]
    pub manage_cgroups_mode: Option<i32>,
    /// `--external` values (`mnt[KEY]:PATH`).
    #[prost(string, repeated, tag = "37")]
    pub external: Vec<String>,
    #[prost(bool, optional, tag = "52")]
    pub tcp_close: Option<bool>,
}

/// `criu_req`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Request {
    #[prost(int32, required, tag = "1")]
    pub kind: i32,
    #[prost(message, optional, tag = "2")]
    pub opts: Option<Opts>,
    #[prost(bool, optional, tag = "3")]
    pub notify_success: Option<bool>,
}

/// `criu_restore_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RestoreResp {
    #[prost(int32, required, tag = "1")]
    pub pid: i32,
}

/// `criu_notify`: the stage CRIU reached.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Notify {
    #[prost(string, optional, tag = "1")]
    pub script: Option<String>,
    #[prost(int32, optional, tag = "2")]
    pub pid: Option<i32>,
}

/// `criu_resp`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Response {
    #[prost(int32, required, tag = "1")]
    pub kind: i32,
    #[prost(bool, required, tag = "2")]
    pub success: bool,
    #[prost(message, optional, tag = "4")]
    pub restore: Option<RestoreResp>,
    #[prost(message, optional, tag = "5")]
    pub notify: Option<Notify>,
    #[prost(int32, optional, tag = "7")]
    pub cr_errno: Option<i32>,
    #[prost(string, optional, tag = "9")]
    pub cr_errmsg: Option<String>,
}

/// `pagemap_head`.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PagemapHead {
    #[prost(uint32, optional, tag = "1")]
    pub pages_id: Option<u32>,
}

/// `pagemap_entry`: `nr_pages` pages at `vaddr` (CRIU 4.2 writes the count
/// in `nr_pages`, earlier versions in `compat_nr_pages`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PagemapEntry {
    #[prost(uint64, optional, tag = "1")]
    pub vaddr: Option<u64>,
    #[prost(uint32, required, tag = "2")]
    pub compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    pub nr_pages: Option<u64>,
}

/// `stats_entry`: one of the two.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    pub dump: Option<DumpStatsEntry>,
    #[prost(message, optional, tag = "2")]
    pub restore: Option<RestoreStatsEntry>,
}

/// `dump_stats_entry` (times in microseconds).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct DumpStatsEntry {
    #[prost(uint32, required, tag = "1")]
    pub freezing_time: u32,
    #[prost(uint32, required, tag = "2")]
    pub frozen_time: u32,
    #[prost(uint32, required, tag = "3")]
    pub memdump_time: u32,
    #[prost(uint32, required, tag = "4")]
    pub memwrite_time: u32,
    #[prost(uint64, required, tag = "5")]
    pub pages_scanned: u64,
    #[prost(uint64, required, tag = "7")]
    pub pages_written: u64,
}

/// `restore_stats_entry` (times in microseconds).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct RestoreStatsEntry {
    #[prost(uint32, required, tag = "3")]
    pub forking_time: u32,
    #[prost(uint32, required, tag = "4")]
    pub restore_time: u32,
    #[prost(uint64, optional, tag = "5")]
    pub pages_restored: Option<u64>,
}
