//! The pinned datapath: maps and links on bpffs, so that enforcement
//! outlives the agent (SIGTERM, kill -9, a panic, an upgrade).
//!
//! Layout under the pin directory (`--bpffs`): `maps/NAME` for every map of
//! the object, `links/IFNAME:IFINDEX:{receive,transmit}` for every link, and
//! three maps of the agent's own ([`pins::AGENT`]: pin format, build
//! identity and the highest generation written; [`pins::SLOT_IDS`]: which
//! account holds which slot; [`pins::LAYOUTS`]: the layout version of each
//! pinned map). bpffs holds no plain files, hence the maps. The directory
//! itself is the lock: one agent at a time holds `flock` on it.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use mmesh_common::maps::pins;

use super::{DatapathError, error::is_permission, load::EBPF_OBJECT};
use crate::{batch, sys};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What [`pins::AGENT`] holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AgentRecord {
    /// [`pins::FORMAT`].
    format: u32,
    /// 1: the standby half holds the same policy as the active one, of
    /// `generation` (written once `sync_standby` finished, cleared before
    /// every apply writes into the standby half): an adopting agent then
    /// reads only the active half back.
    standby: u32,
    build: u64,
    /// The highest policy generation ever written (before it was flipped
    /// in): a recreated `CONFIG` starts from it, so that no generation that
    /// flow-cache entries or events carry is used again.
    generation: u64,
}

// SAFETY: repr(C), plain integers, no padding.
unsafe impl aya::Pod for AgentRecord {}

/// Key of [`pins::LAYOUTS`]: a map name, zero-padded.
type LayoutKey = [u8; 16];

fn layout_key(name: &str) -> LayoutKey {
    let mut key = [0u8; 16];
    let n = name.len().min(16);
    key[..n].copy_from_slice(&name.as_bytes()[..n]);
    key
}

/// What a map must be for this agent to reuse a pinned one: the shape the
/// object declares, the size the capacities give, the layout version.
#[derive(Clone, Copy, Debug)]
pub(super) struct MapShape {
    pub(super) name: &'static str,
    pub(super) map_type: aya::maps::MapType,
    pub(super) key: u32,
    pub(super) value: u32,
    pub(super) flags: u32,
    pub(super) entries: u32,
    pub(super) version: u32,
}

/// What becomes of one map of the object in a pinned datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum MapPlan {
    /// The pinned map is this agent's: reused with its contents.
    Reuse,
    /// Nothing pinned under the name: created and pinned.
    Create,
    /// The pinned map is of another layout or size: a new one is created
    /// and pinned in its place once the programs are loaded (the running
    /// programs keep the old one until the links get the new programs).
    Recreate { why: String },
}

/// The identity of this agent's eBPF object: a hash of its bytes.
#[must_use]
pub fn build_identity() -> u64 {
    xxhash_rust::xxh3::xxh3_64(EBPF_OBJECT)
}

/// Makes `dir` a directory on bpffs: creates it, mounting bpffs first when
/// the directory would not be on one (at `/sys/fs/bpf` when `dir` is below
/// it, else on `dir` itself). Needs `CAP_SYS_ADMIN` when it mounts: the
/// agent calls it before it drops its capabilities (and before logging
/// starts: it returns where it mounted bpffs, if it did, for the log).
pub fn prepare(dir: &Path) -> Result<Option<PathBuf>, DatapathError> {
    let fail = |source: io::Error| DatapathError::Bpffs {
        dir: dir.to_owned(),
        source,
    };
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let mut mounted = None;
    if !is_bpffs(existing).map_err(fail)? {
        let mount_at = if dir.starts_with("/sys/fs/bpf") && existing == Path::new("/sys/fs/bpf") {
            PathBuf::from("/sys/fs/bpf")
        } else {
            std::fs::create_dir_all(dir).map_err(fail)?;
            dir.to_owned()
        };
        mount_bpffs(&mount_at).map_err(fail)?;
        mounted = Some(mount_at);
    }
    for sub in [dir.to_owned(), dir.join(pins::MAPS), dir.join(pins::LINKS)] {
        std::fs::create_dir_all(&sub).map_err(fail)?;
    }
    Ok(mounted)
}

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed statfs filled in by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and struct.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(at.as_os_str()))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Holds the lock of a pin directory for as long as it lives.
fn lock(dir: &Path) -> Result<File, DatapathError> {
    let file = File::open(dir).map_err(|source| DatapathError::Bpffs {
        dir: dir.to_owned(),
        source,
    })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DatapathError::Locked {
                dir: dir.to_owned(),
            });
        }
        return Err(DatapathError::Bpffs {
            dir: dir.to_owned(),
            source: err,
        });
    }
    Ok(file)
}

/// A locked pin directory, and the agent's own pinned maps.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    _lock: File,
    agent: MapData,
    slot_ids: MapData,
    layouts: MapData,
    /// The record of the agent that made the pins, when there were pins to
    /// adopt.
    adopted: Option<AgentRecord>,
}

impl Pins {
    /// Locks `dir` (made ready by [`prepare`]) and opens or creates the
    /// agent's own maps; `slots` is the number of account slots. A pin
    /// directory of another format, or made with another `--max-accounts`,
    /// is refused.
    pub fn open(dir: &Path, slots: u32) -> Result<Self, DatapathError> {
        let lock = lock(dir)?;
        let agent_path = dir.join(pins::AGENT);
        let layouts_path = dir.join(pins::LAYOUTS);
        let (agent, adopted) = if agent_path.exists() {
            let agent = open_map(&agent_path)?;
            let found = read_record(&agent, &agent_path)?;
            if found.format != pins::FORMAT {
                return Err(DatapathError::PinnedMismatch {
                    dir: dir.to_owned(),
                    what: format!(
                        "its agent record {} is of pin format {}, this agent reads format {}",
                        agent_path.display(),
                        found.format,
                        pins::FORMAT
                    ),
                });
            }
            (agent, Some(found))
        } else {
            // Made before the record: a record always has its layouts
            // beside it.
            if !layouts_path.exists() {
                create_layouts(&layouts_path)?;
            }
            let agent = create_map(
                &agent_path,
                sys::BPF_MAP_TYPE_ARRAY,
                4,
                size_of::<AgentRecord>(),
                1,
                b"mmesh_agent",
            )?;
            // Stamped at once: a record of zeroes would read as another
            // pin format to the next agent if this one died here.
            write_record(&agent, &agent_path, 0, false)?;
            (agent, None)
        };
        let layouts = if layouts_path.exists() {
            let map = open_map(&layouts_path)?;
            check_sizes(&map, &layouts_path, 16, 4, LAYOUT_ENTRIES)?;
            map
        } else {
            // An agent died between the two: no map's layout is known, so
            // every map is recreated.
            create_layouts(&layouts_path)?
        };
        let ids_path = dir.join(pins::SLOT_IDS);
        let slot_ids = if ids_path.exists() {
            let map = open_map(&ids_path)?;
            let entries = map
                .info()
                .map_err(|e| pin_error(&ids_path, io::Error::other(e)))?
                .max_entries();
            // Not recreated like the object's maps: the slots, and with
            // them every account's counters and rate-limit state, would
            // have to be numbered again.
            if entries != slots {
                return Err(DatapathError::PinnedMismatch {
                    dir: dir.to_owned(),
                    what: format!(
                        "it was created with --max-accounts {}, this agent runs with --max-accounts {}: start it with the options the pinned datapath was created with",
                        entries.saturating_sub(1),
                        slots - 1
                    ),
                });
            }
            check_sizes(&map, &ids_path, 4, 16, slots)?;
            map
        } else {
            create_map(
                &ids_path,
                sys::BPF_MAP_TYPE_ARRAY,
                4,
                16,
                slots,
                b"mmesh_slot_ids",
            )?
        };
        let pins = Self {
            dir: dir.to_owned(),
            _lock: lock,
            agent,
            slot_ids,
            layouts,
            adopted,
        };
        Ok(pins)
    }

    /// Records this agent's pin format and build identity, `generation` as
    /// the highest generation written so far, and whether the standby half
    /// holds the same policy as the active one (of `generation`).
    pub(super) fn stamp(&self, generation: u64, standby_synced: bool) -> Result<(), DatapathError> {
        write_record(
            &self.agent,
            &self.dir.join(pins::AGENT),
            generation,
            standby_synced,
        )
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The build identity of the agent whose pins were adopted; `None` when
    /// the pins were new.
    #[must_use]
    pub fn adopted(&self) -> Option<u64> {
        self.adopted.map(|r| r.build)
    }

    /// The highest generation the adopted pins record (0 when new).
    pub(super) fn generation_floor(&self) -> u64 {
        self.adopted.map_or(0, |r| r.generation)
    }

    /// The generation whose policy both halves of the adopted maps hold,
    /// when the agent that made them recorded so.
    pub(super) fn standby_synced_at(&self) -> Option<u64> {
        self.adopted
            .filter(|r| r.standby == 1)
            .map(|r| r.generation)
    }

    pub(super) fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(pins::MAPS).join(name)
    }

    /// Decides for every map of `shapes` whether the pinned one is reused,
    /// recreated or created. Refused, naming what differs: a pinned map
    /// this agent does not know, and one that claims this agent's layout
    /// version but is of another type, key or value size or flags.
    pub(super) fn plan(&self, shapes: &[MapShape]) -> Result<Vec<MapPlan>, DatapathError> {
        let refuse = |what: String| DatapathError::PinnedMismatch {
            dir: self.dir.clone(),
            what,
        };
        for path in list(&self.dir.join(pins::MAPS)) {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !shapes.iter().any(|s| s.name == name) {
                return Err(refuse(format!(
                    "it holds map {name}, which this agent does not know (pinned by another mmesh-agent version)"
                )));
            }
        }
        let versions: HashMap<LayoutKey, u32> = batch::lookup_all(&self.layouts)
            .map_err(|source| pin_error(&self.dir.join(pins::LAYOUTS), source))?
            .into_iter()
            .collect();
        let mut plans = Vec::with_capacity(shapes.len());
        for shape in shapes {
            let path = self.map_path(shape.name);
            if !path.exists() {
                plans.push(MapPlan::Create);
                continue;
            }
            let info =
                MapInfo::from_pin(&path).map_err(|e| pin_error(&path, io::Error::other(e)))?;
            let found_type = info
                .map_type()
                .map_err(|e| pin_error(&path, io::Error::other(e)))?;
            let same_shape = found_type == shape.map_type
                && info.key_size() == shape.key
                && info.value_size() == shape.value
                && info.map_flags() == shape.flags;
            let plan = match versions.get(&layout_key(shape.name)) {
                None => MapPlan::Recreate {
                    why: "no layout version recorded".to_owned(),
                },
                Some(&v) if v != shape.version => MapPlan::Recreate {
                    why: format!("layout version {v}, this agent's is {}", shape.version),
                },
                Some(_) if !same_shape => {
                    return Err(refuse(format!(
                        "map {} claims layout version {} (this agent's) but is a {found_type:?} map with keys of {} and values of {} bytes and flags {:#x}; this agent's is a {:?} map with keys of {} and values of {} bytes and flags {:#x}",
                        shape.name,
                        shape.version,
                        info.key_size(),
                        info.value_size(),
                        info.map_flags(),
                        shape.map_type,
                        shape.key,
                        shape.value,
                        shape.flags
                    )));
                }
                Some(_) if info.max_entries() != shape.entries => MapPlan::Recreate {
                    why: format!(
                        "{} entries, this agent's capacity options ask for {}",
                        info.max_entries(),
                        shape.entries
                    ),
                },
                Some(_) => MapPlan::Reuse,
            };
            plans.push(plan);
        }
        Ok(plans)
    }

    /// Records the layout versions of the pinned maps.
    pub(super) fn record_layouts(&self, shapes: &[MapShape]) -> Result<(), DatapathError> {
        let keys: Vec<LayoutKey> = shapes.iter().map(|s| layout_key(s.name)).collect();
        let versions: Vec<u32> = shapes.iter().map(|s| s.version).collect();
        batch::update(&self.layouts, &keys, &versions)
            .map_err(|source| pin_error(&self.dir.join(pins::LAYOUTS), source))
    }

    pub(super) fn link_path(&self, interface: &str, ifindex: u32, side: &str) -> PathBuf {
        self.dir
            .join(pins::LINKS)
            .join(format!("{}:{ifindex}:{side}", encode(interface)))
    }

    /// The pin of mmesh's clsact filter on `side` of a device (before TCX).
    pub(super) fn filter_path(&self, interface: &str, ifindex: u32, side: &str) -> PathBuf {
        self.link_path(interface, ifindex, &format!("{side}:{}", pins::FILTER))
    }

    /// The pin saying that an agent added the device's clsact qdisc.
    pub(super) fn qdisc_path(&self, interface: &str, ifindex: u32) -> PathBuf {
        self.link_path(interface, ifindex, pins::QDISC)
    }

    /// The pinned links (and, before TCX, filters and qdiscs), in the order
    /// to release them in ([`release_order`]).
    pub(super) fn link_pins(&self) -> Vec<PathBuf> {
        release_order(list(&self.dir.join(pins::LINKS)))
    }

    /// Slot by account key ([`crate::compile::account_key`]) of the accounts
    /// the pinned maps hold.
    pub fn held_slots(&self) -> Result<HashMap<u128, u32>, DatapathError> {
        let ids = batch::lookup_all::<u32, u128>(&self.slot_ids)
            .map_err(|source| pin_error(&self.dir.join(pins::SLOT_IDS), source))?;
        Ok(ids
            .into_iter()
            .filter(|(slot, id)| *slot != 0 && *id != 0)
            .map(|(slot, id)| (id, slot))
            .collect())
    }

    /// Records which account (key; 0: none) holds each of `slots`.
    pub(super) fn set_slot_ids(&self, slots: &[u32], ids: &[u128]) -> Result<(), DatapathError> {
        batch::update(&self.slot_ids, slots, ids)
            .map_err(|source| pin_error(&self.dir.join(pins::SLOT_IDS), source))
    }
}

/// Entries of [`pins::LAYOUTS`]: room for the maps of later versions.
const LAYOUT_ENTRIES: u32 = 64;

/// An interface name as a bpffs file name: bpffs refuses dots (reserved),
/// which interface names may hold (`eth0.100`); `%` and `.` are escaped.
/// `:` separates the parts of a link pin's name (no interface name has one).
fn encode(interface: &str) -> String {
    interface.replace('%', "%25").replace('.', "%2e")
}

fn decode(name: &str) -> String {
    name.replace("%2e", ".").replace("%25", "%")
}

/// The interface of a link pin's file name.
pub(super) fn pin_interface(name: &str) -> String {
    decode(name.split(':').next().unwrap_or_default())
}

fn read_record(agent: &MapData, path: &Path) -> Result<AgentRecord, DatapathError> {
    check_sizes(agent, path, 4, size_of::<AgentRecord>(), 1)?;
    let mut found = AgentRecord::default();
    let key = 0u32;
    // SAFETY: the array's key is a u32 and its value an AgentRecord (the
    // sizes were checked).
    unsafe {
        sys::map_lookup_elem(
            agent.fd().as_fd(),
            std::ptr::from_ref(&key).cast(),
            std::ptr::from_mut(&mut found).cast(),
        )
    }
    .map_err(|source| pin_error(path, source))?;
    Ok(found)
}

fn create_layouts(path: &Path) -> Result<MapData, DatapathError> {
    create_map(
        path,
        sys::BPF_MAP_TYPE_HASH,
        16,
        4,
        LAYOUT_ENTRIES,
        b"mmesh_layouts",
    )
}

fn write_record(
    agent: &MapData,
    path: &Path,
    generation: u64,
    standby_synced: bool,
) -> Result<(), DatapathError> {
    let record = AgentRecord {
        format: pins::FORMAT,
        standby: u32::from(standby_synced),
        build: build_identity(),
        generation,
    };
    batch::update(agent, &[0u32], &[record]).map_err(|source| pin_error(path, source))
}

fn pin_error(path: &Path, source: io::Error) -> DatapathError {
    // Reading the pins is the first bpf(2) call of a pinned start: EPERM
    // here is a missing CAP_BPF, and the message says what to grant.
    if is_permission(&source) {
        return DatapathError::Permission {
            doing: format!("opening pinned object {}", path.display()),
        };
    }
    DatapathError::Pin {
        path: path.to_owned(),
        source,
    }
}

fn open_map(path: &Path) -> Result<MapData, DatapathError> {
    let fd = sys::obj_get(path).map_err(|source| pin_error(path, source))?;
    MapData::from_fd(fd).map_err(|e| pin_error(path, io::Error::other(e)))
}

fn check_sizes(
    map: &MapData,
    path: &Path,
    key: u32,
    value: usize,
    entries: u32,
) -> Result<(), DatapathError> {
    let info = map
        .info()
        .map_err(|e| pin_error(path, io::Error::other(e)))?;
    if info.key_size() != key || info.value_size() as usize != value {
        return Err(DatapathError::PinnedMismatch {
            dir: path.to_owned(),
            what: format!(
                "{} has keys of {} and values of {} bytes, this agent expects {key} and {value}",
                path.display(),
                info.key_size(),
                info.value_size()
            ),
        });
    }
    if info.max_entries() != entries {
        return Err(DatapathError::PinnedMismatch {
            dir: path.to_owned(),
            what: format!(
                "{} holds {} entries, this agent's options ask for {entries}",
                path.display(),
                info.max_entries()
            ),
        });
    }
    Ok(())
}

fn create_map(
    path: &Path,
    map_type: u32,
    key: u32,
    value: usize,
    entries: u32,
    name: &[u8],
) -> Result<MapData, DatapathError> {
    let fd = sys::map_create(map_type, key, value as u32, entries, None, name)
        .map_err(|source| pin_error(path, source))?;
    sys::obj_pin(fd.as_fd(), path).map_err(|source| pin_error(path, source))?;
    MapData::from_fd(fd).map_err(|e| pin_error(path, io::Error::other(e)))
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Pins of the `links` directory with the qdisc pins last: deleting a
/// device's clsact qdisc first would take its filters along, and deleting
/// those then fails.
fn release_order(mut links: Vec<PathBuf>) -> Vec<PathBuf> {
    // Stable, and false sorts first.
    links.sort_by_key(|p| p.to_string_lossy().ends_with(&format!(":{}", pins::QDISC)));
    links
}

/// What [`remove`] took away.
#[derive(Debug, Default)]
pub struct Removed {
    /// Link pins removed (`IFNAME:IFINDEX:SIDE`): each one detached.
    pub links: Vec<String>,
    /// Whether the maps and the directory went too.
    pub everything: bool,
}

/// `mmesh-agent detach`: removes the links of `interfaces` (all when
/// empty), and with all of them the maps and the pin directory (unmounting
/// it if it is a bpffs mount of its own). Refused while an agent holds the
/// directory.
pub fn remove(dir: &Path, interfaces: &[String]) -> Result<Removed, DatapathError> {
    let mut removed = Removed::default();
    if !dir.exists() {
        return Ok(removed);
    }
    let held = lock(dir)?;
    for path in release_order(list(&dir.join(pins::LINKS))) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let interface = pin_interface(&name);
        if interfaces.is_empty() || interfaces.contains(&interface) {
            super::attach::release_pin(&path).map_err(|source| pin_error(&path, source))?;
            removed.links.push(name);
        }
    }
    if interfaces.is_empty() {
        for sub in [pins::MAPS, pins::LINKS] {
            let path = dir.join(sub);
            if path.exists() {
                std::fs::remove_dir_all(&path).map_err(|source| pin_error(&path, source))?;
            }
        }
        for name in [pins::AGENT, pins::SLOT_IDS, pins::LAYOUTS] {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|source| pin_error(&path, source))?;
            }
        }
        drop(held);
        if is_mount_point(dir) {
            let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
                .map_err(|_| pin_error(dir, io::Error::from(io::ErrorKind::InvalidInput)))?;
            // SAFETY: a valid path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(pin_error(dir, io::Error::last_os_error()));
            }
        }
        std::fs::remove_dir(dir).map_err(|source| pin_error(dir, source))?;
        removed.everything = true;
    }
    Ok(removed)
}

/// Whether `dir` is the root of a mount (another device than its parent).
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(own), Some(Ok(parent))) = (std::fs::metadata(dir), dir.parent().map(std::fs::metadata))
    else {
        return false;
    };
    own.dev() != parent.dev()
}
