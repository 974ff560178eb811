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
/// long freed memory waits before it goes back to the system, in ms (1,000
/// by default in the v3 the agent links; 0 at once).
const PURGE_DELAY: std::ffi::c_int = 15;

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`,
/// inherited by its children): for the first line of `main`, before the
/// heap grows.
///
/// mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), which the
/// kernel grants also where THP is `madvise` only, as most distributions
/// ship it. A 2 MiB page is resident whole once one byte of it is, and the
/// agent's heap is a million small objects that live as long as the policy,
/// made between as many that do not. At 100,000 accounts from the control
/// plane, 36 MB of the agent's 125–135 MB were huge pages, and the figure
/// moved by 14 MB between runs of the same binary; without them it was
/// 106–108 MB every run (docs/benchmarks.md). The heap's huge pages buy the
/// agent nothing it can measure: packets never reach it.
pub fn no_huge_pages() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integers only and
    // changes a flag of the calling process.
    let done = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
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
    fn huge_pages_are_off_for_the_process_after_no_huge_pages() {
        no_huge_pages().expect("Linux 3.15 and later have PR_SET_THP_DISABLE");
        // SAFETY: PR_GET_THP_DISABLE takes integers only.
        let off = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(off, 1);
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(status.contains("THP_enabled:\t0"), "{status}");
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
