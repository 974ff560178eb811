//! Values: names, CIDRs and quantities, and quoting them in messages.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use super::{MAX_NAME_LEN, QUOTE_CHARS};

pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')))
    {
        return Err(format!(
            "contains {c:?}: use letters, digits and - _ . : / @"
        ));
    }
    Ok(())
}

/// Parses `a.b.c.d/len`, `x::y/len`, or a bare address (a host prefix).
/// Host bits must be zero: `10.0.0.1/24` is refused with the network it
/// probably meant. An IPv4-mapped IPv6 prefix (`::ffff:10.0.0.0/104`) is
/// refused with the IPv4 prefix it probably meant: the datapath sees IPv4
/// packets with IPv4 addresses, so it would match nothing.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| {
            format!(
                "{} is not a CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)",
                quote(text)
            )
        })?
    } else {
        let addr: IpAddr = text.parse().map_err(|_| {
            format!(
                "{} is not an IP address or CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32)",
                quote(text)
            )
        })?;
        IpNet::from(addr)
    };
    if let IpNet::V6(v6) = net
        && v6.prefix_len() >= 96
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Ok(meant) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return Err(format!(
            "{} is an IPv4-mapped IPv6 prefix, which matches no packet (IPv4 packets carry IPv4 addresses); did you mean {}?",
            quote(text),
            meant.trunc()
        ));
    }
    if net.trunc() != net {
        return Err(format!(
            "{} has host bits set; did you mean {}?",
            quote(text),
            net.trunc()
        ));
    }
    Ok(net)
}

/// Whether a list file's line could be a mistyped address (only the
/// characters of addresses, short, with a `.` or `:`), and may be quoted.
pub(super) fn address_shaped(entry: &str) -> bool {
    entry.len() <= 49
        && entry.contains(['.', ':'])
        && entry
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
}

/// Parses a rate or size: a whole or decimal number with an optional SI
/// suffix k, M, G or T (powers of 1000), e.g. `100000`, `10k`, `1.5G`.
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{} is not a quantity: expected a number with an optional k, M, G or T suffix (e.g. 10k, 1.5G)",
            quote(text)
        )
    };
    let t = text.trim();
    let (digits, scale) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000u64),
        Some((i, 'M')) => (&t[..i], 1_000_000),
        Some((i, 'G')) => (&t[..i], 1_000_000_000),
        Some((i, 'T')) => (&t[..i], 1_000_000_000_000),
        _ => (t, 1),
    };
    if digits.is_empty()
        || !digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        || digits.matches('.').count() > 1
    {
        return Err(bad());
    }
    let too_large = || {
        format!(
            "{} is too large: the largest quantity is {}",
            quote(text),
            u64::MAX
        )
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut value = whole.checked_mul(scale).ok_or_else(too_large)?;
    // Decimal fractions exactly, digit by digit: 1.5G is 1_500_000_000.
    let mut unit = scale;
    for c in frac.chars() {
        unit /= 10;
        if unit == 0 {
            return Err(format!(
                "{} has more decimals than its unit allows",
                quote(text)
            ));
        }
        value = value
            .checked_add(u64::from(c.to_digit(10).ok_or_else(bad)?) * unit)
            .ok_or_else(too_large)?;
    }
    Ok(value)
}

/// `text` quoted for a message: escaped like a Rust string literal (control
/// characters included), and cut after [`QUOTE_CHARS`] characters with its
/// length noted, so that a megabyte-long value costs a message one line.
#[must_use]
pub fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} characters)", &text[..cut], text.chars().count()),
    }
}

/// `text` cut short and escaped like [`quote`], without the quotes: for a
/// key in a field path.
pub(super) fn short(text: &str) -> String {
    let q = quote(text);
    match q.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.to_owned(),
        None => q,
    }
}

/// The field of `names` that `name` is probably a misspelling of: at most
/// two edits away (one for short names).
pub(super) fn suggest(name: &str, names: &[&'static str]) -> Option<&'static str> {
    if name.len() > 64 {
        return None;
    }
    names
        .iter()
        .map(|n| (edit_distance(name, n), *n))
        .filter(|(d, n)| *d <= if n.len() <= 4 { 1 } else { 2 })
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Levenshtein distance of two short strings, by bytes.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}
