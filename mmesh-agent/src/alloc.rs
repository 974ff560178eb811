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
    /// mimalloc's `mi_option_get` and `mi_option_set` (`mi_option_t` is a C
    /// enum).
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc.h (the same in its v2 and v3): how
/// long freed memory waits before it goes back to the system, in ms (10 by
/// default; 0 at once).
const PURGE_DELAY: std::ffi::c_int = 15;

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

/// While one is alive, freed memory goes back to the system at once instead
/// of after mimalloc's purge delay: for the reading, validating and applying
/// of a whole policy. Each stage frees most of what the one before built
/// (the file's raw schema, a snapshot's decoded accounts) while the next one
/// allocates about as much on other threads (the validation's), so with the
/// delay both stayed resident together. At 100,000 accounts, the same
/// binary with and without it in alternating runs: a reload's peak 201–205
/// → 185 MB, a first snapshot's 197–199 → 183–187 MB. Not for small
/// changes: with no delay at all, one-account deltas took 2–3 ms more
/// (their pages were faulted in again right after).
pub struct PromptReturn(());

/// Guards alive, and the purge delay to restore when the last goes.
static PROMPT: std::sync::Mutex<(usize, std::ffi::c_long)> = std::sync::Mutex::new((0, 0));

impl PromptReturn {
    #[must_use]
    pub fn new() -> Self {
        let mut prompt = PROMPT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if prompt.0 == 0 {
            // SAFETY: mimalloc's documented option API: no pointers, any
            // thread, any time (an option is one word, read where it is
            // used). PURGE_DELAY is that option's number in mimalloc.h.
            unsafe {
                prompt.1 = mi_option_get(PURGE_DELAY);
                mi_option_set(PURGE_DELAY, 0);
            }
        }
        prompt.0 += 1;
        Self(())
    }
}

impl Default for PromptReturn {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PromptReturn {
    fn drop(&mut self) {
        let mut prompt = PROMPT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        prompt.0 -= 1;
        if prompt.0 == 0 {
            // SAFETY: as in `PromptReturn::new`.
            unsafe { mi_option_set(PURGE_DELAY, prompt.1) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: as in `PromptReturn::new`.
        unsafe { mi_option_get(PURGE_DELAY) }
    }

    #[test]
    fn the_purge_delay_is_zero_while_a_guard_lives_and_restored_after_the_last() {
        let before = purge_delay();
        assert!(before > 0, "mimalloc's default delays purging: {before} ms");
        let a = PromptReturn::new();
        let b = PromptReturn::new();
        assert_eq!(purge_delay(), 0);
        drop(a);
        assert_eq!(purge_delay(), 0, "one guard is still alive");
        drop(b);
        assert_eq!(purge_delay(), before);
    }
}
