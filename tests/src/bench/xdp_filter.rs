//! xdp-filter (Debian's xdp-tools) as the peer mmesh is measured against
//! (not written yet).
