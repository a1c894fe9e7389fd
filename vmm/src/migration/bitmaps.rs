//! Dirty bitmaps that travel with a migration (capability `dirty-bitmaps`,
//! parameter `block-bitmap-mapping`), with QEMU 10's semantics where they
//! matter to libvirt and to an incremental backup chain:
//!
//! - Which bitmaps go. Without a mapping: every named bitmap of every node,
//!   under its node's name and its own name (both sides must use the same
//!   node names; a name longer than 255 bytes, or a node whose name is
//!   auto-generated (`#...`), fails the migration). With a mapping: only the
//!   bitmaps the mapping names, on the nodes it names, under their aliases;
//!   a node or bitmap it names that does not exist here fails `migrate`
//!   (QEMU silently skips it; a typo there would lose a backup chain).
//!   Jobs' own bitmaps are never listed, so never sent. A bitmap in use by
//!   an operation (busy: a mirror's user bitmap, an NBD export's) fails the
//!   migration, as in QEMU.
//! - What goes: granularity, the enabled (recording) flag, persistence
//!   (`transform.persistent` overrides it; baton has no persistent bitmaps,
//!   so a bitmap that would be persistent on either side is refused, naming
//!   it, rather than silently downgraded), the disk size it covers and every
//!   bit.
//! - When: chosen when the attempt starts (checked already by `migrate`, so
//!   a bad mapping changes nothing) and busy from then until the attempt
//!   ends, as in QEMU: user commands and NBD exports cannot change, remove
//!   or take them meanwhile; a bitmap added later stays behind. Their bits
//!   are read and sent at the switchover, once every node is inactive
//!   (nothing can set a bit any more), before the vCPUs and END.
//! - The destination creates them while it prepares (after END, before
//!   PREPARED), resolving aliases through its own mapping (an unknown alias
//!   is an error), refusing a bitmap whose name already exists on the node
//!   (QEMU's rule), one whose disk size differs, or any BITMAPS section when
//!   its own capability is off. A rollback (REFUSED, ABORT, a lost link
//!   before COMMIT) removes every bitmap it created, and only those.
//! - The source's bitmaps are never changed: after a failure they are as
//!   before, after COMMIT they stay on the postmigrate source, as in QEMU.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use block::bitmap::{DirtyBitmap, MAX_NAME_LEN};
use block::Graph;

use super::params::{BitmapMigrationBitmapAlias, BitmapMigrationNodeAlias};
use crate::stream::{BitmapChunk, BitmapMeta};

/// Longest node or bitmap alias: the stream (like QEMU's) gives a name one byte of length.
pub const MAX_ALIAS_LEN: usize = u8::MAX as usize;
/// Longest node name QEMU has (`node_name[32]`).
pub const MAX_NODE_NAME_LEN: usize = 31;

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
fn well_formed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

/// QEMU's set-time checks of a `block-bitmap-mapping` (both directions must
/// be unambiguous): node aliases well-formed and at most 255 bytes, node
/// names at most 31 bytes, bitmap aliases at most 255 bytes and names at
/// most 1023; no node name or node alias twice; per node, no bitmap name or
/// bitmap alias twice. Existence is checked at `migrate` ([`outgoing`]).
pub fn check_mapping(mapping: &[BitmapMigrationNodeAlias]) -> Result<(), String> {
    for n in mapping {
        if !well_formed(&n.alias) {
            return Err(format!("The node alias '{}' is not well-formed", n.alias));
        }
        if n.alias.len() > MAX_ALIAS_LEN {
            return Err(format!("The node alias '{}' is longer than {MAX_ALIAS_LEN} bytes", n.alias));
        }
        if n.node_name.len() > MAX_NODE_NAME_LEN {
            return Err(format!("The node name '{}' is longer than {MAX_NODE_NAME_LEN} bytes", n.node_name));
        }
        for b in &n.bitmaps {
            if b.alias.len() > MAX_ALIAS_LEN {
                return Err(format!("The bitmap alias '{}' is longer than {MAX_ALIAS_LEN} bytes", b.alias));
            }
            if b.name.len() > MAX_NAME_LEN {
                return Err(format!("The bitmap name '{}' is longer than {MAX_NAME_LEN} bytes", b.name));
            }
        }
    }
    // Name to alias (the source's direction), then alias to name (the destination's).
    let mut names = HashSet::new();
    for n in mapping {
        if !names.insert(n.node_name.as_str()) {
            return Err(format!("The node name '{}' is mapped twice", n.node_name));
        }
        let mut seen = HashSet::new();
        if let Some(b) = n.bitmaps.iter().find(|b| !seen.insert(b.name.as_str())) {
            return Err(format!("The bitmap '{}'/'{}' is mapped twice", n.node_name, b.name));
        }
    }
    let mut aliases = HashSet::new();
    for n in mapping {
        if !aliases.insert(n.alias.as_str()) {
            return Err(format!("The node alias '{}' is used twice", n.alias));
        }
        let mut seen = HashSet::new();
        if let Some(b) = n.bitmaps.iter().find(|b| !seen.insert(b.alias.as_str())) {
            return Err(format!("The bitmap alias '{}'/'{}' is used twice", n.alias, b.alias));
        }
    }
    Ok(())
}

/// One bitmap the source sends: which, and how it travels.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The node's name here.
    pub node: String,
    pub bitmap: Arc<DirtyBitmap>,
    /// The names on the wire (aliases, or the names themselves).
    pub node_alias: String,
    pub bitmap_alias: String,
    pub persistent: bool,
}

impl Outgoing {
    /// The section header this bitmap travels under, and its bits, read
    /// together (the nodes are inactive by then: nothing sets a bit).
    pub fn export(&self) -> Result<(BitmapMeta, Vec<u8>), String> {
        let (size, bits) = self.bitmap.export();
        let granularity = u32::try_from(self.bitmap.granularity())
            .map_err(|_| format!("{}: its granularity does not fit the stream", self.whose()))?;
        let meta = BitmapMeta {
            node: self.node_alias.clone(),
            bitmap: self.bitmap_alias.clone(),
            granularity,
            enabled: self.bitmap.is_enabled(),
            persistent: self.persistent,
            size,
        };
        Ok((meta, bits))
    }

    fn whose(&self) -> String {
        format!("bitmap '{}' of node '{}'", self.bitmap.name(), self.node)
    }
}

/// The bitmaps of `graph` that go with a migration under `mapping`, checked
/// (see the module doc): at `migrate` (an error then changes nothing) and
/// again when the attempt starts and claims them ([`claim`]). `Err` names
/// the node or bitmap.
pub fn outgoing(graph: &Graph, mapping: Option<&[BitmapMigrationNodeAlias]>) -> Result<Vec<Outgoing>, String> {
    let mut out = Vec::new();
    match mapping {
        None => {
            for node in graph.nodes() {
                let bitmaps = node.bitmaps();
                let Some(first) = bitmaps.first() else { continue };
                let name = node.name();
                if name.is_empty() || name.starts_with('#') {
                    return Err(format!(
                        "Bitmap '{}' in a node with auto-generated name '{name}' can't be migrated",
                        first.name()
                    ));
                }
                for bm in bitmaps {
                    if bm.name().len() > MAX_ALIAS_LEN {
                        return Err(format!(
                            "Cannot migrate bitmap '{}' on node '{name}': Name is longer than {MAX_ALIAS_LEN} bytes",
                            bm.name()
                        ));
                    }
                    out.push(Outgoing {
                        node: name.to_string(),
                        node_alias: name.to_string(),
                        bitmap_alias: bm.name().to_string(),
                        bitmap: bm,
                        persistent: false,
                    });
                }
            }
        }
        Some(mapping) => {
            for n in mapping {
                let node = graph.find(&n.node_name).map_err(|_| {
                    format!("block-bitmap-mapping names node '{}', which does not exist here", n.node_name)
                })?;
                for b in &n.bitmaps {
                    let bm = node.bitmap(&b.name).map_err(|_| {
                        format!(
                            "block-bitmap-mapping names bitmap '{}' of node '{}', which does not exist here",
                            b.name, n.node_name
                        )
                    })?;
                    out.push(Outgoing {
                        node: n.node_name.clone(),
                        bitmap: bm,
                        node_alias: n.alias.clone(),
                        bitmap_alias: b.alias.clone(),
                        persistent: transform_persistent(b).unwrap_or(false),
                    });
                }
            }
        }
    }
    for o in &out {
        if o.bitmap.is_busy() {
            return Err(format!("Cannot migrate {}: it is in use by another operation", o.whose()));
        }
        if o.persistent {
            return Err(persistent_refused(&o.whose()));
        }
    }
    Ok(out)
}

/// The bitmaps an outgoing attempt carries, busy for as long as it runs (as
/// QEMU's are): user commands and NBD exports cannot change, remove or take
/// them meanwhile. Dropping it makes them free again, after a success as
/// after a failure (the source keeps them, unchanged).
#[derive(Debug)]
pub struct Claimed(Vec<Outgoing>);

impl Claimed {
    pub fn bitmaps(&self) -> &[Outgoing] {
        &self.0
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        for o in &self.0 {
            o.bitmap.set_busy(false);
        }
    }
}

/// [`outgoing`], each bitmap then marked busy; `Err` (nothing stays
/// marked) when one is, or became, busy.
pub fn claim(graph: &Graph, mapping: Option<&[BitmapMigrationNodeAlias]>) -> Result<Claimed, String> {
    let mut held = Claimed(Vec::new());
    for o in outgoing(graph, mapping)? {
        if !o.bitmap.try_claim() {
            return Err(format!("Cannot migrate {}: it is in use by another operation", o.whose()));
        }
        held.0.push(o);
    }
    Ok(held)
}

fn transform_persistent(b: &BitmapMigrationBitmapAlias) -> Option<bool> {
    b.transform.as_ref().and_then(|t| t.persistent)
}

fn persistent_refused(whose: &str) -> String {
    format!("{whose} would be persistent: persistent bitmaps are not supported yet (baton has no qcow2)")
}

/// One bitmap being received: its header, where it goes, the bytes so far.
#[derive(Debug)]
struct Pending {
    meta: BitmapMeta,
    /// This side's node and bitmap names, and whether it would be persistent.
    node: String,
    name: String,
    persistent: bool,
    bits: Vec<u8>,
}

/// The BITMAPS sections of one incoming attempt, collected in order: each
/// bitmap's chunks contiguous from byte 0, each with the same header; every
/// bitmap complete by END ([`Incoming::finish`]). Its first section already
/// says where it goes (through this side's mapping) and must cover that
/// node's size, so what is held is bounded by this side's own disks.
#[derive(Debug, Default)]
pub struct Incoming {
    /// In arrival order; the index by (node alias, bitmap alias) is `at`.
    pending: Vec<Pending>,
    at: HashMap<(String, String), usize>,
}

impl Incoming {
    /// Take one section, for `graph`'s nodes under `mapping`; `Err` names
    /// the bitmap and what is wrong.
    pub fn take(
        &mut self,
        graph: &Graph,
        mapping: Option<&[BitmapMigrationNodeAlias]>,
        c: BitmapChunk,
    ) -> Result<(), String> {
        let key = (c.meta.node.clone(), c.meta.bitmap.clone());
        let whose = format!("bitmap '{}' of node '{}'", c.meta.bitmap, c.meta.node);
        let Some(&i) = self.at.get(&key) else {
            if c.first != 0 {
                return Err(format!("{whose}: its bits start at byte {}, not 0", c.first));
            }
            let (node, name, transform) = resolve(mapping, &c.meta.node, &c.meta.bitmap)?;
            let whose = format!("bitmap '{name}' of node '{node}'");
            let n = graph.find(&node).map_err(|_| format!("{whose}: there is no node '{node}' here"))?;
            if n.length() != c.meta.size {
                return Err(format!("{whose}: it covers {} bytes, the node here has {}", c.meta.size, n.length()));
            }
            let persistent = transform.unwrap_or(c.meta.persistent);
            if persistent {
                return Err(persistent_refused(&whose));
            }
            self.at.insert(key, self.pending.len());
            self.pending.push(Pending { meta: c.meta, node, name, persistent, bits: c.bits });
            return Ok(());
        };
        let p = &mut self.pending[i];
        if p.meta != c.meta {
            return Err(format!("{whose}: a section says other things of it than its first one"));
        }
        let have = p.bits.len() as u64;
        if have == p.meta.byte_len() {
            return Err(format!("{whose}: its bits arrived twice"));
        }
        if c.first != have {
            return Err(format!("{whose}: bytes from {} arrived after {have} of them", c.first));
        }
        p.bits.extend_from_slice(&c.bits);
        Ok(())
    }

    /// Every bitmap, whole; `Err` names the first one that is not.
    fn finish(self) -> Result<Vec<Pending>, String> {
        if let Some(p) = self.pending.iter().find(|p| p.bits.len() as u64 != p.meta.byte_len()) {
            return Err(format!(
                "the stream ended with bitmap '{}' of node '{}' incomplete ({} of its {} bytes of bits)",
                p.meta.bitmap,
                p.meta.node,
                p.bits.len(),
                p.meta.byte_len()
            ));
        }
        Ok(self.pending)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// A bitmap an incoming attempt created: removed again on rollback.
pub type Created = (String, Arc<DirtyBitmap>);

/// Create the received bitmaps on this side's nodes (where [`Incoming::take`]
/// resolved them). Each one created is pushed to `created` at once, so a
/// failure part way leaves the caller all it must remove ([`remove`]).
pub fn apply(graph: &Graph, incoming: Incoming, created: &mut Vec<Created>) -> Result<(), String> {
    for p in incoming.finish()? {
        let (node, name) = (p.node, p.name);
        let whose = format!("bitmap '{name}' of node '{node}'");
        if p.persistent {
            return Err(persistent_refused(&whose));
        }
        let bm = DirtyBitmap::import(&name, p.meta.size, u64::from(p.meta.granularity), p.meta.enabled, &p.bits)
            .map_err(|e| format!("{whose}: {e}"))?;
        let bm = graph.bitmap_adopt(&node, bm).map_err(|e| match e {
            block::BlockError::BitmapExists { .. } => {
                format!("Bitmap with the same name ('{name}') already exists on node '{node}' of the destination")
            }
            e => format!("{whose}: {}", e.chain()),
        })?;
        created.push((node, bm));
    }
    Ok(())
}

/// The destination's (node, bitmap, transform.persistent) for a bitmap that
/// arrived under (`node_alias`, `bitmap_alias`).
fn resolve(
    mapping: Option<&[BitmapMigrationNodeAlias]>,
    node_alias: &str,
    bitmap_alias: &str,
) -> Result<(String, String, Option<bool>), String> {
    let Some(mapping) = mapping else {
        return Ok((node_alias.to_string(), bitmap_alias.to_string(), None));
    };
    let n = mapping.iter().find(|n| n.alias == node_alias).ok_or_else(|| {
        format!("Unknown node alias '{node_alias}' (bitmap alias '{bitmap_alias}') in block-bitmap-mapping")
    })?;
    let b = n.bitmaps.iter().find(|b| b.alias == bitmap_alias).ok_or_else(|| {
        format!(
            "Unknown bitmap alias '{bitmap_alias}' on node '{}' (alias '{node_alias}') in block-bitmap-mapping",
            n.node_name
        )
    })?;
    Ok((n.node_name.clone(), b.name.clone(), transform_persistent(b)))
}

/// Remove the bitmaps an attempt created (newest first), and only those.
pub fn remove(graph: &Graph, created: &mut Vec<Created>) {
    while let Some((node, bm)) = created.pop() {
        if !graph.bitmap_detach(&node, &bm) {
            tracing::warn!(node = %node, bitmap = %bm.name(), "rolling back: the migrated bitmap was already gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::params::BitmapMigrationBitmapAliasTransform;

    const MIB: u64 = 1 << 20;

    fn node(name: &str, alias: &str, bitmaps: &[(&str, &str)]) -> BitmapMigrationNodeAlias {
        BitmapMigrationNodeAlias {
            node_name: name.into(),
            alias: alias.into(),
            bitmaps: bitmaps
                .iter()
                .map(|(n, a)| BitmapMigrationBitmapAlias { name: (*n).into(), alias: (*a).into(), transform: None })
                .collect(),
        }
    }

    #[test]
    fn a_mapping_follows_qemus_set_time_rules() {
        let ok = vec![node("disk0", "d0", &[("b0", "x"), ("b1", "y")]), node("disk1", "d1", &[("b0", "x")])];
        assert_eq!(check_mapping(&ok), Ok(()));
        assert_eq!(check_mapping(&[]), Ok(()));
        let cases: Vec<(Vec<BitmapMigrationNodeAlias>, &str)> = vec![
            (vec![node("n", "1abc", &[])], "The node alias '1abc' is not well-formed"),
            (vec![node("n", "", &[])], "The node alias '' is not well-formed"),
            (vec![node("n", "a b", &[])], "The node alias 'a b' is not well-formed"),
            (vec![node("n", &"a".repeat(256), &[])], "is longer than 255 bytes"),
            (vec![node(&"n".repeat(32), "a", &[])], "is longer than 31 bytes"),
            (vec![node("n", "a", &[("b", &"x".repeat(256))])], "is longer than 255 bytes"),
            (vec![node("n", "a", &[(&"b".repeat(1024), "x")])], "is longer than 1023 bytes"),
            (vec![node("n", "a", &[]), node("n", "b", &[])], "The node name 'n' is mapped twice"),
            (vec![node("n", "a", &[]), node("m", "a", &[])], "The node alias 'a' is used twice"),
            (vec![node("n", "a", &[("b", "x"), ("b", "y")])], "The bitmap 'n'/'b' is mapped twice"),
            (vec![node("n", "a", &[("b", "x"), ("c", "x")])], "The bitmap alias 'a'/'x' is used twice"),
        ];
        for (m, want) in cases {
            let e = check_mapping(&m).unwrap_err();
            assert!(e.contains(want), "{e} (want {want})");
        }
        // The longest of each is fine; an alias may contain '-', '.', '_'.
        let longest =
            node(&"n".repeat(31), &format!("a{}", "-._1".repeat(63)), &[(&"b".repeat(1023), &"x".repeat(255))]);
        assert_eq!(check_mapping(&[longest]), Ok(()));
    }

    async fn graph(nodes: &[&str]) -> Graph {
        let g = Graph::new();
        for n in nodes {
            g.blockdev_add(&serde_json::json!({"driver": "null-co", "node-name": n, "size": MIB})).await.unwrap();
        }
        g
    }

    fn names(out: &[Outgoing]) -> Vec<(String, String, String, String)> {
        out.iter()
            .map(|o| (o.node.clone(), o.bitmap.name().to_string(), o.node_alias.clone(), o.bitmap_alias.clone()))
            .collect()
    }

    #[tokio::test]
    async fn the_source_sends_every_named_bitmap_or_exactly_the_mapped_ones() {
        let g = graph(&["disk0", "disk1", "other"]).await;
        g.bitmap_add("disk0", "b0", None, false).unwrap();
        g.bitmap_add("disk0", "b1", Some(4096), true).unwrap();
        g.bitmap_add("disk1", "c", None, false).unwrap();
        let s = |a: &str| a.to_string();
        // No mapping: every bitmap, under its own names.
        let all = outgoing(&g, None).unwrap();
        assert_eq!(
            names(&all),
            vec![
                (s("disk0"), s("b0"), s("disk0"), s("b0")),
                (s("disk0"), s("b1"), s("disk0"), s("b1")),
                (s("disk1"), s("c"), s("disk1"), s("c"))
            ]
        );
        // A mapping: only what it names, under its aliases.
        let m = vec![node("disk0", "vda", &[("b1", "inc")])];
        assert_eq!(names(&outgoing(&g, Some(&m)).unwrap()), vec![(s("disk0"), s("b1"), s("vda"), s("inc"))]);
        let (meta, bits) = outgoing(&g, Some(&m)).unwrap()[0].export().unwrap();
        assert_eq!(
            (meta.node.as_str(), meta.bitmap.as_str(), meta.granularity, meta.enabled),
            ("vda", "inc", 4096, false)
        );
        assert_eq!((meta.size, bits.len()), (MIB, 32));
        // A mapping naming what does not exist, a busy bitmap, a persistent one: refused by name.
        let e = outgoing(&g, Some(&[node("nosuch", "a", &[])])).unwrap_err();
        assert_eq!(e, "block-bitmap-mapping names node 'nosuch', which does not exist here");
        let e = outgoing(&g, Some(&[node("disk1", "a", &[("zz", "z")])])).unwrap_err();
        assert_eq!(e, "block-bitmap-mapping names bitmap 'zz' of node 'disk1', which does not exist here");
        let mut p = node("disk1", "a", &[("c", "c")]);
        p.bitmaps[0].transform = Some(BitmapMigrationBitmapAliasTransform { persistent: Some(true) });
        let e = outgoing(&g, Some(&[p.clone()])).unwrap_err();
        assert!(e.starts_with("bitmap 'c' of node 'disk1' would be persistent"), "{e}");
        p.bitmaps[0].transform = Some(BitmapMigrationBitmapAliasTransform { persistent: Some(false) });
        assert!(outgoing(&g, Some(&[p])).is_ok());
        g.find("disk1").unwrap().bitmap("c").unwrap().set_busy(true);
        let e = outgoing(&g, None).unwrap_err();
        assert_eq!(e, "Cannot migrate bitmap 'c' of node 'disk1': it is in use by another operation");
        // Unmapped, the busy one stays behind and does not matter.
        assert!(outgoing(&g, Some(&m)).is_ok());
        // An attempt holds what it carries (busy) until it ends.
        let held = claim(&g, Some(&m)).unwrap();
        assert_eq!(names(held.bitmaps()), vec![(s("disk0"), s("b1"), s("vda"), s("inc"))]);
        assert!(g.find("disk0").unwrap().bitmap("b1").unwrap().is_busy());
        assert!(claim(&g, Some(&m)).unwrap_err().ends_with("it is in use by another operation"));
        drop(held);
        assert!(!g.find("disk0").unwrap().bitmap("b1").unwrap().is_busy());
        assert!(claim(&g, Some(&m)).is_ok(), "released when dropped");
        // Without a mapping a name must fit the stream.
        g.find("disk1").unwrap().bitmap("c").unwrap().set_busy(false);
        g.bitmap_add("other", &"l".repeat(256), None, false).unwrap();
        let e = outgoing(&g, None).unwrap_err();
        assert!(e.ends_with("on node 'other': Name is longer than 255 bytes"), "{e}");
    }

    fn chunk(node: &str, bitmap: &str, first: u64, bits: &[u8]) -> BitmapChunk {
        let meta = BitmapMeta {
            node: node.into(),
            bitmap: bitmap.into(),
            granularity: 65536,
            enabled: true,
            persistent: false,
            size: MIB,
        };
        BitmapChunk { meta, first, bits: bits.to_vec() }
    }

    #[tokio::test]
    async fn the_destination_takes_each_bitmaps_chunks_in_order_and_whole() {
        // 1 MiB at 64 KiB: 16 bits, 2 bytes.
        let g = graph(&["disk"]).await;
        let mut inc = Incoming::default();
        assert!(inc.is_empty());
        inc.take(&g, None, chunk("disk", "b", 0, &[1])).unwrap();
        inc.take(&g, None, chunk("disk", "c", 0, &[2, 3])).unwrap();
        let e = inc.take(&g, None, chunk("disk", "c", 2, &[])).unwrap_err();
        assert_eq!(e, "bitmap 'c' of node 'disk': its bits arrived twice");
        let e = inc.take(&g, None, chunk("disk", "b", 0, &[1])).unwrap_err();
        assert_eq!(e, "bitmap 'b' of node 'disk': bytes from 0 arrived after 1 of them");
        let mut other = chunk("disk", "b", 1, &[1]);
        other.meta.enabled = false;
        assert!(inc.take(&g, None, other).unwrap_err().contains("other things of it than its first one"));
        let e = Incoming::default().take(&g, None, chunk("disk", "b", 1, &[1])).unwrap_err();
        assert_eq!(e, "bitmap 'b' of node 'disk': its bits start at byte 1, not 0");
        // Where it goes is known from its first section: a node of that size here.
        let e = Incoming::default().take(&g, None, chunk("nosuch", "b", 0, &[0, 0])).unwrap_err();
        assert_eq!(e, "bitmap 'b' of node 'nosuch': there is no node 'nosuch' here");
        let mut big = chunk("disk", "big", 0, &[0, 0, 0, 0]);
        big.meta.size = 2 * MIB;
        let e = Incoming::default().take(&g, None, big).unwrap_err();
        assert_eq!(e, "bitmap 'big' of node 'disk': it covers 2097152 bytes, the node here has 1048576");
        let e = inc.finish().unwrap_err();
        assert_eq!(e, "the stream ended with bitmap 'b' of node 'disk' incomplete (1 of its 2 bytes of bits)");
    }

    fn received(
        g: &Graph,
        mapping: Option<&[BitmapMigrationNodeAlias]>,
        chunks: Vec<BitmapChunk>,
    ) -> Result<Incoming, String> {
        let mut inc = Incoming::default();
        for c in chunks {
            inc.take(g, mapping, c)?;
        }
        Ok(inc)
    }

    #[tokio::test]
    async fn the_destination_creates_under_its_own_names_and_removes_exactly_those() {
        let g = graph(&["vda", "vdb"]).await;
        let m = vec![node("vda", "d0", &[("inc0", "b0")]), node("vdb", "d1", &[("x", "y")])];
        let mut created = Vec::new();
        let inc = received(&g, Some(&m), vec![chunk("d0", "b0", 0, &[0x81, 0x80])]).unwrap();
        apply(&g, inc, &mut created).unwrap();
        let bm = g.find("vda").unwrap().bitmap("inc0").unwrap();
        assert_eq!(bm.export(), (MIB, vec![0x81, 0x80]));
        assert_eq!((bm.granularity(), bm.is_enabled(), bm.dirty_granules()), (65536, true, 3));
        // Without a mapping the names are the node's and the bitmap's own.
        apply(&g, received(&g, None, vec![chunk("vdb", "plain", 0, &[0, 0])]).unwrap(), &mut created).unwrap();
        assert!(g.find("vdb").unwrap().bitmap("plain").is_ok());
        // A user's bitmap of another name stays through the rollback.
        g.bitmap_add("vda", "mine", None, false).unwrap();
        remove(&g, &mut created);
        assert!(created.is_empty());
        assert!(g.find("vda").unwrap().bitmap("inc0").is_err() && g.find("vdb").unwrap().bitmap("plain").is_err());
        assert!(g.find("vda").unwrap().bitmap("mine").is_ok());

        // Every refusal names the bitmap; what was created before it is in `created`.
        let refused = |mapping: Option<&[BitmapMigrationNodeAlias]>, chunks: Vec<BitmapChunk>| {
            let mut created = Vec::new();
            let e = received(&g, mapping, chunks).and_then(|inc| apply(&g, inc, &mut created)).unwrap_err();
            remove(&g, &mut created);
            e
        };
        let e = refused(Some(&m), vec![chunk("dz", "b0", 0, &[0, 0])]);
        assert_eq!(e, "Unknown node alias 'dz' (bitmap alias 'b0') in block-bitmap-mapping");
        let e = refused(Some(&m), vec![chunk("d0", "bz", 0, &[0, 0])]);
        assert_eq!(e, "Unknown bitmap alias 'bz' on node 'vda' (alias 'd0') in block-bitmap-mapping");
        let e = refused(None, vec![chunk("vda", "ok", 0, &[0, 0]), chunk("vda", "mine", 0, &[0, 0])]);
        assert_eq!(e, "Bitmap with the same name ('mine') already exists on node 'vda' of the destination");
        assert!(g.find("vda").unwrap().bitmap("ok").is_err(), "the one created before is gone");
        let e = refused(None, vec![chunk("vda", "tail", 0, &[0, 0x80]), chunk("vda", "tail2", 0, &[1])]);
        assert!(e.contains("incomplete"), "{e}");
        let mut p = chunk("vda", "p", 0, &[0, 0]);
        p.meta.persistent = true;
        assert!(refused(None, vec![p.clone()]).starts_with("bitmap 'p' of node 'vda' would be persistent"));
        // transform.persistent on this side overrides the flag, both ways.
        let mut t = node("vda", "d0", &[("p", "p")]);
        t.bitmaps[0].transform = Some(BitmapMigrationBitmapAliasTransform { persistent: Some(false) });
        let mut created = Vec::new();
        p.meta.node = "d0".into();
        apply(&g, received(&g, Some(&[t.clone()]), vec![p.clone()]).unwrap(), &mut created).unwrap();
        remove(&g, &mut created);
        t.bitmaps[0].transform = Some(BitmapMigrationBitmapAliasTransform { persistent: Some(true) });
        p.meta.persistent = false;
        assert!(refused(Some(&[t]), vec![p]).contains("would be persistent"));
        assert_eq!(g.find("vda").unwrap().bitmaps().len(), 1, "only the user's own is left");
    }
}
