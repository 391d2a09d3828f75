//! Spare vectors kept per thread, so the validation path allocates nothing
//! per event once warm (issue 24): a CAR slice's block index and an MST's
//! node arena and entry lists come from here and go back when dropped.
//!
//! Bounded twice: a thread keeps at most `keep` spares, and a vector that
//! grew past `capacity_max` (a hostile or huge commit) is freed, not kept,
//! so one such event does not hold its memory for the thread's life.

use std::cell::RefCell;

pub(crate) struct Spares<T> {
    list: RefCell<Vec<Vec<T>>>,
    keep: usize,
    capacity_max: usize,
}

impl<T> Spares<T> {
    pub(crate) const fn new(keep: usize, capacity_max: usize) -> Spares<T> {
        Spares { list: RefCell::new(Vec::new()), keep, capacity_max }
    }

    /// An empty vector, with room when a spare was kept.
    pub(crate) fn take(&self) -> Vec<T> {
        self.list.borrow_mut().pop().unwrap_or_default()
    }

    /// An empty vector with room for at least `min` (a spare's room is
    /// whatever it last grew to, so a list that must not grow asks).
    pub(crate) fn take_with_room(&self, min: usize) -> Vec<T> {
        let mut v = self.take();
        v.reserve(min);
        v
    }

    /// Give `v` back (emptied); kept if there is room for it.
    pub(crate) fn give(&self, mut v: Vec<T>) {
        if v.capacity() == 0 || v.capacity() > self.capacity_max {
            return;
        }
        v.clear();
        let mut list = self.list.borrow_mut();
        if list.len() < self.keep {
            list.push(v);
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.list.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_keep_and_never_a_large_one() {
        let s: Spares<u8> = Spares::new(2, 16);
        s.give(Vec::with_capacity(8));
        s.give(Vec::with_capacity(64)); // too large: freed
        s.give(Vec::new()); // nothing to keep
        assert_eq!(s.kept(), 1);
        s.give(vec![1, 2, 3]);
        s.give(vec![4]);
        assert_eq!(s.kept(), 2);
        let v = s.take();
        assert!(v.is_empty() && v.capacity() > 0);
        s.take();
        assert_eq!(s.take().capacity(), 0);
    }
}
