//! `--policy-dir`: every policy file of a directory, merged into one policy.
//!
//! The rules (the README's "Policy directory" says them for operators):
//! - The files are the `*.yaml`, `*.yml` and `*.json` entries of the
//!   directory itself (not of its subdirectories), read in name order.
//!   Names starting with `.` are skipped: Kubernetes keeps its `..data` link
//!   and the timestamped directories behind it there, editors their swap
//!   files. Symbolic links are followed (a mounted `ConfigMap`'s files are
//!   links through `..data`); an entry that is not a regular file is
//!   refused like any other policy file.
//! - Each file is validated on its own, so its problems name it, its lines
//!   and columns; its `defaults` apply to its own accounts (a file with
//!   `defaults` and no accounts is a problem: they would apply to nothing).
//! - Accounts and global lists are those of all the files. An account id, an
//!   account prefix or a global list name in two files is a problem naming
//!   both.
//! - `version`, `global.mode`, `global.malformed` and
//!   `global.events_per_second` may be given in any number of files, with
//!   one value: two values are a problem naming both files. `global.mode`
//!   applies to the global lists of every file.
//! - One `--max-policy-bytes` budget holds for all the files and the list
//!   files they name.
//! - A directory with no policy file is refused (the running policy stays):
//!   a `ConfigMap` mounted empty, or a directory emptied by mistake, does not
//!   lift every rule.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::{
    Account, Action, DEFAULT_EVENTS_PER_SECOND, FastMap, FileRead, Global, Ids, Issue, ListKind,
    Mode, Owners, Policy, PolicyError, ReadLimits, quote,
};
use crate::sink::escape_controls;

/// Where `mmesh-agent run` reads its policy, locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// `--policy FILE`.
    File(PathBuf),
    /// `--policy-dir DIR`: every policy file in it, merged.
    Dir(PathBuf),
}

impl Source {
    /// A directory read as `--policy-dir`, anything else as a policy file
    /// (`mmesh-agent policy validate PATH`).
    #[must_use]
    pub fn of_path(path: &Path) -> Self {
        if path.is_dir() {
            Self::Dir(path.to_owned())
        } else {
            Self::File(path.to_owned())
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        match self {
            Self::File(p) | Self::Dir(p) => p,
        }
    }

    /// Reads and validates the policy within `limits` (blocks: see
    /// [`Policy::from_file_with`]).
    pub fn read(&self, limits: &ReadLimits) -> Result<Policy, PolicyError> {
        match self {
            Self::File(path) => Policy::from_file_with(path, limits),
            Self::Dir(dir) => Policy::from_dir_with(dir, limits),
        }
    }
}

/// Whether an entry named `name` of a policy directory is one of its policy
/// files.
#[must_use]
pub fn is_policy_file(name: &OsStr) -> bool {
    !name.as_encoded_bytes().starts_with(b".")
        && Path::new(name)
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
}

/// The policy files of `dir`, in name order.
fn policy_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if is_policy_file(&entry.file_name()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

impl Policy {
    /// Reads every policy file of `dir` and merges them into one policy
    /// (the rules: this module's documentation), within `limits` for all of
    /// them together.
    pub fn from_dir_with(dir: &Path, limits: &ReadLimits) -> Result<Self, PolicyError> {
        Self::from_dir_waiting(dir, limits, &mut std::thread::sleep)
    }

    fn from_dir_waiting(
        dir: &Path,
        limits: &ReadLimits,
        wait: &mut dyn FnMut(Duration),
    ) -> Result<Self, PolicyError> {
        let shown = escape_controls(&dir.display().to_string()).into_owned();
        let files = policy_files(dir).map_err(|source| PolicyError::Dir {
            path: shown.clone(),
            source,
        })?;
        if files.is_empty() {
            return Err(PolicyError::NoFiles { path: shown });
        }
        let mut used = 0;
        let mut reads = Vec::with_capacity(files.len());
        let mut issues = Vec::new();
        for file in &files {
            match Self::read_settled(file, limits, used, wait) {
                Ok(read) => {
                    used += read.bytes;
                    reads.push((file.as_path(), read));
                }
                // Every file's problems, in one answer.
                Err(PolicyError::Invalid { issues: more, .. }) => issues.extend(more),
                Err(other) => return Err(other),
            }
        }
        let policy = merge(&shown, reads, &mut issues);
        if issues.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError::Invalid {
                source_name: shown,
                issues,
            })
        }
    }
}

/// A setting several files may give, with the file that gave it first.
struct Agreed<T> {
    field: &'static str,
    value: Option<(T, String)>,
}

impl<T: PartialEq> Agreed<T> {
    const fn new(field: &'static str) -> Self {
        Self { field, value: None }
    }

    /// Takes `value` from `file`, or reports that an earlier file said
    /// otherwise.
    fn give(&mut self, value: T, file: &str, show: impl Fn(&T) -> String, issues: &mut Vec<Issue>) {
        match &self.value {
            None => self.value = Some((value, file.to_owned())),
            Some((first, _)) if *first == value => {}
            Some((first, from)) => issues.push(Issue {
                location: file.to_owned(),
                path: self.field.to_owned(),
                full: None,
                message: format!(
                    "{} here, but {} in {from}: give {} one value, in one file of the directory",
                    show(&value),
                    show(first),
                    self.field
                ),
            }),
        }
    }

    fn get(self) -> Option<T> {
        self.value.map(|(v, _)| v)
    }
}

fn word<T: PartialEq>(words: &[(&str, T)], value: &T) -> String {
    words
        .iter()
        .find(|(_, v)| v == value)
        .map_or_else(String::new, |(w, _)| (*w).to_owned())
}

/// Merges the files' policies, in name order; conflicts go to `issues`.
fn merge(source: &str, reads: Vec<(&Path, FileRead)>, issues: &mut Vec<Issue>) -> Policy {
    let mut version = Agreed::<String>::new("version");
    let mut mode = Agreed::<Mode>::new("global.mode");
    let mut malformed = Agreed::<Action>::new("global.malformed");
    let mut events = Agreed::<u32>::new("global.events_per_second");
    let mut lists = Vec::new();
    // Each name, id and prefix with the file (and account) it came from.
    let mut list_names: FastMap<String, String> = FastMap::default();
    let mut accounts = Accounts::with_room_for(reads.iter().flat_map(|(_, r)| &r.policy.accounts));
    let names: Vec<String> = reads
        .iter()
        .map(|(p, _)| escape_controls(&p.display().to_string()).into_owned())
        .collect();
    for (index, (path, read)) in reads.into_iter().enumerate() {
        let file = &names[index];
        let FileRead {
            policy, settings, ..
        } = read;
        if let Some(v) = policy.version {
            version.give(v, file, |v| quote(v), issues);
        }
        if settings.mode {
            mode.give(policy.global.mode, file, |m| word(Mode::WORDS, m), issues);
        }
        if settings.malformed {
            malformed.give(
                policy.global.malformed,
                file,
                |a| word(Action::WORDS, a),
                issues,
            );
        }
        if settings.events_per_second {
            events.give(
                policy.global.events_per_second,
                file,
                ToString::to_string,
                issues,
            );
        }
        if settings.defaults && policy.accounts.is_empty() {
            issues.push(Issue {
                location: file.clone(),
                path: "defaults".to_owned(),
                full: None,
                message: "a file's defaults apply to the accounts of that file, and this one has none: move them into the files that hold the accounts".to_owned(),
            });
        }
        for mut list in policy.global.lists {
            // An unnamed list is called by its place in its file
            // (`global.block[0]`, never a valid name): the file tells two
            // such places apart.
            if list.name.contains('[') {
                let base = path.file_name().unwrap_or_default().to_string_lossy();
                list.name = format!("{base}:{}", list.name);
            }
            if let Some(other) = list_names.get(&list.name) {
                issues.push(Issue {
                    location: file.clone(),
                    path: "global".to_owned(),
                    full: None,
                    message: format!(
                        "global list name {} is also used in {other}: list names must be unique across the files of the directory",
                        quote(&list.name)
                    ),
                });
                continue;
            }
            list_names.insert(list.name.clone(), file.clone());
            lists.push(list);
        }
        accounts.add(policy.accounts, index, &names, issues);
    }
    let mode = mode.get().unwrap_or_default();
    // Each file's lists were validated under its own (unset) mode.
    for list in &mut lists {
        if let ListKind::Block(action) = list.kind {
            list.kind = ListKind::Block(mode.apply(action));
        }
    }
    Policy {
        source: source.to_owned(),
        version: version.get(),
        global: Global {
            mode,
            malformed: malformed.get().unwrap_or(Action::Drop),
            events_per_second: events.get().unwrap_or(DEFAULT_EVENTS_PER_SECOND),
            lists,
        },
        accounts: accounts.all,
    }
}

/// The accounts of the files merged so far.
struct Accounts {
    all: Vec<Arc<Account>>,
    /// The index of the file of each account.
    files: Vec<usize>,
    /// The index in `all` of each id and of the owner of each prefix.
    ids: Ids,
    owners: Owners,
}

impl Accounts {
    /// Room for `accounts`.
    fn with_room_for<'a>(accounts: impl Iterator<Item = &'a Arc<Account>>) -> Self {
        let (n, v4, v6) = accounts.fold((0, 0, 0), |(n, v4, v6), a| {
            (n + 1, v4 + a.prefixes_v4.len(), v6 + a.prefixes_v6.len())
        });
        Self {
            all: Vec::with_capacity(n),
            files: Vec::with_capacity(n),
            ids: Ids::with_capacity(n),
            owners: Owners::with_capacity(v4, v6),
        }
    }

    /// Adds the accounts of file `file` (of `names`); an id or a prefix
    /// taken by an earlier file is a problem naming it.
    fn add(
        &mut self,
        accounts: Vec<Arc<Account>>,
        file: usize,
        names: &[String],
        issues: &mut Vec<Issue>,
    ) {
        let here = &names[file];
        for (i, account) in accounts.into_iter().enumerate() {
            if let Some(other) = self.ids.get(&account.id, &self.all) {
                issues.push(Issue {
                    location: here.clone(),
                    path: format!("accounts[{i}].id"),
                    full: None,
                    message: format!(
                        "account id {} is also used in {}: ids must be unique across the files of the directory",
                        quote(&account.id),
                        names[self.files[other]]
                    ),
                });
                continue;
            }
            // In place first: the indexes compare through the accounts.
            let at = self.all.len();
            self.all.push(account);
            self.files.push(file);
            self.ids.insert(at, &self.all);
            let (all, files) = (&self.all, &self.files);
            self.owners.claim(at, all, |net, owner| {
                issues.push(Issue {
                    location: here.clone(),
                    path: format!("accounts[{i}].prefixes"),
                    full: None,
                    message: format!(
                        "prefix {net} is also owned by account {} in {}; an address belongs to one account",
                        quote(&all[owner].id),
                        names[files[owner]]
                    ),
                });
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of policy files, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str, files: &[(&str, &str)]) -> Self {
            let dir = std::env::temp_dir().join(format!("mmesh-dir-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
            Self(dir)
        }

        fn read(&self) -> Result<Policy, PolicyError> {
            Policy::from_dir_with(&self.0, &ReadLimits::default())
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn problems(result: Result<Policy, PolicyError>) -> String {
        match result {
            Err(err) => err.to_string(),
            Ok(p) => panic!("accepted: {p:?}"),
        }
    }

    #[test]
    fn files_merge_in_name_order() {
        let dir = Dir::new(
            "merge",
            &[
                (
                    "b.yaml",
                    "defaults: { limits: { outbound: { pps: 100 } } }\naccounts:\n  - { id: b, prefixes: [10.0.0.2/32] }\n",
                ),
                (
                    "a.json",
                    r#"{"version": "7", "global": {"mode": "monitor", "block": [{"name": "bad", "cidrs": ["192.0.2.0/24"]}]}, "accounts": [{"id": "a", "prefixes": ["10.0.0.1/32"]}]}"#,
                ),
                (
                    "c.yml",
                    "version: '7'\nglobal:\n  block:\n    - cidrs: [198.51.100.0/24]\n",
                ),
                // Not policy files: skipped.
                (".hidden.yaml", "not: [valid"),
                ("notes.txt", "not: [valid"),
                ("policy.yaml.swp", "not: [valid"),
            ],
        );
        std::fs::create_dir(dir.0.join("..2026_11_30_08_00_00.1")).unwrap();
        let p = dir.read().unwrap();
        assert_eq!(p.version.as_deref(), Some("7"));
        assert_eq!(p.global.mode, Mode::Monitor);
        let ids: Vec<&str> = p.accounts.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(
            p.accounts[0].outbound.is_none(),
            "b.yaml's defaults are b.yaml's"
        );
        assert_eq!(p.accounts[1].outbound.unwrap().pps.unwrap().rate, 100);
        let lists: Vec<(&str, ListKind)> = p
            .global
            .lists
            .iter()
            .map(|l| (l.name.as_str(), l.kind))
            .collect();
        // a.json's monitor mode holds for c.yml's list too.
        assert_eq!(
            lists,
            [
                ("bad", ListKind::Block(Action::Monitor)),
                ("c.yml:global.block[0]", ListKind::Block(Action::Monitor))
            ]
        );
    }

    #[test]
    fn conflicts_name_both_files() {
        let dir = Dir::new(
            "conflicts",
            &[
                (
                    "1.yaml",
                    "version: one\nglobal:\n  events_per_second: 5\n  block: [{ name: x, cidrs: [192.0.2.0/24] }]\naccounts:\n  - { id: a, prefixes: [10.0.0.1/32] }\n",
                ),
                (
                    "2.yaml",
                    "version: two\nglobal:\n  events_per_second: 5\n  malformed: monitor\n  block: [{ name: x, cidrs: [192.0.2.0/24] }]\naccounts:\n  - { id: a, prefixes: [10.0.0.9/32] }\n  - { id: b, prefixes: [10.0.0.1/32] }\n",
                ),
                (
                    "3.yaml",
                    "global: { malformed: drop }\ndefaults: { mode: monitor }\n",
                ),
            ],
        );
        let text = problems(dir.read());
        let one = dir.0.join("1.yaml").display().to_string();
        let two = dir.0.join("2.yaml").display().to_string();
        let three = dir.0.join("3.yaml").display().to_string();
        for expected in [
            format!("{two}: version: \"two\" here, but \"one\" in {one}"),
            format!("{two}: global: global list name \"x\" is also used in {one}"),
            format!("{two}: accounts[0].id: account id \"a\" is also used in {one}"),
            format!(
                "{two}: accounts[1].prefixes: prefix 10.0.0.1/32 is also owned by account \"a\" in {one}"
            ),
            format!("{three}: global.malformed: drop here, but monitor in {two}"),
            format!("{three}: defaults: a file's defaults apply to the accounts of that file"),
        ] {
            assert!(text.contains(&expected), "{expected}\nnot in:\n{text}");
        }
        assert!(
            !text.contains("events_per_second"),
            "equal values agree:\n{text}"
        );
        assert!(text.contains("(6 problems)"), "{text}");
    }

    #[test]
    fn every_files_problems_and_an_empty_directory() {
        let dir = Dir::new(
            "bad",
            &[
                (
                    "a.yaml",
                    "accounts:\n  - { id: a, prefixes: [10.0.0.1/33] }\n",
                ),
                ("b.yaml", "global: { mode: loud }\n"),
            ],
        );
        let text = problems(dir.read());
        assert!(text.contains("a.yaml:2:"), "{text}");
        assert!(
            text.contains("b.yaml:1:") && text.contains("global.mode"),
            "{text}"
        );
        let empty = Dir::new("empty", &[("README", "nothing")]);
        assert!(problems(empty.read()).contains("holds no policy file"));
        let missing = problems(Policy::from_dir_with(
            &empty.0.join("nope"),
            &ReadLimits::default(),
        ));
        assert!(
            missing.contains("cannot list policy directory"),
            "{missing}"
        );
    }

    #[test]
    fn one_byte_budget_for_all_files() {
        let account = "accounts:\n  - { id: a, prefixes: [10.0.0.1/32] }\n";
        let other = "accounts:\n  - { id: b, prefixes: [10.0.0.2/32] }\n";
        let dir = Dir::new("budget", &[("a.yaml", account), ("b.yaml", other)]);
        let limits = ReadLimits {
            max_bytes: (account.len() + other.len() - 1) as u64,
            ..ReadLimits::default()
        };
        let text = problems(Policy::from_dir_with(&dir.0, &limits));
        assert!(
            text.contains("b.yaml") && text.contains("larger than the"),
            "{text}"
        );
        let limits = ReadLimits {
            max_bytes: (account.len() + other.len()) as u64,
            ..ReadLimits::default()
        };
        assert_eq!(
            Policy::from_dir_with(&dir.0, &limits)
                .unwrap()
                .accounts
                .len(),
            2
        );
    }
}
