//! Making the written pages of private file mappings restorable lazily.
//!
//! CRIU 4.1 restores lazily (`--lazy-pages`) only the pages of private *anonymous* mappings
//! (its `vma_entry_can_be_lazy`). The pages a process wrote in a private *file* mapping — a
//! library's relocated `.data.rel.ro`, the `.data` of the executable and of every extension
//! module — it dumps like anonymous pages but restores eagerly, so a restore left stopped holds
//! them all (0.7 MB for a bare Python runtime, 4 MB with numpy/scipy loaded). [`lazify`]
//! rewrites one process's mm and pagemap images so that each run of such dumped pages becomes a
//! private anonymous mapping of its own, with the same protection, its pagemap entries marked
//! [`PE_LAZY`]; the file's pages around it stay mapped from the file (split into pieces whose
//! file offsets follow their addresses). The contents the process sees are unchanged: a dumped
//! page is what it had written, a page that was not dumped is the file's. The page order, and
//! so the pages images, are unchanged.
//!
//! What changes for the restored process: `/proc/self/maps` shows the rewritten runs as
//! anonymous, and `madvise(MADV_DONTNEED)` on them would give zero pages instead of the file's
//! (runtimes do not do that to their own data segments).

use crate::mm::{MmEntry, VmaEntry, vma_status};
use crate::pagemap::{PE_LAZY, PE_PRESENT, Pagemap, PagemapEntry};

const PAGE: u64 = 4096;
const MAP_SHARED: u32 = 0x01;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_LOCKED: u32 = 0x2000;

/// Status bits of mappings that are never rewritten.
const SPECIAL: u32 = vma_status::AREA_STACK
    | vma_status::AREA_VSYSCALL
    | vma_status::AREA_VDSO
    | vma_status::AREA_HEAP
    | vma_status::FILE_SHARED
    | vma_status::ANON_SHARED
    | vma_status::AREA_SYSVIPC
    | vma_status::AREA_SOCKET
    | vma_status::AREA_VVAR
    | vma_status::AREA_AIORING
    | vma_status::AREA_MEMFD
    | vma_status::AREA_UNSUPP;

/// The rewritten images of one process.
#[derive(Debug, Clone, PartialEq)]
pub struct Lazified {
    /// The mm with the dumped runs of private file mappings as anonymous mappings.
    pub mm: MmEntry,
    /// The pagemap with those runs marked [`PE_LAZY`] (entries split at their bounds).
    pub pagemap: Pagemap,
    /// Mappings rewritten (anonymous runs made).
    pub runs: usize,
    /// Pages made lazy.
    pub pages: u64,
    /// The mappings that were split, as they were (for [`unlazify`]).
    pub split: Vec<VmaEntry>,
}

fn eligible(v: &VmaEntry) -> bool {
    v.status & vma_status::FILE_PRIVATE != 0
        && v.status & SPECIAL == 0
        && v.flags & (MAP_SHARED | MAP_ANONYMOUS | MAP_LOCKED) == 0
        && v.start < v.end
        && v.start.is_multiple_of(PAGE)
        && v.end.is_multiple_of(PAGE)
}

/// Present pagemap ranges `[start, end)`, in address order (entries that overflow dropped).
fn present_ranges(pm: &Pagemap) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = pm
        .entries
        .iter()
        .filter(|e| e.is_present())
        .filter_map(|e| {
            let end = e.nr_pages.checked_mul(PAGE)?.checked_add(e.vaddr)?;
            Some((e.vaddr, end))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Rewrites `mm` and `pm` (one process) so that the dumped pages of its private file mappings
/// are restored lazily; `None` when there is nothing to rewrite.
pub fn lazify(mm: &MmEntry, pm: &Pagemap) -> Option<Lazified> {
    let present = present_ranges(pm);
    let mut vmas = Vec::with_capacity(mm.vmas.len());
    // The new anonymous runs, in address order.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut split = Vec::new();
    for v in &mm.vmas {
        if !eligible(v) {
            vmas.push(v.clone());
            continue;
        }
        // Dumped ranges inside `v`, merged when contiguous.
        let mut inside: Vec<(u64, u64)> = Vec::new();
        let from = present.partition_point(|r| r.1 <= v.start);
        for &(a, b) in present[from..].iter().take_while(|r| r.0 < v.end) {
            let (a, b) = (a.max(v.start), b.min(v.end));
            match inside.last_mut() {
                Some(l) if l.1 == a => l.1 = b,
                _ if a < b => inside.push((a, b)),
                _ => {}
            }
        }
        if inside.is_empty() {
            vmas.push(v.clone());
            continue;
        }
        split.push(v.clone());
        let file_piece = |a: u64, b: u64| VmaEntry {
            start: a,
            end: b,
            pgoff: v.pgoff.wrapping_add(a - v.start),
            ..v.clone()
        };
        let mut at = v.start;
        for &(a, b) in &inside {
            if a > at {
                vmas.push(file_piece(at, a));
            }
            vmas.push(VmaEntry {
                start: a,
                end: b,
                pgoff: 0,
                shmid: 0,
                prot: v.prot,
                flags: v.flags | MAP_ANONYMOUS,
                status: (v.status & !vma_status::FILE_PRIVATE) | vma_status::ANON_PRIVATE,
                fd: -1,
                madv: v.madv,
                fdflags: None,
            });
            runs.push((a, b));
            at = b;
        }
        if at < v.end {
            vmas.push(file_piece(at, v.end));
        }
    }
    if runs.is_empty() {
        return None;
    }
    runs.sort_unstable();
    let (entries, lazy_pages) = mark(pm, &runs, true);
    Some(Lazified {
        mm: MmEntry { vmas, ..mm.clone() },
        pagemap: Pagemap {
            entries,
            ..pm.clone()
        },
        runs: runs.len(),
        pages: lazy_pages,
        split,
    })
}

/// Splits the pagemap entries of `pm` at the bounds of `ranges` (sorted, disjoint) and sets
/// (`lazy`) or clears [`PE_LAZY`] on the present pages inside them; returns the pages changed.
fn mark(pm: &Pagemap, ranges: &[(u64, u64)], lazy: bool) -> (Vec<PagemapEntry>, u64) {
    let mut entries = Vec::with_capacity(pm.entries.len() + 2 * ranges.len());
    let mut marked = 0u64;
    for e in &pm.entries {
        let Some(end) = e
            .nr_pages
            .checked_mul(PAGE)
            .and_then(|l| l.checked_add(e.vaddr))
            .filter(|_| e.is_present())
        else {
            entries.push(*e);
            continue;
        };
        let mut at = e.vaddr;
        let mut r = ranges.partition_point(|r| r.1 <= at);
        while at < end {
            // The next cut: the end of the range holding `at`, or the start of the next one.
            let (cut, inside) = match ranges.get(r) {
                Some(&(a, b)) if a <= at => (b.min(end), true),
                Some(&(a, _)) => (a.min(end), false),
                None => (end, false),
            };
            let flags = if inside {
                marked += (cut - at) / PAGE;
                let f = e.flags.unwrap_or(PE_PRESENT);
                Some(if lazy { f | PE_LAZY } else { f & !PE_LAZY })
            } else {
                e.flags
            };
            entries.push(PagemapEntry {
                vaddr: at,
                nr_pages: (cut - at) / PAGE,
                in_parent: e.in_parent,
                flags,
            });
            at = cut;
            if ranges.get(r).is_some_and(|&(_, b)| b <= at) {
                r += 1;
            }
        }
    }
    (entries, marked)
}

/// Puts back, in a later dump of a process restored from [`lazify`]'s images, the private file
/// mappings it split (`split`: [`Lazified::split`], with the path of each mapping's file):
/// where the new dump's mappings tile one of them exactly — its file pieces and anonymous runs,
/// an anonymous run possibly merged by the kernel with an anonymous neighbour, which is cut
/// off again — they become that mapping again, with the file id `reg_ids` gives its path, and
/// [`PE_LAZY`] is cleared on the pages inside (CRIU restores a file mapping's pages eagerly and
/// skips every page marked lazy, so a lazy mark left there would restore the file's page
/// instead of the written one). The dump then describes the process as its original dump did:
/// the same mappings, so the same mapping keys in the dedup engine's pointer rebasing when it
/// is deduplicated or made a base. `None` when nothing was put back.
pub fn unlazify(
    mm: &MmEntry,
    pm: &Pagemap,
    split: &[(VmaEntry, String)],
    reg_ids: &std::collections::BTreeMap<String, u32>,
) -> Option<(MmEntry, Pagemap)> {
    let mut vmas = mm.vmas.clone();
    vmas.sort_by_key(|v| v.start);
    let mut put_back: Vec<(u64, u64)> = Vec::new();
    let mut originals: Vec<&(VmaEntry, String)> = split.iter().collect();
    originals.sort_by_key(|(o, _)| o.start);
    let anon = |v: &VmaEntry| {
        v.status & vma_status::ANON_PRIVATE != 0
            && v.status & SPECIAL == 0
            && v.flags & MAP_ANONYMOUS != 0
    };
    for (o, path) in originals {
        let Some(&id) = reg_ids.get(path) else {
            continue;
        };
        let first = vmas.partition_point(|v| v.end <= o.start);
        let last = vmas.partition_point(|v| v.start < o.end);
        if first >= last {
            continue;
        }
        let pieces = &vmas[first..last];
        let tiles = pieces.windows(2).all(|w| w[0].end == w[1].start)
            && pieces.iter().all(|v| {
                v.prot == o.prot
                    && (anon(v)
                        || (v.status & vma_status::FILE_PRIVATE != 0
                            && v.shmid == u64::from(id)
                            && v.pgoff == o.pgoff.wrapping_add(v.start.wrapping_sub(o.start))))
            })
            && (pieces[0].start == o.start || anon(&pieces[0]))
            && (pieces[pieces.len() - 1].end == o.end || anon(&pieces[pieces.len() - 1]))
            && pieces[0].start <= o.start
            && pieces[pieces.len() - 1].end >= o.end;
        if !tiles {
            continue;
        }
        let (head, tail) = (pieces[0].clone(), pieces[pieces.len() - 1].clone());
        let mut with = Vec::with_capacity(3);
        if head.start < o.start {
            with.push(VmaEntry {
                end: o.start,
                ..head
            });
        }
        with.push(VmaEntry {
            shmid: u64::from(id),
            ..o.clone()
        });
        if tail.end > o.end {
            with.push(VmaEntry {
                start: o.end,
                ..tail
            });
        }
        vmas.splice(first..last, with);
        put_back.push((o.start, o.end));
    }
    if put_back.is_empty() {
        return None;
    }
    put_back.sort_unstable();
    let (entries, _) = mark(pm, &put_back, false);
    Some((
        MmEntry { vmas, ..mm.clone() },
        Pagemap {
            entries,
            ..pm.clone()
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::PagemapHead;

    const P: u64 = PAGE;

    fn vma(start: u64, end: u64, status: u32, flags: u32, pgoff: u64) -> VmaEntry {
        VmaEntry {
            start,
            end,
            pgoff,
            shmid: if status & vma_status::FILE_PRIVATE != 0 {
                7
            } else {
                0
            },
            prot: 3,
            flags,
            status,
            fd: -1,
            madv: None,
            fdflags: (status & vma_status::FILE_PRIVATE != 0).then_some(2),
        }
    }

    fn mm(vmas: Vec<VmaEntry>) -> MmEntry {
        MmEntry {
            mm_start_code: 0,
            mm_end_code: 0,
            mm_start_data: 0,
            mm_end_data: 0,
            mm_start_stack: 0,
            mm_start_brk: 0,
            mm_brk: 0,
            mm_arg_start: 0,
            mm_arg_end: 0,
            mm_env_start: 0,
            mm_env_end: 0,
            exe_file_id: 1,
            mm_saved_auxv: vec![],
            vmas,
            dumpable: None,
            aios: vec![],
            thp_disabled: None,
        }
    }

    fn pm(entries: &[(u64, u64, u32)]) -> Pagemap {
        Pagemap {
            common: None,
            head: PagemapHead { pages_id: 1 },
            entries: entries
                .iter()
                .map(|&(vaddr, nr_pages, f)| PagemapEntry {
                    vaddr,
                    nr_pages,
                    in_parent: None,
                    flags: Some(f),
                })
                .collect(),
        }
    }

    const FILE: u32 = vma_status::AREA_REGULAR | vma_status::FILE_PRIVATE;
    const ANON: u32 = vma_status::AREA_REGULAR | vma_status::ANON_PRIVATE;
    const PRIV: u32 = 0x02;

    fn pages(p: &Pagemap) -> Vec<(u64, bool)> {
        p.entries
            .iter()
            .filter(|e| e.is_present())
            .flat_map(|e| {
                (0..e.nr_pages).map(move |i| (e.vaddr + i * P, e.flags.unwrap() & PE_LAZY != 0))
            })
            .collect()
    }

    #[test]
    fn splits_a_file_mapping_around_its_dumped_pages() {
        // A file mapping of 8 pages at 0x10000 (file offset 0x3000) with pages 1-2 and 4 dumped
        // in one pagemap entry that also covers the anonymous mapping after it.
        let m = mm(vec![
            vma(0x10 * P, 0x18 * P, FILE, PRIV, 0x3000),
            vma(0x18 * P, 0x1a * P, ANON, PRIV | MAP_ANONYMOUS, 0),
        ]);
        let p = pm(&[
            (0x11 * P, 2, PE_PRESENT),
            (0x14 * P, 1, PE_PRESENT),
            (0x17 * P, 3, PE_PRESENT | PE_LAZY),
        ]);
        let l = lazify(&m, &p).unwrap();
        let got: Vec<_> =
            l.mm.vmas
                .iter()
                .map(|v| (v.start / P, v.end / P, v.status, v.pgoff, v.shmid, v.flags))
                .collect();
        let an = ANON;
        let af = PRIV | MAP_ANONYMOUS;
        assert_eq!(
            got,
            vec![
                (0x10, 0x11, FILE, 0x3000, 7, PRIV),
                (0x11, 0x13, an, 0, 0, af),
                (0x13, 0x14, FILE, 0x6000, 7, PRIV),
                (0x14, 0x15, an, 0, 0, af),
                (0x15, 0x17, FILE, 0x8000, 7, PRIV),
                (0x17, 0x18, an, 0, 0, af),
                (0x18, 0x1a, ANON, 0, 0, af),
            ]
        );
        assert_eq!(l.runs, 3);
        assert_eq!(l.pages, 4);
        // Same pages in the same order, every one lazy now; entries split at the new bounds.
        let before: Vec<u64> = pages(&p).into_iter().map(|x| x.0).collect();
        let after = pages(&l.pagemap);
        assert_eq!(after.iter().map(|x| x.0).collect::<Vec<_>>(), before);
        assert!(after.iter().all(|x| x.1));
        assert_eq!(l.pagemap.n_present_pages(), p.n_present_pages());
        assert_eq!(l.pagemap.entries.len(), 4);
    }

    #[test]
    fn leaves_other_mappings_and_eager_anonymous_pages_alone() {
        let stack = vma(
            0x40 * P,
            0x42 * P,
            vma_status::AREA_REGULAR | vma_status::AREA_STACK | vma_status::ANON_PRIVATE,
            PRIV | MAP_ANONYMOUS,
            0,
        );
        let shared = vma(
            0x50 * P,
            0x52 * P,
            vma_status::AREA_REGULAR | vma_status::FILE_SHARED,
            MAP_SHARED,
            0,
        );
        let clean = vma(0x60 * P, 0x62 * P, FILE, PRIV, 0);
        let m = mm(vec![stack, shared, clean]);
        let p = pm(&[(0x41 * P, 1, PE_PRESENT), (0x50 * P, 2, PE_PRESENT)]);
        assert_eq!(lazify(&m, &p), None);
    }

    #[test]
    fn unlazify_puts_the_split_mappings_back_in_a_later_dump() {
        let orig = mm(vec![
            vma(0x10 * P, 0x18 * P, FILE, PRIV, 0x3000),
            vma(0x18 * P, 0x1a * P, ANON, PRIV | MAP_ANONYMOUS, 0),
        ]);
        let p = pm(&[(0x11 * P, 2, PE_PRESENT), (0x17 * P, 1, PE_PRESENT)]);
        let l = lazify(&orig, &p).unwrap();
        let split: Vec<_> = l
            .split
            .iter()
            .map(|v| (v.clone(), "/bin/x".to_string()))
            .collect();
        assert_eq!(split.len(), 1);
        // The restored process, dumped again: the kernel merged the last run with the
        // anonymous mapping after it; the file has another id in the new files.img; CRIU marks
        // every anonymous page lazy, and the restored process touched page 0x18.
        let mut vmas = l.mm.vmas.clone();
        let tail = vmas.pop().unwrap();
        vmas.last_mut().unwrap().end = tail.end;
        for v in &mut vmas {
            if v.status & vma_status::FILE_PRIVATE != 0 {
                v.shmid = 9;
            }
        }
        let again = mm(vmas);
        let pm2 = pm(&[
            (0x11 * P, 2, PE_PRESENT | PE_LAZY),
            (0x17 * P, 2, PE_PRESENT | PE_LAZY),
        ]);
        let ids = [("/bin/x".to_string(), 9u32)].into_iter().collect();
        let (m3, p3) = unlazify(&again, &pm2, &split, &ids).unwrap();
        let mut want = orig.vmas.clone();
        want[0].shmid = 9;
        assert_eq!(m3.vmas, want);
        // Pages of the file mapping eager again, the anonymous one still lazy.
        assert_eq!(
            pages(&p3),
            vec![
                (0x11 * P, false),
                (0x12 * P, false),
                (0x17 * P, false),
                (0x18 * P, true)
            ]
        );
        // A file missing from the new dump, or mappings that do not tile it: left alone.
        assert_eq!(unlazify(&again, &pm2, &split, &Default::default()), None);
        let mut moved = again.clone();
        moved.vmas[0].end -= P;
        moved.vmas[1].start -= P;
        moved.vmas[1].status = FILE;
        assert_eq!(unlazify(&moved, &pm2, &split, &ids), None);
    }

    #[test]
    fn a_wholly_dumped_mapping_becomes_one_anonymous_mapping() {
        let m = mm(vec![vma(0x10 * P, 0x12 * P, FILE, PRIV, 0)]);
        let p = pm(&[(0x10 * P, 1, PE_PRESENT), (0x11 * P, 1, PE_PRESENT)]);
        let l = lazify(&m, &p).unwrap();
        assert_eq!(l.mm.vmas.len(), 1);
        assert_eq!(l.mm.vmas[0].status, ANON);
        assert_eq!((l.runs, l.pages), (1, 2));
        assert_eq!(l.pagemap.entries.len(), 2);
    }
}
