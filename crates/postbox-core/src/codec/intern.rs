//! Interning of the low-cardinality text attributes of decoded envelopes
//! (`type`, `source`, `datacontenttype`, `dataversion`).
//!
//! A consumer decodes the same few event types and sources over and over;
//! interned, a decoded envelope borrows them (`Cow::Borrowed` of a
//! `&'static str`) instead of allocating and freeing two or more strings per
//! message. The memory is bounded: at most [`MAX_INTERNED`] distinct strings
//! of at most [`MAX_LEN`] bytes are kept for the life of the process (under
//! 128 KiB); anything beyond that is an owned string as before, so input with
//! ever new values costs what it did, never more memory.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use crate::envelope::Text;

/// How many distinct strings the process keeps at most.
pub(crate) const MAX_INTERNED: usize = 1024;
/// Longer strings are never interned.
pub(crate) const MAX_LEN: usize = 128;
/// How many interned strings each thread remembers for a lock-free hit.
const RECENT: usize = 8;

/// The process-wide set of interned strings, bounded by its capacity.
#[derive(Debug)]
pub(crate) struct Interner {
    set: HashSet<&'static str>,
    cap: usize,
}

impl Interner {
    pub(crate) fn new(cap: usize) -> Self {
        Interner {
            set: HashSet::new(),
            cap,
        }
    }

    /// The interned copy of `s`, made if there is room; `None` when full.
    pub(crate) fn get_or_add(&mut self, s: &str) -> Option<&'static str> {
        if let Some(t) = self.set.get(s) {
            return Some(*t);
        }
        if self.set.len() >= self.cap {
            return None;
        }
        // Kept for the life of the process on purpose (bounded by `cap`).
        let t: &'static str = Box::leak(s.to_owned().into_boxed_str());
        self.set.insert(t);
        Some(t)
    }
}

fn global() -> &'static Mutex<Interner> {
    static GLOBAL: OnceLock<Mutex<Interner>> = OnceLock::new();
    GLOBAL.get_or_init(|| Mutex::new(Interner::new(MAX_INTERNED)))
}

/// The strings this thread interned or looked up last, most recent in
/// `slots[next - 1]`.
struct Recent {
    slots: [Option<&'static str>; RECENT],
    next: usize,
}

thread_local! {
    static RECENT_TEXT: RefCell<Recent> = const {
        RefCell::new(Recent { slots: [None; RECENT], next: 0 })
    };
}

/// `s` as a [`Text`]: borrowed from the interned copy when it is (or can be)
/// interned, owned otherwise.
pub(crate) fn intern(s: &str) -> Text {
    if s.len() > MAX_LEN {
        return Cow::Owned(s.to_owned());
    }
    let hit = RECENT_TEXT
        .try_with(|r| {
            r.borrow()
                .slots
                .iter()
                .flatten()
                .find(|t| **t == s)
                .copied()
        })
        .ok()
        .flatten();
    if let Some(t) = hit {
        return Cow::Borrowed(t);
    }
    let added = global()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_add(s);
    let Some(t) = added else {
        return Cow::Owned(s.to_owned());
    };
    let _ = RECENT_TEXT.try_with(|r| {
        let mut r = r.borrow_mut();
        let slot = r.next % RECENT;
        r.slots[slot] = Some(t);
        r.next = slot + 1;
    });
    Cow::Borrowed(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_is_one_interned_copy() {
        let a = intern("order.placed.intern-test");
        let b = intern(&String::from("order.placed.intern-test"));
        match (&a, &b) {
            (Cow::Borrowed(x), Cow::Borrowed(y)) => assert!(std::ptr::eq(*x, *y)),
            other => panic!("not interned: {other:?}"),
        }
        assert_eq!(a, "order.placed.intern-test");
    }

    #[test]
    fn more_distinct_values_than_a_thread_remembers_stay_correct() {
        let values: Vec<String> = (0..3 * RECENT).map(|i| format!("svc-{i}")).collect();
        for _ in 0..3 {
            for v in &values {
                assert_eq!(intern(v), v.as_str());
            }
        }
    }

    #[test]
    fn long_text_is_owned() {
        let long = "x".repeat(MAX_LEN + 1);
        assert!(matches!(intern(&long), Cow::Owned(ref s) if *s == long));
    }

    #[test]
    fn a_full_interner_adds_nothing() {
        let mut i = Interner::new(2);
        let a = i.get_or_add("a").unwrap();
        assert!(i.get_or_add("b").is_some());
        assert_eq!(i.get_or_add("c"), None, "full: not kept");
        assert!(
            std::ptr::eq(i.get_or_add("a").unwrap(), a),
            "known values still found"
        );
    }
}
