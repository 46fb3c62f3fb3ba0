//! The work both sides do per message: the same payload bytes, decoded into
//! the same type, behind `std::hint::black_box` so the optimiser keeps it.

use std::hint::black_box;

use bytes::Bytes;

/// What the payload decodes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Order {
    pub(crate) id: u64,
    pub(crate) amount: u64,
    pub(crate) customer: u32,
    pub(crate) items: u32,
}

/// Bytes `decode` reads (the rest of a payload is padding).
const ENCODED: usize = 24;

/// A payload of `size` bytes (at least 24) holding an [`Order`].
pub(crate) fn payload(size: usize) -> Bytes {
    let order = Order {
        id: 42,
        amount: 1999,
        customer: 7,
        items: 3,
    };
    let mut buf = Vec::with_capacity(size.max(ENCODED));
    buf.extend_from_slice(&order.id.to_le_bytes());
    buf.extend_from_slice(&order.amount.to_le_bytes());
    buf.extend_from_slice(&order.customer.to_le_bytes());
    buf.extend_from_slice(&order.items.to_le_bytes());
    buf.resize(size.max(ENCODED), b' ');
    Bytes::from(buf)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Decodes a payload (the "handler" work), black-boxed on both ends.
#[inline(never)]
pub(crate) fn handle(payload: &[u8]) {
    let b = black_box(payload);
    let order = Order {
        id: u64_at(b, 0),
        amount: u64_at(b, 8),
        customer: u32_at(b, 16),
        items: u32_at(b, 20),
    };
    black_box(order);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_requested_size_and_decodes() {
        let p = payload(64);
        assert_eq!(p.len(), 64);
        handle(&p);
        assert_eq!(u64_at(&p, 8), 1999);
    }
}
