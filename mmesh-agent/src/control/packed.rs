//! The held accounts, encoded and packed: LZ4 in blocks of [`BLOCK`]
//! accounts, in a persistent vector.
//!
//! The agent holds the control plane's accounts as they were encoded, for
//! deltas and the last-known-good file; the validated policy does not
//! keep what they said (which fields came from `defaults`, how a rate was
//! written). Held as they came they were 20 MB at 100,000 accounts, of the
//! agent's 141 MB; packed they are 3 MB. A block is unpacked to
//! read it (about 25 KB at 100,000 accounts, a few microseconds), and
//! packed again when a delta changes one of its accounts: a delta copies
//! and packs the blocks it touches, and shares the others with the state
//! before it.

use std::sync::Arc;

use bytes::Bytes;
use lz4_flex::block::{self as lz4, CompressTable};

/// Accounts per block. Blocks of 128 accounts pack 7× (the benchmark's);
/// larger ones gain little and make a delta pack more.
const BLOCK: usize = 128;

/// Encoded accounts, in order, packed in blocks. Every block but the last
/// holds [`BLOCK`] accounts, so that account `i` is in block `i / BLOCK`.
#[derive(Clone, Debug, Default)]
pub struct Packed {
    blocks: imbl::Vector<Block>,
}

/// [`BLOCK`] accounts (or fewer, the last block), each as its length (four
/// bytes, little-endian) and its bytes, compressed.
#[derive(Clone, Debug)]
struct Block {
    /// Accounts in it.
    count: u32,
    /// Bytes when unpacked.
    raw_len: u32,
    lz4: Arc<[u8]>,
}

impl Block {
    /// Packs `accounts` (at most [`BLOCK`]).
    fn pack<'a>(accounts: impl IntoIterator<Item = &'a [u8]>, packing: &mut Packing) -> Self {
        packing.raw.clear();
        let mut count = 0;
        for account in accounts {
            packing.add(account);
            count += 1;
        }
        packing.seal(count)
    }

    /// The block's accounts: slices of one buffer. A block that does not
    /// unpack (it was packed here, so it cannot, short of memory gone bad)
    /// reads as empty accounts, which validation refuses: the agent never
    /// holds a policy it did not validate.
    fn unpack(&self) -> Vec<Bytes> {
        let mut raw = vec![0; self.raw_len as usize];
        let accounts = match lz4::decompress_into(&self.lz4, &mut raw) {
            Ok(n) if n == raw.len() => split(&Bytes::from(raw), self.count as usize),
            _ => None,
        };
        accounts.unwrap_or_else(|| vec![Bytes::new(); self.count as usize])
    }
}

/// The accounts of an unpacked block, if it holds `count` whole.
fn split(raw: &Bytes, count: usize) -> Option<Vec<Bytes>> {
    let mut accounts = Vec::with_capacity(count);
    let mut at = 0;
    while at < raw.len() {
        let len = raw.get(at..at + 4)?;
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let start = at + 4;
        let end = start.checked_add(len).filter(|&e| e <= raw.len())?;
        accounts.push(raw.slice(start..end));
        at = end;
    }
    (accounts.len() == count).then_some(accounts)
}

/// What packing a block needs, kept between blocks.
#[derive(Default)]
struct Packing {
    raw: Vec<u8>,
    out: Vec<u8>,
    table: CompressTable,
}

impl Packing {
    fn add(&mut self, account: &[u8]) {
        // An account is at most --max-policy-bytes, far below 4 GiB; a
        // length that did not fit would fail `split`, not pass for another.
        let len = u32::try_from(account.len()).unwrap_or(u32::MAX);
        self.raw.extend_from_slice(&len.to_le_bytes());
        self.raw.extend_from_slice(account);
    }

    /// The accounts added since the last seal, as a block.
    fn seal(&mut self, count: u32) -> Block {
        self.out
            .resize(lz4::get_maximum_output_size(self.raw.len()), 0);
        let packed = lz4::compress_into_with_table(&self.raw, &mut self.out, &mut self.table)
            .expect("the output has the room lz4 asks for");
        let block = Block {
            count,
            raw_len: u32::try_from(self.raw.len()).unwrap_or(u32::MAX),
            lz4: Arc::from(&self.out[..packed]),
        };
        self.raw.clear();
        block
    }
}

/// Packs accounts as they come: [`Packer::push`] each, then
/// [`Packer::finish`].
#[derive(Default)]
pub struct Packer {
    packing: Packing,
    count: u32,
    packed: Packed,
}

impl Packer {
    pub fn push(&mut self, account: &[u8]) {
        self.packing.add(account);
        self.count += 1;
        if self.count as usize == BLOCK {
            self.seal();
        }
    }

    fn seal(&mut self) {
        let block = self.packing.seal(self.count);
        self.packed.blocks.push_back(block);
        self.count = 0;
    }

    #[must_use]
    pub fn finish(mut self) -> Packed {
        if self.count > 0 {
            self.seal();
        }
        self.packed
    }
}

impl FromIterator<Bytes> for Packed {
    fn from_iter<I: IntoIterator<Item = Bytes>>(accounts: I) -> Self {
        let mut packer = Packer::default();
        for account in accounts {
            packer.push(&account);
        }
        packer.finish()
    }
}

impl Packed {
    #[must_use]
    pub fn len(&self) -> usize {
        self.blocks.back().map_or(0, |last| {
            (self.blocks.len() - 1) * BLOCK + last.count as usize
        })
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes the blocks take packed.
    #[must_use]
    pub fn packed_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.lz4.len()).sum()
    }

    /// Account `i`.
    #[must_use]
    pub fn get(&self, i: usize) -> Option<Bytes> {
        if i >= self.len() {
            return None;
        }
        self.blocks[i / BLOCK]
            .unpack()
            .swap_remove(i % BLOCK)
            .into()
    }

    /// Replaces account `i` (an index past the end changes nothing).
    pub fn set(&mut self, i: usize, account: &[u8]) {
        if i >= self.len() {
            return;
        }
        let (b, k) = (i / BLOCK, i % BLOCK);
        let mut accounts = self.blocks[b].unpack();
        accounts[k] = Bytes::copy_from_slice(account);
        self.blocks.set(
            b,
            Block::pack(accounts.iter().map(|a| &a[..]), &mut Packing::default()),
        );
    }

    pub fn push_back(&mut self, account: &[u8]) {
        let mut packing = Packing::default();
        if self.len().is_multiple_of(BLOCK) {
            self.blocks.push_back(Block::pack([account], &mut packing));
        } else {
            let last = self.blocks.len() - 1;
            let accounts = self.blocks[last].unpack();
            let block = Block::pack(
                accounts.iter().map(|a| &a[..]).chain([account]),
                &mut packing,
            );
            self.blocks.set(last, block);
        }
    }

    pub fn pop_back(&mut self) -> Option<Bytes> {
        let mut accounts = self.blocks.pop_back()?.unpack();
        let last = accounts.pop();
        if !accounts.is_empty() {
            self.blocks.push_back(Block::pack(
                accounts.iter().map(|a| &a[..]),
                &mut Packing::default(),
            ));
        }
        last
    }

    /// The accounts in order, unpacked a block at a time.
    #[must_use]
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            blocks: self.blocks.iter(),
            block: Vec::new().into_iter(),
            left: self.len(),
        }
    }
}

/// [`Packed::iter`].
pub struct Iter<'a> {
    blocks: imbl::vector::Iter<'a, Block, imbl::shared_ptr::DefaultSharedPtr>,
    block: std::vec::IntoIter<Bytes>,
    left: usize,
}

impl Iterator for Iter<'_> {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(account) = self.block.next() {
                self.left -= 1;
                return Some(account);
            }
            self.block = self.blocks.next()?.unpack().into_iter();
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(i: usize) -> Vec<u8> {
        // Sizes from empty to a few hundred bytes, content by index.
        let mut a = format!("account-{i}-{}", "x".repeat(311)).into_bytes();
        a.truncate((i * 7) % 311);
        a
    }

    fn all(p: &Packed) -> Vec<Vec<u8>> {
        p.iter().map(|a| a.to_vec()).collect()
    }

    #[test]
    fn accounts_read_back_in_order_across_blocks_and_pack_smaller() {
        let accounts: Vec<Vec<u8>> = (0..3 * BLOCK + 5).map(account).collect();
        let packed: Packed = accounts.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        assert_eq!(packed.len(), accounts.len());
        assert_eq!(packed.iter().len(), accounts.len());
        assert_eq!(all(&packed), accounts);
        for i in [0, BLOCK - 1, BLOCK, 3 * BLOCK + 4] {
            assert_eq!(packed.get(i).as_deref(), Some(&accounts[i][..]), "{i}");
        }
        assert_eq!(packed.get(accounts.len()), None);
        let raw: usize = accounts.iter().map(Vec::len).sum();
        assert!(
            packed.packed_bytes() * 3 < raw,
            "{} packed of {raw}",
            packed.packed_bytes()
        );
        assert!(Packed::default().iter().next().is_none());
    }

    #[test]
    fn edits_match_a_vector_and_leave_the_copy_before_them_as_it_was() {
        let mut mirror: Vec<Vec<u8>> = (0..2 * BLOCK).map(account).collect();
        let mut packed: Packed = mirror.iter().map(|a| Bytes::copy_from_slice(a)).collect();
        let before = packed.clone();
        let untouched = mirror.clone();
        // A pseudo-random walk of sets, pushes and pops over block edges.
        let mut x: u64 = 7;
        for step in 0..2_000 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let i = (x >> 33) as usize;
            match i % 3 {
                0 if !mirror.is_empty() => {
                    let at = i % mirror.len();
                    let new = account(step + 1_000);
                    packed.set(at, &new);
                    mirror[at] = new;
                }
                1 => {
                    let new = account(step);
                    packed.push_back(&new);
                    mirror.push(new);
                }
                _ => assert_eq!(
                    packed.pop_back().map(|a| a.to_vec()),
                    mirror.pop(),
                    "step {step}"
                ),
            }
            assert_eq!(packed.len(), mirror.len(), "step {step}");
        }
        assert_eq!(all(&packed), mirror);
        assert_eq!(all(&before), untouched);
        // Emptied, and filled again.
        while packed.pop_back().is_some() {}
        assert!(packed.is_empty());
        packed.push_back(b"a");
        assert_eq!(all(&packed), [b"a".to_vec()]);
    }

    #[test]
    fn a_block_that_does_not_unpack_reads_as_empty_accounts() {
        let mut packed: Packed = (0..3).map(|i| Bytes::from(account(i + 50))).collect();
        let block = &mut packed.blocks[0];
        block.lz4 = Arc::from(&b"not lz4"[..]);
        assert_eq!(all(&packed), vec![Vec::<u8>::new(); 3]);
    }
}
