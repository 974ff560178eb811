//! mmesh-agent: loads the mmesh XDP and TC programs, keeps their policy maps in
//! sync with the policy, and reports what they see.

pub mod admin;
pub mod agent;
pub mod alloc;
pub mod barrier;
pub mod batch;
pub mod caps;
pub mod compile;
pub mod control;
pub mod counters;
pub mod datapath;
pub mod events;
pub mod fanout;
pub mod hook;
pub mod interface;
pub mod memory;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod show;
pub mod sink;
pub mod stride;
pub mod sys;
pub mod watch;
