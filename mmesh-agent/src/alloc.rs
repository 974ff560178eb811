//! The allocator's memory between policies.
//!
//! The agent runs on mimalloc (`main.rs`). Reading a large policy allocates
//! and frees several times the policy's own size (the file's text, the raw
//! schema, the message and its copies), and mimalloc keeps freed pages for
//! reuse: a process that had read and validated a 100,000-account file
//! was resident for 125 MB with 73 MB of it in use, and 51 MB went back to
//! the system at once when asked. The agent asks once a policy has been read and applied, from the
//! thread that did the work (a thread's free pages are its own).

// Links the crate, and with it mimalloc's library, also into binaries that
// do not make it their allocator (the unit tests): `mi_collect` is there.
use mimalloc as _;

unsafe extern "C" {
    /// mimalloc's `mi_collect`: frees what the calling thread's heap keeps,
    /// and with `force`, returns unused memory to the system now.
    fn mi_collect(force: bool);
}

/// Returns the memory the calling thread's heap keeps free to the system.
/// Costs a few milliseconds with a large heap: for after a policy, not per
/// packet or event. Without mimalloc as the global allocator (the test
/// binaries), mimalloc's own heap is empty and this does nothing.
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any
    // thread at any time (mimalloc's documented API, always linked through
    // the mimalloc crate this one depends on).
    unsafe { mi_collect(true) };
}
