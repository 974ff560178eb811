//! Validation of the raw schema into a [`Policy`], collecting every problem.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    Account, Action, DEFAULT_BURST_MILLIS, DEFAULT_EVENTS_PER_SECOND, DirLimits, Fingerprint,
    Global, Issue, List, ListKind, MAX_BPS, MAX_BURST_SECONDS, MAX_EVENTS_PER_SECOND, MAX_PATH_LEN,
    MAX_PPS, MAX_VERSION_LEN, MIN_BPS, MIN_DEFAULT_BPS_BURST, MIN_DEFAULT_PPS_BURST, Mode, Policy,
    Rate,
    index::{Ids, Owners},
    raw::{
        At, Extra, Fields, RawAccount, RawAccounts, RawDefaults, RawDirLimits, RawGlobal,
        RawLimits, RawList, RawPolicy, Scalar,
    },
    read::{FileError, ReadLimits, Reads, read_regular},
    values::{address_shaped, check_name, parse_cidr, parse_quantity, quote, short, suggest},
};
use crate::sink::escape_controls;

pub(super) struct Validator<'a> {
    pub(super) source: &'a str,
    pub(super) base_dir: &'a Path,
    pub(super) limits: &'a ReadLimits,
    pub(super) reads: &'a mut Reads,
    pub(super) issues: Vec<Issue>,
}

/// What validation indexes the accounts by, each to the position of the
/// (first) account in the policy, compared through the policy's accounts.
#[derive(Debug, Default)]
pub struct Index {
    /// Account ids.
    pub ids: Ids,
    /// Account prefixes.
    pub owners: Owners,
}

/// Accounts from which [`Validator::policy_indexed`] validates them on
/// several threads: below it, starting them costs more than it saves.
pub(super) const PARALLEL_ACCOUNTS: usize = 4096;

/// Threads that validate accounts at most.
const MAX_THREADS: usize = 4;

/// One account validated on its own ([`Validator::check_account`]), waiting
/// for the checks that involve the accounts before it.
pub(super) struct Checked {
    account: Arc<Account>,
    /// The line and column of its id, if it has one (formatted only for a
    /// problem: as a string each, 100,000 accounts took 7 MB while they
    /// waited).
    id_at: Option<(u32, u32)>,
    /// Its own problems, in the order found.
    issues: Vec<Issue>,
}

/// `defaults.limits`, validated once for all the accounts that use them
/// (with the actions as written: each account applies its mode).
pub(super) type DefaultLimits = (Option<DirLimits>, Option<DirLimits>);

impl Validator<'_> {
    pub(super) fn at<T>(&self, at: &At<T>) -> String {
        self.at_place(Some((at.line, at.column)))
    }

    /// [`Validator::at`] for a line and column kept apart (`None`: the
    /// source alone).
    fn at_place(&self, place: Option<(u32, u32)>) -> String {
        match place {
            Some((line, column)) if line != 0 => format!("{}:{line}:{column}", self.source),
            _ => self.source.to_owned(),
        }
    }

    pub(super) fn issue(
        &mut self,
        location: String,
        path: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.issues.push(Issue {
            location,
            path: path.into(),
            message: message.into(),
            full: None,
        });
    }

    /// Reports that the policy needs more room in `map` than it has.
    fn no_room(&mut self, map: &'static str, path: &str, message: String) {
        self.issue(self.source.to_owned(), path, message);
        if let Some(issue) = self.issues.last_mut() {
            issue.full = Some(map);
        }
    }

    /// Reports the keys of a raw struct at `path` that are not its fields.
    pub(super) fn extra<F: Fields>(&mut self, extra: &[Extra], path: &str) {
        for e in extra {
            let name = &e.key.value;
            let field = if path.is_empty() {
                short(name)
            } else {
                format!("{path}.{}", short(name))
            };
            let message = if e.repeated {
                format!("field {} is given twice: give it once", quote(name))
            } else {
                let fields = F::NAMES.join(", ");
                match suggest(name, F::NAMES) {
                    Some(near) => format!(
                        "unknown field {}: did you mean `{near}`? (the fields here: {fields})",
                        quote(name)
                    ),
                    None => format!(
                        "unknown field {}: remove it (the fields here: {fields})",
                        quote(name)
                    ),
                }
            };
            let at = self.at(&e.key);
            self.issue(at, field, message);
        }
    }

    /// One of `words`, or a problem at `path()` naming them (the path is
    /// made only then: the field is in every account).
    pub(super) fn word<T: Copy>(
        &mut self,
        raw: Option<&At<Scalar>>,
        path: impl FnOnce() -> String,
        words: &[(&str, T)],
    ) -> Option<T> {
        let raw = raw?;
        if let Some((_, value)) = words.iter().find(|(w, _)| *w == raw.text()) {
            return Some(*value);
        }
        let expected: Vec<&str> = words.iter().map(|(w, _)| *w).collect();
        let at = self.at(raw);
        self.issue(
            at,
            path(),
            format!(
                "{} is not one of: {}",
                quote(raw.text()),
                expected.join(", ")
            ),
        );
        None
    }

    pub(super) fn mode(
        &mut self,
        raw: Option<&At<Scalar>>,
        path: impl FnOnce() -> String,
    ) -> Option<Mode> {
        self.word(raw, path, Mode::WORDS)
    }

    pub(super) fn action(
        &mut self,
        raw: Option<&At<Scalar>>,
        path: impl FnOnce() -> String,
    ) -> Option<Action> {
        self.word(raw, path, Action::WORDS)
    }

    pub(super) fn policy(&mut self, raw: RawPolicy) -> Policy {
        self.policy_indexed(raw).0
    }

    /// [`Validator::policy`], and the indexes it builds to find repeated
    /// ids and prefixes owned twice: what a control-plane policy keeps for
    /// its deltas, instead of building them again.
    pub(super) fn policy_indexed(&mut self, raw: RawPolicy) -> (Policy, Index) {
        self.extra::<RawPolicy>(raw.extra.as_slice(), "");
        let version = raw.version.and_then(|v| self.version(&v));
        let global = self.global(raw.global.unwrap_or_default());
        let defaults = raw.defaults.unwrap_or_default();
        self.extra::<RawDefaults>(defaults.extra.as_slice(), "defaults");
        let default_mode = self
            .mode(defaults.mode.as_ref(), || "defaults.mode".to_owned())
            .unwrap_or_default();
        let default_limits = defaults
            .limits
            .as_ref()
            .map(|l| self.limits(l, "defaults.limits", Mode::Enforce));
        let raw_accounts = raw.accounts.unwrap_or_default();
        self.account_count(&raw_accounts);
        let n = raw_accounts.kept.len();
        let mut accounts: Vec<Arc<Account>> = Vec::with_capacity(n);
        let mut index = Index::default();
        let reads_files = raw_accounts.kept.iter().any(|a| {
            a.block
                .iter()
                .chain(&a.allow)
                .flatten()
                .any(|l| l.file.is_some())
        });
        if n >= PARALLEL_ACCOUNTS && !reads_files {
            let checked =
                self.accounts_in_parallel(raw_accounts.kept, default_mode, default_limits);
            self.place_all(checked, &mut accounts, &mut index);
        } else {
            // As many as the accounts list: growing the tables half-way
            // through 400,000 prefixes cost tens of milliseconds. (A
            // prefix that does not parse is counted, and takes no room.)
            let v6 = raw_accounts
                .kept
                .iter()
                .flat_map(|a| a.prefixes.iter().flatten())
                .filter(|p| p.text().contains(':'))
                .count();
            index = Index {
                ids: Ids::with_capacity(n),
                owners: Owners::with_capacity(raw_accounts.raw_prefixes.saturating_sub(v6), v6),
            };
            for (i, raw) in raw_accounts.kept.into_iter().enumerate() {
                let checked = self.check_account(raw, i, default_mode, default_limits);
                self.place(checked, &mut accounts, &mut index);
            }
        }
        self.prefix_count(&accounts, raw_accounts.total > n);
        let policy = Policy {
            source: self.source.to_owned(),
            version,
            global,
            accounts,
        };
        (policy, index)
    }

    /// Validates account number `i` as far as it goes without the others;
    /// its problems are taken out of `self.issues` into the result.
    fn check_account(
        &mut self,
        raw: RawAccount,
        i: usize,
        default_mode: Mode,
        default_limits: Option<DefaultLimits>,
    ) -> Checked {
        let path = format!("accounts[{i}]");
        let id_at = raw.id.as_ref().map(|id| (id.line, id.column));
        let before = self.issues.len();
        let account = self.account(raw, &path, default_mode, default_limits);
        Checked {
            account: super::share::shared(account, i),
            id_at,
            issues: self.issues.split_off(before),
        }
    }

    /// [`Validator::check_account`] for every account, in order, on the
    /// CPUs the machine has (at most [`MAX_THREADS`]): validating each
    /// account takes microseconds, 100,000 of them a third of a second on
    /// one CPU. Only for accounts that name no list files (reading those
    /// shares one budget of bytes, in the accounts' order).
    fn accounts_in_parallel(
        &mut self,
        mut raw: Vec<RawAccount>,
        default_mode: Mode,
        default_limits: Option<DefaultLimits>,
    ) -> Vec<Checked> {
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .clamp(1, MAX_THREADS);
        let chunk = raw.len().div_ceil(threads).max(1);
        let (source, base_dir, limits) = (self.source, self.base_dir, self.limits);
        let check = |first: usize, part: &mut [RawAccount]| {
            let mut reads = Reads::default();
            let mut v = Validator {
                source,
                base_dir,
                limits,
                reads: &mut reads,
                issues: Vec::new(),
            };
            part.iter_mut()
                .enumerate()
                .map(|(k, raw)| {
                    v.check_account(std::mem::take(raw), first + k, default_mode, default_limits)
                })
                .collect::<Vec<_>>()
        };
        // A reload shares the accounts equal to the running policy's on
        // every thread, not only on this one.
        let running = super::share::running();
        let running = running.as_ref();
        let parts: Vec<Vec<Checked>> = std::thread::scope(|s| {
            let mut parts = raw.chunks_mut(chunk).enumerate();
            let mine = parts.next();
            let others: Vec<_> = parts
                .map(|(p, part)| {
                    s.spawn(move || match running {
                        Some(policy) => {
                            super::share::reading_beside(policy, || check(p * chunk, part))
                        }
                        None => check(p * chunk, part),
                    })
                })
                .collect();
            let mut out = vec![mine.map_or_else(Vec::new, |(_, part)| check(0, part))];
            out.extend(others.into_iter().map(|t| {
                t.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }));
            out
        });
        parts.into_iter().flatten().collect()
    }

    /// [`Validator::place`] for every account of `checked`, into an empty
    /// `accounts`: the ids indexed on a thread of their own while the
    /// prefixes are on this one (half a million look-ups at 100,000
    /// accounts), then the problems placed in the order `place` finds them.
    fn place_all(
        &mut self,
        checked: Vec<Checked>,
        accounts: &mut Vec<Arc<Account>>,
        index: &mut Index,
    ) {
        debug_assert!(accounts.is_empty(), "positions are indexes");
        let mut id_ats = Vec::with_capacity(checked.len());
        let mut own = Vec::new();
        for (i, c) in checked.into_iter().enumerate() {
            accounts.push(c.account);
            id_ats.push(c.id_at);
            if !c.issues.is_empty() {
                own.push((i, c.issues));
            }
        }
        let accounts: &[Arc<Account>] = accounts;
        let v4 = accounts.iter().map(|a| a.prefixes_v4.len()).sum();
        let v6 = accounts.iter().map(|a| a.prefixes_v6.len()).sum();
        *index = Index {
            ids: Ids::with_capacity(accounts.len()),
            owners: Owners::with_capacity(v4, v6),
        };
        let Index { ids, owners } = index;
        let (repeated, shared) = std::thread::scope(|s| {
            let indexing = s.spawn(|| {
                let mut repeated = Vec::new();
                for (i, at) in id_ats.iter().enumerate() {
                    if at.is_some()
                        && let Some(first) = ids.insert(i, accounts)
                    {
                        repeated.push((i, first));
                    }
                }
                repeated
            });
            let mut shared = Vec::new();
            for i in 0..accounts.len() {
                owners.claim(i, accounts, |net, owner| {
                    if accounts[owner].id != accounts[i].id {
                        shared.push((i, net, owner));
                    }
                });
            }
            let repeated = indexing
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (repeated, shared)
        });
        let mut repeated = repeated.into_iter().peekable();
        let mut own = own.into_iter().peekable();
        let mut shared = shared.into_iter().peekable();
        loop {
            // The next account with a problem.
            let Some(i) = [
                repeated.peek().map(|r| r.0),
                own.peek().map(|o| o.0),
                shared.peek().map(|s| s.0),
            ]
            .into_iter()
            .flatten()
            .min() else {
                return;
            };
            let location = self.at_place(id_ats[i]);
            let id = &accounts[i].id;
            if let Some((_, first)) = repeated.next_if(|r| r.0 == i) {
                self.issue(
                    location.clone(),
                    format!("accounts[{i}].id"),
                    format!(
                        "account id {} is already used by accounts[{first}]; ids must be unique",
                        quote(id)
                    ),
                );
            }
            if let Some((_, issues)) = own.next_if(|o| o.0 == i) {
                self.issues.extend(issues);
            }
            while let Some((_, net, other)) = shared.next_if(|s| s.0 == i) {
                self.issue(
                    location.clone(),
                    format!("accounts[{i}].prefixes"),
                    format!("prefix {net} is also owned by account {}; an address belongs to one account (nested prefixes are allowed, the most specific wins)", quote(&accounts[other].id)),
                );
            }
        }
    }

    /// Adds a checked account to `accounts` (its position is its index),
    /// with its problems and those it has with the accounts before it: an
    /// id already used, a prefix another account owns.
    fn place(&mut self, checked: Checked, accounts: &mut Vec<Arc<Account>>, index: &mut Index) {
        let Checked {
            account,
            id_at,
            issues,
        } = checked;
        let i = accounts.len();
        // In place first: the indexes compare through the accounts.
        accounts.push(account);
        let accounts: &[Arc<Account>] = accounts;
        let path = || format!("accounts[{i}]");
        if id_at.is_some()
            && let Some(first) = index.ids.insert(i, accounts)
        {
            self.issue(
                self.at_place(id_at),
                format!("{}.id", path()),
                format!(
                    "account id {} is already used by accounts[{first}]; ids must be unique",
                    quote(&accounts[i].id)
                ),
            );
        }
        self.issues.extend(issues);
        // One look-up per prefix: 400,000 of them at 100,000 accounts.
        index.owners.claim(i, accounts, |net, owner| {
            let other = &accounts[owner].id;
            if *other != accounts[i].id {
                self.issue(
                    self.at_place(id_at),
                    format!("{}.prefixes", path()),
                    format!("prefix {net} is also owned by account {}; an address belongs to one account (nested prefixes are allowed, the most specific wins)", quote(other)),
                );
            }
        });
    }

    pub(super) fn version(&mut self, raw: &At<Scalar>) -> Option<String> {
        let text = raw.text();
        let problem = if text.chars().count() > MAX_VERSION_LEN {
            format!(
                "{} is longer than {MAX_VERSION_LEN} characters: a version is logged at every reload, keep it short",
                quote(text)
            )
        } else if text.chars().any(char::is_control) {
            format!(
                "{} contains control characters: a version is logged, use printable text",
                quote(text)
            )
        } else {
            return Some(text.to_owned());
        };
        let at = self.at(raw);
        self.issue(at, "version", problem);
        None
    }

    /// Refuses more accounts than `--max-accounts` (those past it were
    /// only counted).
    pub(super) fn account_count(&mut self, raw: &RawAccounts) {
        if let Some(max) = self.limits.max_accounts
            && raw.total > max as usize
        {
            let kept = raw.kept.len();
            let total = raw.total;
            self.no_room(
                "accounts",
                "accounts",
                format!(
                    "{total} accounts, more than map accounts holds (--max-accounts {max}): raise --max-accounts to {total} or more (only the first {kept} were checked)"
                ),
            );
        }
    }

    /// Refuses more account prefixes of a family than
    /// `--max-account-prefixes`; `cut`: accounts were left unread.
    pub(super) fn prefix_count(&mut self, accounts: &[Arc<Account>], cut: bool) {
        let Some(max) = self.limits.max_account_prefixes else {
            return;
        };
        let v4: usize = accounts.iter().map(|a| a.prefixes_v4.len()).sum();
        let v6: usize = accounts.iter().map(|a| a.prefixes_v6.len()).sum();
        for (n, family, map) in [
            (v4, "IPv4", "account_prefixes_v4"),
            (v6, "IPv6", "account_prefixes_v6"),
        ] {
            if n <= max as usize {
                continue;
            }
            let message = if cut {
                format!(
                    "more {family} account prefixes than map {map} holds (--max-account-prefixes {max}; {n} in the first {} accounts, the others were not checked): raise --max-account-prefixes",
                    accounts.len()
                )
            } else {
                format!(
                    "{n} {family} account prefixes, more than map {map} holds (--max-account-prefixes {max}): raise --max-account-prefixes to {n} or more"
                )
            };
            self.no_room(map, "accounts[].prefixes", message);
        }
    }

    pub(super) fn global(&mut self, raw: RawGlobal) -> Global {
        self.extra::<RawGlobal>(raw.extra.as_slice(), "global");
        let mode = self
            .mode(raw.mode.as_ref(), || "global.mode".to_owned())
            .unwrap_or_default();
        let malformed = self
            .action(raw.malformed.as_ref(), || "global.malformed".to_owned())
            .unwrap_or(Action::Drop);
        let events_per_second = match raw.events_per_second {
            Some(eps) => {
                let at = self.at(&eps);
                self.integer(
                    eps.text(),
                    at,
                    "global.events_per_second",
                    0,
                    MAX_EVENTS_PER_SECOND,
                )
                .map_or(DEFAULT_EVENTS_PER_SECOND, |n| n as u32)
            }
            None => DEFAULT_EVENTS_PER_SECOND,
        };
        let lists = self.lists(
            raw.block.unwrap_or_default(),
            raw.allow.unwrap_or_default(),
            "global",
            mode,
        );
        Global {
            mode,
            malformed,
            events_per_second,
            lists,
        }
    }

    pub(super) fn account(
        &mut self,
        raw: RawAccount,
        path: &str,
        default_mode: Mode,
        default_limits: Option<DefaultLimits>,
    ) -> Account {
        self.extra::<RawAccount>(raw.extra.as_slice(), path);
        let (id, id_at) = if let Some(id) = &raw.id {
            let at = self.at(id);
            if let Err(msg) = check_name(id.text()) {
                self.issue(
                    at.clone(),
                    format!("{path}.id"),
                    format!("account id {} {msg}", quote(id.text())),
                );
            }
            (id.text().to_owned(), at)
        } else {
            self.issue(
                self.source.to_owned(),
                format!("{path}.id"),
                "the account has no id: give it one (letters, digits and - _ . : / @)",
            );
            (String::new(), self.source.to_owned())
        };
        let raw_prefixes = raw.prefixes.unwrap_or_default();
        if raw_prefixes.is_empty() {
            self.issue(id_at.clone(), format!("{path}.prefixes"), format!("account {} has no prefixes: list the addresses it owns on this host (e.g. 10.1.2.3/32)", quote(&id)));
        }
        let mut prefixes_v4 = Vec::new();
        let mut prefixes_v6 = Vec::new();
        // Repeats found by a scan of the handful of prefixes most accounts
        // have (a set each took an allocation), by a set past that.
        let mut seen: Option<HashSet<IpNet>> = (raw_prefixes.len() > 16).then(HashSet::new);
        for (j, p) in raw_prefixes.iter().enumerate() {
            match parse_cidr(p.text()) {
                Ok(net) => {
                    let repeated = match (&mut seen, net) {
                        (Some(seen), _) => !seen.insert(net),
                        (None, IpNet::V4(n)) => prefixes_v4.contains(&n),
                        (None, IpNet::V6(n)) => prefixes_v6.contains(&n),
                    };
                    if repeated {
                        let at = self.at(p);
                        self.issue(
                            at,
                            format!("{path}.prefixes[{j}]"),
                            format!("prefix {net} is listed twice"),
                        );
                        continue;
                    }
                    match net {
                        IpNet::V4(n) => prefixes_v4.push(n),
                        IpNet::V6(n) => prefixes_v6.push(n),
                    }
                }
                Err(msg) => {
                    let at = self.at(p);
                    self.issue(at, format!("{path}.prefixes[{j}]"), msg);
                }
            }
        }
        let mode = self
            .mode(raw.mode.as_deref(), || format!("{path}.mode"))
            .unwrap_or(default_mode);
        let lists = self.lists(
            raw.block.map(Vec::from).unwrap_or_default(),
            raw.allow.map(Vec::from).unwrap_or_default(),
            path,
            mode,
        );
        let (inbound, outbound) = if let Some(l) = &raw.limits {
            self.limits(l, &format!("{path}.limits"), mode)
        } else {
            let in_mode = |d: DirLimits| DirLimits {
                action: mode.apply(d.action),
                ..d
            };
            default_limits.map_or((None, None), |(i, o)| (i.map(in_mode), o.map(in_mode)))
        };
        // Exactly the room they need: filled one by one, an account's
        // handful of prefixes had room for four per family, 4 MB of a
        // 100,000-account policy (kept twice during a reload).
        prefixes_v4.shrink_to_fit();
        prefixes_v6.shrink_to_fit();
        let mut account = Account {
            id,
            mode,
            prefixes_v4,
            prefixes_v6,
            lists,
            inbound,
            outbound,
            fingerprint: Fingerprint::default(),
        };
        account.fingerprint = account.fingerprint_of();
        account
    }

    pub(super) fn limits(&mut self, raw: &RawLimits, path: &str, mode: Mode) -> DefaultLimits {
        self.extra::<RawLimits>(raw.extra.as_slice(), path);
        (
            raw.inbound
                .as_ref()
                .and_then(|d| self.dir_limits(d, &format!("{path}.inbound"), mode)),
            raw.outbound
                .as_ref()
                .and_then(|d| self.dir_limits(d, &format!("{path}.outbound"), mode)),
        )
    }

    pub(super) fn lists(
        &mut self,
        block: Vec<RawList>,
        allow: Vec<RawList>,
        scope: &str,
        mode: Mode,
    ) -> Vec<List> {
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for (field, raws) in [("block", block), ("allow", allow)] {
            for (i, raw) in raws.into_iter().enumerate() {
                let path = format!("{scope}.{field}[{i}]");
                self.extra::<RawList>(raw.extra.as_slice(), &path);
                let name = match &raw.name {
                    Some(n) => {
                        if let Err(msg) = check_name(n.text()) {
                            let at = self.at(n);
                            self.issue(
                                at,
                                format!("{path}.name"),
                                format!("list name {} {msg}", quote(n.text())),
                            );
                        }
                        n.text().to_owned()
                    }
                    None => format!("{scope}.{field}[{i}]"),
                };
                if !names.insert(name.clone()) {
                    let at = raw
                        .name
                        .as_ref()
                        .map_or_else(|| self.source.to_owned(), |n| self.at(n));
                    self.issue(
                        at,
                        format!("{path}.name"),
                        format!("list name {} is used twice in {scope}", quote(&name)),
                    );
                }
                let kind = if field == "block" {
                    let action = self
                        .action(raw.action.as_ref(), || format!("{path}.action"))
                        .unwrap_or(Action::Drop);
                    ListKind::Block(mode.apply(action))
                } else {
                    if let Some(a) = &raw.action {
                        let at = self.at(a);
                        self.issue(at, format!("{path}.action"), "allow lists take no action: they exempt addresses from the block lists of the same scope");
                    }
                    ListKind::Allow
                };
                let cidrs = raw.cidrs.unwrap_or_default();
                if cidrs.is_empty() && raw.file.is_none() {
                    let at = raw
                        .name
                        .as_ref()
                        .map_or_else(|| self.source.to_owned(), |n| self.at(n));
                    self.issue(
                        at,
                        path.clone(),
                        "the list is empty: give `cidrs`, a `file`, or both",
                    );
                }
                let mut v4 = Vec::new();
                let mut v6 = Vec::new();
                for (j, c) in cidrs.iter().enumerate() {
                    match parse_cidr(c.text()) {
                        Ok(IpNet::V4(n)) => v4.push(n),
                        Ok(IpNet::V6(n)) => v6.push(n),
                        Err(msg) => {
                            let at = self.at(c);
                            self.issue(at, format!("{path}.cidrs[{j}]"), msg);
                        }
                    }
                }
                if let Some(file) = &raw.file {
                    self.list_file(file, &format!("{path}.file"), &mut v4, &mut v6);
                }
                v4.sort_unstable();
                v4.dedup();
                v6.sort_unstable();
                v6.dedup();
                out.push(List { name, kind, v4, v6 });
            }
        }
        out
    }

    pub(super) fn list_file(
        &mut self,
        file: &At<Scalar>,
        path: &str,
        v4: &mut Vec<Ipv4Net>,
        v6: &mut Vec<Ipv6Net>,
    ) {
        let at = self.at(file);
        if !self.limits.list_files {
            self.issue(
                at,
                path,
                "this policy cannot name local files (a policy from a control plane must not make the agent read them): give the prefixes in `cidrs`",
            );
            return;
        }
        if file.text().len() > MAX_PATH_LEN {
            self.issue(
                at,
                path,
                format!(
                    "the path {} is longer than {MAX_PATH_LEN} bytes",
                    quote(file.text())
                ),
            );
            return;
        }
        let full: PathBuf = self.base_dir.join(file.text());
        let shown = escape_controls(&full.display().to_string()).into_owned();
        let left = self.limits.max_bytes.saturating_sub(self.reads.bytes);
        let text = match read_regular(&full, left) {
            Ok((text, stamp)) => {
                self.reads.bytes += text.len() as u64;
                self.reads.files.push((full.clone(), stamp));
                text
            }
            Err(err) => {
                let err = match err {
                    FileError::TooLarge { .. } => FileError::TooLarge {
                        left,
                        limit: self.limits.max_bytes,
                    },
                    FileError::Changed => {
                        self.reads.changed = true;
                        FileError::Changed
                    }
                    other => other,
                };
                self.issue(at, path, format!("cannot read list file {shown}: {err}"));
                return;
            }
        };
        let mut bad = 0usize;
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            match parse_cidr(entry) {
                Ok(IpNet::V4(net)) => v4.push(net),
                Ok(IpNet::V6(net)) => v6.push(net),
                Err(msg) => {
                    bad += 1;
                    // Report the first few of a broken feed, not a million lines.
                    if bad <= 10 {
                        // A line is quoted only if it could be a mistyped
                        // address: a `file:` naming a secret must not print it.
                        let msg = if address_shaped(entry) {
                            msg
                        } else {
                            "not an IP address or CIDR prefix (expected e.g. 10.0.0.0/8 or 2001:db8::/32; the line is not quoted: it does not look like an address)".to_owned()
                        };
                        self.issue(format!("{shown}:{}", n + 1), path, msg);
                    }
                }
            }
        }
        if bad > 10 {
            self.issue(
                shown,
                path,
                format!("{} more bad lines not shown", bad - 10),
            );
        }
    }

    pub(super) fn dir_limits(
        &mut self,
        raw: &RawDirLimits,
        path: &str,
        mode: Mode,
    ) -> Option<DirLimits> {
        self.extra::<RawDirLimits>(raw.extra.as_slice(), path);
        let pps = raw.pps().and_then(|r| {
            self.rate(
                r,
                raw.pps_burst(),
                (path, "pps"),
                (1, MAX_PPS),
                (1, MIN_DEFAULT_PPS_BURST),
            )
        });
        let bps = raw.bps().and_then(|r| {
            self.rate(
                r,
                raw.bps_burst(),
                (path, "bps"),
                (MIN_BPS, MAX_BPS),
                (8, MIN_DEFAULT_BPS_BURST),
            )
        });
        for (burst, rate, name) in [
            (raw.pps_burst(), raw.pps(), "pps"),
            (raw.bps_burst(), raw.bps(), "bps"),
        ] {
            if let (Some(b), None) = (burst, rate) {
                let at = self.at(b);
                self.issue(
                    at,
                    format!("{path}.{name}_burst"),
                    format!("{name}_burst without {name}: a burst needs a rate"),
                );
            }
        }
        let action = self
            .action(raw.action(), || format!("{path}.action"))
            .unwrap_or(Action::Drop);
        if pps.is_none() && bps.is_none() {
            return None;
        }
        Some(DirLimits {
            pps,
            bps,
            action: mode.apply(action),
        })
    }

    /// A rate within `range` at `path`.`name` and its burst (at
    /// `path`.`name`_burst), at least `min_burst` and at most an hour of the
    /// rate; by default [`DEFAULT_BURST_MILLIS`] of the rate, at least
    /// `default_floor`.
    pub(super) fn rate(
        &mut self,
        rate: &At<Scalar>,
        burst: Option<&At<Scalar>>,
        (path, name): (&str, &str),
        (min, max): (u64, u64),
        (min_burst, default_floor): (u64, u64),
    ) -> Option<Rate> {
        let rate = self.quantity(rate, || format!("{path}.{name}"), min, max)?;
        let burst = match burst {
            Some(b) => self.quantity(
                b,
                || format!("{path}.{name}_burst"),
                min_burst,
                rate.saturating_mul(MAX_BURST_SECONDS),
            )?,
            None => default_burst(rate, default_floor),
        };
        Some(Rate { rate, burst })
    }

    /// A quantity within `min..=max`, or a problem at `path()` (made only
    /// then, as its location: a policy has hundreds of thousands of them).
    pub(super) fn quantity(
        &mut self,
        raw: &At<Scalar>,
        path: impl FnOnce() -> String,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        match parse_quantity(raw.text()) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(n) => {
                let at = self.at(raw);
                self.issue(
                    at,
                    path(),
                    format!(
                        "{} = {n} is out of range: it must be between {min} and {max}",
                        quote(raw.text())
                    ),
                );
                None
            }
            Err(msg) => {
                let at = self.at(raw);
                self.issue(at, path(), msg);
                None
            }
        }
    }

    pub(super) fn integer(
        &mut self,
        text: &str,
        at: String,
        path: &str,
        min: u64,
        max: u64,
    ) -> Option<u64> {
        match text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.issue(
                    at,
                    path,
                    format!(
                        "{} is not a whole number between {min} and {max}",
                        quote(text)
                    ),
                );
                None
            }
        }
    }
}

/// The burst of a rate that was given none: [`DEFAULT_BURST_MILLIS`] of
/// it, at least `floor`.
#[must_use]
pub fn default_burst(rate: u64, floor: u64) -> u64 {
    let burst = u128::from(rate) * u128::from(DEFAULT_BURST_MILLIS) / 1000;
    u64::try_from(burst).unwrap_or(u64::MAX).max(floor)
}
