//! What survives an agent restart: dedup stores and bases, kept on the tmpfs of the images
//! directory (`<images_dir>/d<xxh3 of the data dir>/`, see `images.rs`), and reloaded, verified,
//! by the next agent on the same data directory.
//!
//! Files (all written atomically: a temporary file, then a rename):
//! - `store/<sandbox>.medes`: the dedup store (xxh3-checksummed by `medes-dedup`);
//!   `store/<sandbox>.json`: [`StoreFile`], what the agent needs to restore it (the action, its
//!   version and code directory, the sandbox's limit and environment, its dedup domain).
//! - `bases/<id>.pages`: a base's canonical pages (mapped read-only while the base lives: the
//!   file's pages are the only copy); `bases/<id>.pos`: their position keys (little-endian
//!   u64, absent when positional candidates are off); `bases/<id>.json`: [`BaseFile`] with the
//!   checksums of both and the action and version its sandbox ran (reported for the base once
//!   its process is gone, so a restarted controller keeps it as its function's base).
//!
//! - `tmpl/<name>/`: a template's full CRIU image (issue 8); `tmpl/<name>.json`:
//!   [`TemplateFile`] (the action, version, code directory, checksums of every image file, its
//!   base). A template's base is `bases/<id>.pages`, a hard link to the template's pages image
//!   (no second copy), with its own `bases/<id>.json`.
//!
//! On start, bases are loaded first (checksums verified, fingerprints re-registered in their
//! domain's registry under their old ids), then stores (fully loaded, so every checksum of the
//! store is verified, and their bases pinned). Anything that does not verify is removed with a
//! logged reason and never restored. Templates come next (checksums verified, their bases taken
//! out of the reloaded ones). A base no kept store or template depends on is retired at once. Warm
//! sandboxes do not survive (their processes die with the agent's shutdown or crash).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use medes_core::{ActionName, Bytes, SandboxId};
use medes_dedup::{BaseId, BaseMeta, DedupConfig, DedupStore};
use medes_sandbox::SandboxSpec;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::domain::{BaseImage, Domains};

/// Version of the metadata files.
const FORMAT: u32 = 1;

/// Metadata of a kept dedup store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoreFile {
    pub format: u32,
    pub sandbox: SandboxId,
    pub action: ActionName,
    pub version: String,
    pub domain: String,
    pub code_dir: PathBuf,
    pub memory_limit: Bytes,
    pub env: BTreeMap<String, String>,
    pub image_bytes: u64,
    pub pages: u64,
    pub bases: Vec<BaseId>,
}

/// Metadata of a kept base.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BaseFile {
    pub format: u32,
    pub id: BaseId,
    pub domain: String,
    pub sandbox: SandboxId,
    pub function: String,
    pub node: u32,
    pub pages_checksum: u64,
    pub positions_checksum: Option<u64>,
    /// The action its sandbox ran (absent in files of older agents, and for a template's base).
    #[serde(default)]
    pub action: Option<ActionName>,
    /// That action's version (absent with `action`).
    #[serde(default)]
    pub version: Option<String>,
    /// Its process was ended on purpose ([`crate::Command::ReleaseBase`]): kept as a base
    /// without dependents across agent restarts too (absent in files of older agents).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
}

/// The action and version a base's sandbox ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BaseOrigin {
    pub action: ActionName,
    pub version: String,
    /// Its process was ended on purpose ([`crate::Command::ReleaseBase`]): the base is kept
    /// even without dependents, until purged, across agent restarts too (the mark is in its
    /// metadata file, [`mark_released`]); any other reloaded base is a lost one, retired once
    /// nothing depends on it.
    pub released: bool,
}

impl BaseFile {
    /// The action and version, when the file names both.
    fn origin(&self) -> Option<BaseOrigin> {
        match (&self.action, &self.version) {
            (Some(action), Some(version)) => Some(BaseOrigin {
                action: action.clone(),
                version: version.clone(),
                released: self.released,
            }),
            _ => None,
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Writes `value` as JSON to `path` atomically (a temporary file renamed over it).
pub(crate) fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(json_err)?;
    write_atomic(path, &data)
}

fn json_err(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The metadata file of a store file.
pub(crate) fn store_meta_path(store: &Path) -> PathBuf {
    store.with_extension("json")
}

/// Writes the metadata of a store just written to `store`.
pub(crate) fn save_store_meta(store: &Path, meta: &StoreFile) -> io::Result<()> {
    write_json_atomic(&store_meta_path(store), meta)
}

/// Removes a store and its metadata (missing files are fine).
pub(crate) fn remove_store(store: &Path) {
    for p in [store.to_path_buf(), store_meta_path(store)] {
        if let Err(error) = fs::remove_file(&p)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %p.display(), %error, "removing a dedup store");
        }
    }
}

fn base_path(dir: &Path, id: BaseId, ext: &str) -> PathBuf {
    dir.join(format!("{}.{ext}", id.0))
}

/// Writes a base's pages (switching `image` to a mapping of the file), position keys and
/// metadata (with the action and version its sandbox runs) into `dir`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_base(
    dir: &Path,
    domain: &str,
    id: BaseId,
    meta: &BaseMeta,
    sandbox: &SandboxId,
    origin: &BaseOrigin,
    image: &mut BaseImage,
    positions: &[u64],
) -> io::Result<()> {
    let pages_checksum = image.save(&base_path(dir, id, "pages"))?;
    let positions_checksum = if positions.is_empty() {
        None
    } else {
        let bytes: Vec<u8> = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
        write_atomic(&base_path(dir, id, "pos"), &bytes)?;
        Some(xxhash_rust::xxh3::xxh3_64(&bytes))
    };
    let file = BaseFile {
        format: FORMAT,
        id,
        domain: domain.to_string(),
        sandbox: sandbox.clone(),
        function: meta.function.clone(),
        node: meta.node.0,
        pages_checksum,
        positions_checksum,
        action: Some(origin.action.clone()),
        version: Some(origin.version.clone()),
        released: origin.released,
    };
    write_json_atomic(&base_path(dir, id, "json"), &file)
}

/// Marks base `id`'s metadata in `dir` released (its process ended on purpose), so that an
/// agent restart keeps it as a base without dependents.
pub(crate) fn mark_released(dir: &Path, id: BaseId) -> io::Result<()> {
    let path = base_path(dir, id, "json");
    let mut file: BaseFile = serde_json::from_slice(&fs::read(&path)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if file.released {
        return Ok(());
    }
    file.released = true;
    write_json_atomic(&path, &file)
}

/// Removes a base's files (missing files are fine).
pub(crate) fn remove_base(dir: &Path, id: BaseId) {
    for ext in ["json", "pages", "pos", "tmp"] {
        let p = base_path(dir, id, ext);
        if let Err(error) = fs::remove_file(&p)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %p.display(), %error, "removing a base file");
        }
    }
}

/// Metadata of a kept template (issue 8): `tmpl/<name>.json` next to its image directory
/// `tmpl/<name>/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TemplateFile {
    pub format: u32,
    /// The sandbox it was taken from.
    pub sandbox: SandboxId,
    pub action: ActionName,
    pub version: String,
    pub domain: String,
    pub function: String,
    pub code_dir: PathBuf,
    pub memory_limit: Bytes,
    pub env: BTreeMap<String, String>,
    /// Every image file and its xxh3-64.
    pub sums: Vec<(String, u64)>,
    /// Its base (its raw pages in the domain's registry), if it has one.
    pub base: Option<BaseId>,
}

/// The metadata file of a template directory.
pub(crate) fn template_meta_path(dir: &Path) -> PathBuf {
    dir.with_extension("json")
}

/// Writes the metadata of a template whose image is in `dir`.
pub(crate) fn save_template_meta(dir: &Path, meta: &TemplateFile) -> io::Result<()> {
    write_json_atomic(&template_meta_path(dir), meta)
}

/// Removes a template's image directory and metadata (missing ones are fine).
pub(crate) fn remove_template(dir: &Path) {
    if let Err(error) = fs::remove_dir_all(dir)
        && error.kind() != io::ErrorKind::NotFound
    {
        warn!(path = %dir.display(), %error, "removing a template");
    }
    let _ = fs::remove_file(template_meta_path(dir));
}

/// Writes the metadata of a template's base whose pages file `bases/<id>.pages` is in place
/// (a hard link to the template's pages image).
pub(crate) fn save_template_base(
    dir: &Path,
    domain: &str,
    id: BaseId,
    meta: &BaseMeta,
    sandbox: &SandboxId,
    pages_checksum: u64,
) -> io::Result<()> {
    let file = BaseFile {
        format: FORMAT,
        id,
        domain: domain.to_string(),
        sandbox: sandbox.clone(),
        function: meta.function.clone(),
        node: meta.node.0,
        pages_checksum,
        positions_checksum: None,
        // Held by its template, not a sandbox the controller knows.
        action: None,
        version: None,
        released: false,
    };
    write_json_atomic(&base_path(dir, id, "json"), &file)
}

/// The pages file of a base in `dir`.
pub(crate) fn base_pages_path(dir: &Path, id: BaseId) -> PathBuf {
    base_path(dir, id, "pages")
}

/// A template reloaded from the images directory (checksums verified).
pub(crate) struct LoadedTemplate {
    pub dir: PathBuf,
    pub info: Arc<crate::SandboxInfo>,
    pub sums: Vec<(String, u64)>,
    /// Its base, taken out of the reloaded bases, and the template's layout.
    pub base: Option<(Arc<crate::BaseRec>, medes_dedup::TemplateLayout)>,
}

/// Reads one template; `Err(reason)` if it cannot be used.
fn read_template(
    dir: &Path,
    meta_path: &Path,
    domains: &Domains,
    bases: &mut Vec<LoadedBase>,
) -> Result<LoadedTemplate, String> {
    let text = fs::read(meta_path).map_err(|e| format!("reading the metadata: {e}"))?;
    let meta: TemplateFile =
        serde_json::from_slice(&text).map_err(|e| format!("bad metadata: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("unknown format {}", meta.format));
    }
    if !meta.code_dir.is_dir() {
        return Err(format!(
            "the action's code directory {} is gone",
            meta.code_dir.display()
        ));
    }
    crate::template::verify_sums(dir, &meta.sums)?;
    let domain = domains.get(&meta.domain);
    let info = Arc::new(crate::SandboxInfo {
        spec: SandboxSpec {
            id: meta.sandbox.clone(),
            code_dir: meta.code_dir.clone(),
            memory_limit: meta.memory_limit,
            env: meta.env.clone(),
        },
        domain,
        function: meta.function.clone(),
        action: meta.action.clone(),
        version: meta.version.clone(),
    });
    let base = match meta.base {
        Some(id) => match bases.iter().position(|b| b.rec.id == id) {
            Some(i) => {
                let b = bases.swap_remove(i);
                match medes_dedup::DumpImage::open(dir) {
                    Ok(dump) => Some((b.rec, medes_dedup::TemplateLayout::of(&dump))),
                    Err(e) => {
                        bases.push(b);
                        return Err(format!("opening the image: {}", crate::error_chain(&e)));
                    }
                }
            }
            None => {
                warn!(dir = %dir.display(), base = id.0, "a kept template's base is gone: it is kept without (no dedup against it)");
                None
            }
        },
        None => None,
    };
    Ok(LoadedTemplate {
        dir: dir.to_path_buf(),
        info,
        sums: meta.sums,
        base,
    })
}

/// A base reloaded from the images directory.
pub(crate) struct LoadedBase {
    pub sandbox: SandboxId,
    pub rec: Arc<crate::BaseRec>,
    /// What its sandbox ran (`None` from an older agent's file, or a template's base).
    pub origin: Option<BaseOrigin>,
}

/// A dedup store reloaded from the images directory.
pub(crate) struct LoadedStore {
    pub sandbox: SandboxId,
    pub rec: Arc<crate::DedupRec>,
}

/// What an agent found of its predecessor.
#[derive(Default)]
pub(crate) struct Loaded {
    pub bases: Vec<LoadedBase>,
    pub stores: Vec<LoadedStore>,
    /// Highest base id in use (the next base gets a higher one).
    pub max_base: Option<u32>,
    /// Stores and bases dropped (corrupt, incomplete, unusable), each logged with its reason.
    pub dropped: u64,
    /// Templates (issue 8), with their bases.
    pub templates: Vec<LoadedTemplate>,
}

/// Reads one base; `Err(reason)` if it cannot be used.
fn read_base(
    dir: &Path,
    meta_path: &Path,
    domains: &Domains,
    engine: &DedupConfig,
) -> Result<(BaseFile, Arc<crate::BaseRec>), String> {
    let text = fs::read(meta_path).map_err(|e| format!("reading the metadata: {e}"))?;
    let meta: BaseFile = serde_json::from_slice(&text).map_err(|e| format!("bad metadata: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("unknown format {}", meta.format));
    }
    let image = BaseImage::map(&base_path(dir, meta.id, "pages"))
        .map_err(|e| format!("mapping the pages: {e}"))?;
    let sum = xxhash_rust::xxh3::xxh3_64(image.data());
    if sum != meta.pages_checksum {
        return Err(format!(
            "pages checksum mismatch ({sum:016x}, expected {:016x})",
            meta.pages_checksum
        ));
    }
    let positions = match meta.positions_checksum {
        None => Vec::new(),
        Some(want) => {
            let bytes = fs::read(base_path(dir, meta.id, "pos"))
                .map_err(|e| format!("reading the position keys: {e}"))?;
            if xxhash_rust::xxh3::xxh3_64(&bytes) != want || bytes.len() % 8 != 0 {
                return Err("position keys checksum mismatch".into());
            }
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        }
    };
    let n_pages = image.bytes() / medes_dedup::PAGE as u64;
    let domain = domains.get(&meta.domain);
    let bmeta = BaseMeta {
        function: meta.function.clone(),
        node: medes_dedup::registry::NodeId(meta.node),
    };
    let bytes = domain
        .load_base(meta.id, bmeta, image, &positions, engine)
        .map_err(|e| format!("registering: {e}"))?;
    let rec = Arc::new(crate::BaseRec {
        domain,
        id: meta.id,
        bytes,
        pages: n_pages,
    });
    Ok((meta, rec))
}

/// Reads one store; `Err(reason)` if it cannot be used.
fn read_store(
    store_path: &Path,
    meta_path: &Path,
    domains: &Domains,
) -> Result<Arc<crate::DedupRec>, String> {
    let text = fs::read(meta_path).map_err(|e| format!("reading the metadata: {e}"))?;
    let meta: StoreFile =
        serde_json::from_slice(&text).map_err(|e| format!("bad metadata: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("unknown format {}", meta.format));
    }
    if !meta.code_dir.is_dir() {
        return Err(format!(
            "the action's code directory {} is gone",
            meta.code_dir.display()
        ));
    }
    // Loading verifies the store's checksums.
    let store = DedupStore::load(store_path).map_err(|e| crate::error_chain(&e))?;
    // The same set (the metadata lists them in pinning order, the store in slot order).
    let (mut want, mut have) = (meta.bases.clone(), store.bases.clone());
    want.sort();
    have.sort();
    if want != have {
        return Err("the store's bases differ from its metadata".into());
    }
    let written = fs::metadata(store_path)
        .map_err(|e| format!("reading the store's size: {e}"))?
        .len();
    let domain = domains.get(&meta.domain);
    let pins = domain.pin(&store.bases).ok_or_else(|| {
        format!(
            "a base it needs ({:?}) is not resident",
            store.bases.iter().map(|b| b.0).collect::<Vec<_>>()
        )
    })?;
    let info = Arc::new(crate::SandboxInfo {
        spec: SandboxSpec {
            id: meta.sandbox.clone(),
            code_dir: meta.code_dir.clone(),
            memory_limit: meta.memory_limit,
            env: meta.env.clone(),
        },
        domain,
        function: meta.action.to_string(),
        action: meta.action.clone(),
        version: meta.version.clone(),
    });
    Ok(Arc::new(crate::DedupRec::new(
        info,
        store_path.to_path_buf(),
        crate::images::held_bytes(written),
        meta.image_bytes,
        meta.pages,
        pins,
    )))
}

fn list(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Loads what an earlier agent kept in `images` (this agent's directory). Blocking and
/// CPU-heavy (checksums, fingerprints): run it on the agent's pool.
pub(crate) fn load(images: &Path, domains: &Domains, engine: &DedupConfig) -> Loaded {
    let t0 = std::time::Instant::now();
    let mut out = Loaded::default();
    let bases_dir = images.join("bases");
    let store_dir = images.join("store");
    // Leftovers of interrupted writes.
    for d in [&bases_dir, &store_dir] {
        for p in list(d, "tmp") {
            let _ = fs::remove_file(p);
        }
    }
    for meta_path in list(&bases_dir, "json") {
        match read_base(&bases_dir, &meta_path, domains, engine) {
            Ok((meta, rec)) => {
                out.max_base = Some(out.max_base.map_or(meta.id.0, |m| m.max(meta.id.0)));
                out.bases.push(LoadedBase {
                    origin: meta.origin(),
                    sandbox: meta.sandbox,
                    rec,
                });
            }
            Err(reason) => {
                warn!(file = %meta_path.display(), %reason, "dropping a kept base");
                out.dropped += 1;
                if let Some(id) = meta_path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<u32>().ok())
                {
                    out.max_base = Some(out.max_base.map_or(id, |m| m.max(id)));
                    remove_base(&bases_dir, BaseId(id));
                } else {
                    let _ = fs::remove_file(&meta_path);
                }
            }
        }
    }
    // Pages files without metadata (a crash between the writes).
    for p in list(&bases_dir, "pages")
        .into_iter()
        .chain(list(&bases_dir, "pos"))
    {
        if !p.with_extension("json").exists() {
            let _ = fs::remove_file(p);
        }
    }
    for store_path in list(&store_dir, "medes") {
        let meta_path = store_meta_path(&store_path);
        match read_store(&store_path, &meta_path, domains) {
            Ok(rec) => out.stores.push(LoadedStore {
                sandbox: rec.info.spec.id.clone(),
                rec,
            }),
            Err(reason) => {
                warn!(store = %store_path.display(), %reason, "dropping a kept dedup store: it will not be restored");
                out.dropped += 1;
                remove_store(&store_path);
            }
        }
    }
    for meta_path in list(&store_dir, "json") {
        if !meta_path.with_extension("medes").exists() {
            let _ = fs::remove_file(meta_path);
        }
    }
    // Templates (issue 8): they take their bases out of the reloaded ones.
    let tmpl_dir = images.join("tmpl");
    for p in list(&tmpl_dir, "tmp") {
        let _ = fs::remove_file(p);
    }
    for meta_path in list(&tmpl_dir, "json") {
        let dir = meta_path.with_extension("");
        match read_template(&dir, &meta_path, domains, &mut out.bases) {
            Ok(t) => out.templates.push(t),
            Err(reason) => {
                warn!(template = %dir.display(), %reason, "dropping a kept template");
                out.dropped += 1;
                remove_template(&dir);
            }
        }
    }
    // Image directories without metadata (a crash while making one).
    if let Ok(rd) = fs::read_dir(&tmpl_dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !template_meta_path(&p).exists() {
                let _ = fs::remove_dir_all(p);
            }
        }
    }
    // Bases nothing depends on any more retire now, unless their process was released on
    // purpose (kept until purged).
    out.bases.retain(|b| {
        if b.rec.domain.dependents(b.rec.id) > 0 || b.origin.as_ref().is_some_and(|o| o.released)
        {
            return true;
        }
        let _ = b.rec.domain.retire(b.rec.id);
        info!(sandbox = %b.sandbox, base = b.rec.id.0, "kept base has no dedup sandbox left; retired");
        false
    });
    if !out.stores.is_empty()
        || !out.bases.is_empty()
        || !out.templates.is_empty()
        || out.dropped > 0
    {
        info!(
            stores = out.stores.len(),
            templates = out.templates.len(),
            bases = out.bases.len(),
            dropped = out.dropped,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            dir = %images.display(),
            "reloaded what the previous agent kept"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(origin: Option<BaseOrigin>) -> BaseFile {
        BaseFile {
            format: FORMAT,
            id: BaseId(7),
            domain: "guest".into(),
            sandbox: SandboxId("b".into()),
            function: "guest/f".into(),
            node: 0,
            pages_checksum: 1,
            positions_checksum: None,
            action: origin.as_ref().map(|o| o.action.clone()),
            released: origin.as_ref().is_some_and(|o| o.released),
            version: origin.map(|o| o.version),
        }
    }

    /// guest/f at `version`, not released.
    fn origin(version: &str) -> BaseOrigin {
        BaseOrigin {
            action: ActionName {
                namespace: medes_core::Namespace("guest".into()),
                name: "f".into(),
            },
            version: version.into(),
            released: false,
        }
    }

    #[test]
    fn a_released_mark_survives_a_restart_and_older_files_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let id = BaseId(7);
        let origin = origin("1");
        let path = base_path(dir.path(), id, "json");
        write_json_atomic(&path, &file(Some(origin.clone()))).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("released"), "{text}");
        let read = || -> BaseFile { serde_json::from_slice(&fs::read(&path).unwrap()).unwrap() };
        assert_eq!(read().origin().map(|o| o.released), Some(false));
        mark_released(dir.path(), id).unwrap();
        mark_released(dir.path(), id).unwrap();
        assert_eq!(
            read().origin(),
            Some(BaseOrigin {
                released: true,
                ..origin
            })
        );
        assert!(
            mark_released(dir.path(), BaseId(8)).is_err(),
            "no such base"
        );
    }

    #[test]
    fn a_base_file_keeps_its_action_and_version() {
        let origin = origin("0.0.2");
        let text = serde_json::to_vec(&file(Some(origin.clone()))).unwrap();
        let back: BaseFile = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.origin(), Some(origin));
    }

    #[test]
    fn an_older_agents_base_file_loads_without_them() {
        let mut v = serde_json::to_value(file(None)).unwrap();
        let fields = v.as_object_mut().unwrap();
        fields.remove("action");
        fields.remove("version");
        assert!(!fields.contains_key("action"));
        let back: BaseFile = serde_json::from_value(v).unwrap();
        assert_eq!((back.id, back.origin()), (BaseId(7), None));
        // Half a name is no name.
        let mut half = file(None);
        half.version = Some("1".into());
        assert_eq!(half.origin(), None);
    }
}
