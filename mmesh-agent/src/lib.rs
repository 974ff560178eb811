//! mmesh-agent: loads the mmesh XDP and TC programs, keeps their policy maps in
//! sync with the policy, and reports what they see.

pub mod policy;
pub mod compile;
