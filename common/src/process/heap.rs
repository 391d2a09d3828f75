//! Giving freed heap back to the kernel.
//!
//! glibc returns free memory to the kernel only from the top of an arena
//! (past `MALLOC_TRIM_THRESHOLD_`): after a thousand consumers come and go,
//! what they freed lies between allocations that stay, and a shard kept
//! 8 MiB it no longer used (measured: `malloc_trim(0)` from a debugger
//! brought it back to its start). [`give_back`] asks glibc to release the
//! free pages of every arena, wherever they lie.
//!
//! Not free: glibc locks each arena while it walks it, so an allocating
//! thread of the same arena waits that long. Callers run it on a helper
//! thread, after many frees, not per event.

/// Release the free pages of every heap arena to the kernel; whether any
/// were released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn give_back() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no caller-side
    // invariants; glibc serialises it with every other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return what they free themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_pages_in_the_middle_of_the_heap_go_back() {
        // 20 MiB in 4 KiB blocks (below the mmap threshold: heap), then
        // free all but every 64th: the survivors pin the heap's top, so
        // only give_back can return the pages between them.
        let mut blocks: Vec<Option<Vec<u8>>> = (0..5120).map(|i| Some(vec![i as u8; 4096])).collect();
        for (i, b) in blocks.iter_mut().enumerate() {
            if i % 64 != 0 {
                *b = None;
            }
        }
        let anon = || {
            let s = std::fs::read_to_string("/proc/self/status").unwrap();
            s.lines().find_map(|l| l.strip_prefix("RssAnon:")?.trim().strip_suffix(" kB")?.parse::<u64>().ok()).unwrap()
        };
        let before = anon();
        super::give_back();
        let after = anon();
        assert!(after + 8 * 1024 < before, "{before} kB before, {after} kB after give_back");
        assert_eq!(blocks.iter().flatten().count(), 80);
    }
}
