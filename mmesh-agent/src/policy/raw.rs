//! The raw schema: what the deserializers produce, every scalar as written
//! with its location, and unknown or repeated keys kept for validation.

use std::{cell::Cell, fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, SeqAccess},
};

use super::QUOTE_CHARS;

/// What the deserializers need to know that serde cannot pass down: the
/// format (JSON has no locations) and the bounds on what is kept.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reading {
    pub(super) json: bool,
    pub(super) max_accounts: usize,
    /// Account prefixes (both families) kept before the rest of the
    /// accounts are only counted: past twice the capacity of one family,
    /// one family is over it for sure.
    pub(super) max_raw_prefixes: usize,
}

impl Reading {
    pub(super) const YAML: Self = Self {
        json: false,
        max_accounts: usize::MAX,
        max_raw_prefixes: usize::MAX,
    };
}

std::thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::YAML) };
}

/// Sets [`READING`] for one deserialization, and restores it after (also
/// when the deserializer panics).
pub(super) struct ReadingGuard(Reading);

impl ReadingGuard {
    pub(super) fn set(reading: Reading) -> Self {
        Self(READING.replace(reading))
    }
}

impl Drop for ReadingGuard {
    fn drop(&mut self) {
        READING.set(self.0);
    }
}

/// A scalar as written, whatever its YAML or JSON type, so that `pps: 1000`
/// and `pps: "10k"` both reach validation (which names the field when it is
/// bad), `version: 1.10` stays `1.10`, and a number too large for 64 bits is
/// quoted as written instead of rounded through f64. serde-saphyr hands a
/// plain scalar over as its source text when asked for a string; JSON values
/// are taken as their raw text.
#[derive(Clone, Default)]
pub(super) struct Scalar(Text);

/// Scalars of up to this many bytes are kept inline: nearly all of them
/// (ids, addresses, quantities, words).
const INLINE: usize = 22;

/// A scalar's text, inline when short: a 100,000-account policy has about
/// a million scalars, and as a `String` each (8 bytes more, and an
/// allocation) the agent's peak at a reload of such a file was 271 MB
/// instead of 259 MB.
#[derive(Clone)]
enum Text {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl Default for Text {
    fn default() -> Self {
        Self::Inline {
            len: 0,
            bytes: [0; INLINE],
        }
    }
}

impl Scalar {
    pub(super) fn new(text: &str) -> Self {
        if text.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Self(Text::Inline {
                len: text.len() as u8,
                bytes,
            })
        } else {
            Self(Text::Heap(text.into()))
        }
    }

    pub(super) fn as_str(&self) -> &str {
        match &self.0 {
            Text::Inline { len, bytes } => {
                // Copied from a `&str` whole, in `new`.
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default()
            }
            Text::Heap(text) => text,
        }
    }
}

impl fmt::Debug for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::new(v))
            }
        }
        if !READING.get().json {
            return deserializer.deserialize_str(Visitor);
        }
        let raw = <&serde_json::value::RawValue>::deserialize(deserializer)?.get();
        match raw.as_bytes().first() {
            Some(b'"') => match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                // Most strings have no escapes: no second parse.
                Some(plain) if !plain.contains('\\') => Ok(Scalar::new(plain)),
                _ => serde_json::from_str::<String>(raw)
                    .map(|s| Scalar::new(&s))
                    .map_err(serde::de::Error::custom),
            },
            Some(b'[') => Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Seq,
                &Visitor,
            )),
            Some(b'{') => Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Map,
                &Visitor,
            )),
            _ => Ok(Scalar::new(raw)),
        }
    }
}

/// A value with the line and column it came from (0 when the format gives
/// none: JSON, whose problems are then named by their field path alone).
#[derive(Clone, Debug)]
pub(super) struct At<T> {
    pub(super) value: T,
    pub(super) line: u32,
    pub(super) column: u32,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if READING.get().json {
            return Ok(Self {
                value: T::deserialize(deserializer)?,
                line: 0,
                column: 0,
            });
        }
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Self {
            line: u32::try_from(spanned.referenced.line()).unwrap_or(u32::MAX),
            column: u32::try_from(spanned.referenced.column()).unwrap_or(u32::MAX),
            value: spanned.value,
        })
    }
}

impl At<Scalar> {
    pub(super) fn text(&self) -> &str {
        self.value.as_str()
    }
}

/// The field names of a raw struct.
pub(super) trait Fields {
    const NAMES: &'static [&'static str];
}

/// A mapping key: one of `F`'s field names, or another key as written (cut
/// short: it is only quoted).
pub(super) struct Key<F> {
    pub(super) field: Result<&'static str, String>,
    pub(super) fields: PhantomData<F>,
}

impl<'de, F: Fields> Deserialize<'de> for Key<F> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<F>(PhantomData<F>);
        impl<F: Fields> serde::de::Visitor<'_> for Visitor<F> {
            type Value = Key<F>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<F>, E> {
                let field = F::NAMES.iter().find(|n| **n == v).copied().ok_or_else(|| {
                    let cut = v
                        .char_indices()
                        .nth(4 * QUOTE_CHARS)
                        .map_or(v.len(), |(i, _)| i);
                    v[..cut].to_owned()
                });
                Ok(Key {
                    field,
                    fields: PhantomData,
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Key<F>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Key<F>, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Key<F>, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_identifier(Visitor(PhantomData))
    }
}

/// A key of a raw struct that is not one of its fields, or one given twice.
#[derive(Clone, Debug)]
pub(super) struct Extra {
    pub(super) key: At<String>,
    pub(super) repeated: bool,
}

/// The keys of a raw struct that are not its fields: almost always none, so
/// one word in the struct (a policy holds hundreds of thousands of them).
#[derive(Clone, Debug, Default)]
pub(super) struct Extras(Option<Box<[Extra]>>);

impl Extras {
    pub(super) fn push(&mut self, extra: Extra) {
        let mut all = self.0.take().map(Vec::from).unwrap_or_default();
        all.push(extra);
        self.0 = Some(all.into_boxed_slice());
    }

    pub(super) fn as_slice(&self) -> &[Extra] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// Declares a raw struct: every field optional (absent and YAML null read
/// alike), and keys that are not fields kept in `extra` with their location
/// instead of ending the parse, so that validation reports them with every
/// other problem.
macro_rules! raw_struct {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub(super) struct $name {
            $(pub(super) $field: Option<$ty>,)*
            pub(super) extra: Extras,
        }

        impl Fields for $name {
            const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl<'de> serde::de::Visitor<'de> for Visitor {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a mapping of {}", <$name as Fields>::NAMES.join(", "))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let mut out = $name::default();
                        while let Some(key) = map.next_key::<At<Key<$name>>>()? {
                            let extra = |name: &str, repeated| Extra {
                                key: At { value: name.to_owned(), line: key.line, column: key.column },
                                repeated,
                            };
                            match key.value.field {
                                $(Ok(stringify!($field)) => {
                                    if out.$field.is_some() {
                                        out.extra.push(extra(stringify!($field), true));
                                        map.next_value::<IgnoredAny>()?;
                                    } else {
                                        out.$field = map.next_value::<Option<$ty>>()?;
                                    }
                                })*
                                Ok(name) => {
                                    out.extra.push(extra(name, false));
                                    map.next_value::<IgnoredAny>()?;
                                }
                                Err(ref name) => {
                                    out.extra.push(extra(name, false));
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                deserializer.deserialize_map(Visitor)
            }
        }
    };
}

raw_struct! {
    struct RawPolicy {
        version: At<Scalar>,
        global: RawGlobal,
        defaults: RawDefaults,
        accounts: RawAccounts,
    }
}

raw_struct! {
    struct RawGlobal {
        mode: At<Scalar>,
        malformed: At<Scalar>,
        events_per_second: At<Scalar>,
        block: Vec<RawList>,
        allow: Vec<RawList>,
    }
}

raw_struct! {
    struct RawDefaults {
        mode: At<Scalar>,
        limits: Box<RawLimits>,
    }
}

raw_struct! {
    struct RawList {
        name: At<Scalar>,
        action: At<Scalar>,
        cidrs: Vec<At<Scalar>>,
        file: At<Scalar>,
    }
}

raw_struct! {
    /// What most accounts leave out is boxed: a policy's accounts are read
    /// into one vector, which doubles as it grows, of 120 bytes each (160
    /// with `mode`, `block` and `allow` inline).
    struct RawAccount {
        id: At<Scalar>,
        prefixes: Vec<At<Scalar>>,
        mode: Box<At<Scalar>>,
        block: Box<[RawList]>,
        allow: Box<[RawList]>,
        // Boxed: accounts are moved while they are read and validated, and
        // limits are most of an account's size.
        limits: Box<RawLimits>,
    }
}

raw_struct! {
    struct RawLimits {
        inbound: Box<RawDirLimits>,
        outbound: Box<RawDirLimits>,
    }
}

/// `limits.inbound` or `limits.outbound`: the fields given, each with the
/// position of its name in [`RawDirLimits::NAMES`]. A direction gives two
/// or three of its five fields; as five `Option<At<Scalar>>` it took 176
/// bytes (a 192-byte allocation), twice an account: 38 MB of the raw schema
/// of a 100,000-account policy, alive at a reload's peak beside the running
/// policy.
#[derive(Debug, Default)]
pub(super) struct RawDirLimits {
    given: Box<[(u8, At<Scalar>)]>,
    pub(super) extra: Extras,
}

impl Fields for RawDirLimits {
    const NAMES: &'static [&'static str] = DirFields::NAMES;
}

raw_struct! {
    /// A direction's limits as read, before [`RawDirLimits`] keeps the
    /// fields given.
    struct DirFields {
        pps: At<Scalar>,
        pps_burst: At<Scalar>,
        bps: At<Scalar>,
        bps_burst: At<Scalar>,
        action: At<Scalar>,
    }
}

impl RawDirLimits {
    /// From the fields in the order of [`RawDirLimits::NAMES`] (`None`: not
    /// given).
    pub(super) fn new(fields: [Option<At<Scalar>>; 5]) -> Self {
        // Exactly the room needed: collected from a filter, the fields had
        // room for four (mimalloc does not move a block to shrink it by
        // half or less), 16 MB of a 100,000-account policy.
        let mut given = Vec::with_capacity(fields.iter().flatten().count());
        given.extend((0u8..).zip(fields).filter_map(|(i, f)| Some((i, f?))));
        Self {
            given: given.into_boxed_slice(),
            extra: Extras::default(),
        }
    }

    fn get(&self, field: u8) -> Option<&At<Scalar>> {
        self.given.iter().find(|(f, _)| *f == field).map(|(_, v)| v)
    }

    pub(super) fn pps(&self) -> Option<&At<Scalar>> {
        self.get(0)
    }

    pub(super) fn pps_burst(&self) -> Option<&At<Scalar>> {
        self.get(1)
    }

    pub(super) fn bps(&self) -> Option<&At<Scalar>> {
        self.get(2)
    }

    pub(super) fn bps_burst(&self) -> Option<&At<Scalar>> {
        self.get(3)
    }

    pub(super) fn action(&self) -> Option<&At<Scalar>> {
        self.get(4)
    }
}

/// Read as a [`raw_struct!`] is (a field given twice or a key that is no
/// field goes to `extra`, a `null` is a field not given), then compacted.
impl<'de> Deserialize<'de> for RawDirLimits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let read = DirFields::deserialize(deserializer)?;
        Ok(Self {
            extra: read.extra,
            ..Self::new([
                read.pps,
                read.pps_burst,
                read.bps,
                read.bps_burst,
                read.action,
            ])
        })
    }
}

#[derive(Debug, Default)]
pub(super) struct RawAccounts {
    pub(super) kept: Vec<RawAccount>,
    /// Accounts in the file, kept or not.
    pub(super) total: usize,
    /// Account prefixes of the kept accounts, both families.
    pub(super) raw_prefixes: usize,
}

impl<'de> Deserialize<'de> for RawAccounts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawAccounts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of accounts")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawAccounts, A::Error> {
                let bounds = READING.get();
                let mut out = RawAccounts {
                    kept: Vec::with_capacity(
                        seq.size_hint()
                            .unwrap_or(0)
                            .min(bounds.max_accounts)
                            .min(1 << 20),
                    ),
                    ..RawAccounts::default()
                };
                loop {
                    if out.kept.len() < bounds.max_accounts
                        && out.raw_prefixes <= bounds.max_raw_prefixes
                    {
                        let Some(account) = seq.next_element::<RawAccount>()? else {
                            break;
                        };
                        out.raw_prefixes += account.prefixes.as_ref().map_or(0, Vec::len);
                        out.kept.push(account);
                    } else if seq.next_element::<IgnoredAny>()?.is_none() {
                        break;
                    }
                    out.total += 1;
                }
                Ok(out)
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}
