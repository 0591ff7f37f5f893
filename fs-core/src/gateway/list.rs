//! ListObjects over a directory tree, in S3 order: by the bytes of the whole key.
//!
//! A directory's entries come from the metadata engine in name order, but S3 order differs:
//! the keys below directory `a` (`a/…`) sort after a sibling file `a-b`, since `-` < `/`.
//! Each directory is therefore walked in the order of its entries' *sort keys* (a file's
//! name, a directory's name followed by `/`), which is the order of the keys below them.
//! A directory entry is held back (in a small heap) until the names read from the engine pass
//! its sort key. Resuming after a key (`start-after`, continuation tokens) does not read a
//! directory from its start: the entries named by the prefixes of the key's component that
//! can sort after it are looked up one by one, and the rest is read from the component on.
//!
//! With the `/` delimiter a directory holding at least one object is a common prefix and is
//! not walked; empty directories (no object below them) list as nothing, as in S3. Other
//! delimiters walk the tree and group the keys.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::error::Result;

/// One entry of a directory as the listing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeEntry {
    pub name: Vec<u8>,
    pub id: u64,
    pub dir: bool,
}

/// What the listing needs of a directory tree. Implementations leave out entries that are
/// not objects or directories, names that are not UTF-8, and reserved names.
pub trait Tree {
    /// Entries of `dir` with names after `after` (from the start when `None`), in byte order
    /// of names, from at most `limit` names read.
    fn entries(&self, dir: u64, after: Option<&[u8]>, limit: usize) -> Result<Entries>;
    /// The entry `name` of `dir`, if any.
    fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<TreeEntry>>;
}

/// A batch of directory entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entries {
    pub entries: Vec<TreeEntry>,
    /// The last name read, to continue after; `None` when the directory has no more.
    pub next: Option<Vec<u8>>,
}

/// An item of a listing page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An object and the id (inode) of its file.
    Object { key: String, id: u64 },
    /// A common prefix (ends with the delimiter).
    Prefix(String),
}

impl Item {
    /// The key or prefix, which is also where the next page starts after.
    pub fn name(&self) -> &str {
        match self {
            Item::Object { key, .. } => key,
            Item::Prefix(p) => p,
        }
    }
}

/// A page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Item>,
    /// More items follow the last one.
    pub truncated: bool,
}

/// What to list.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub prefix: &'a str,
    pub delimiter: Option<&'a str>,
    /// List only what sorts after this (start-after, continuation token, marker).
    pub after: Option<&'a str>,
    pub max: usize,
}

/// Entries read from a directory per engine request.
const PAGE: usize = 1000;

/// An entry held back until its place in sort-key order: (sort key, id, is a directory,
/// name).
type Held = (Vec<u8>, u64, bool, Vec<u8>);

enum Class {
    Include,
    /// A directory whose subtree is walked after this key (relative to it).
    Descend(Vec<u8>),
    Exclude,
}

fn sort_key(e: &TreeEntry) -> Vec<u8> {
    let mut s = e.name.clone();
    if e.dir {
        s.push(b'/');
    }
    s
}

/// Where `e` stands relative to the exclusive bound `b` (relative to its directory).
fn classify(e: &TreeEntry, b: Option<&[u8]>) -> Class {
    let Some(b) = b else {
        return Class::Include;
    };
    let s = sort_key(e);
    if e.dir && b.starts_with(&s) {
        Class::Descend(b[s.len()..].to_vec())
    } else if s.as_slice() > b {
        Class::Include
    } else {
        Class::Exclude
    }
}

struct Walker<'a, T: Tree + ?Sized> {
    tree: &'a T,
    q: Query<'a>,
    /// The delimiter is `/`: directories are common prefixes, not walked.
    slash: bool,
    page: Page,
    last_prefix: Option<String>,
}

impl<T: Tree + ?Sized> Walker<'_, T> {
    /// Add an item; false when the page is full (and then `truncated` is set).
    fn push(&mut self, item: Item) -> bool {
        if self.page.items.len() == self.q.max {
            self.page.truncated = true;
            return false;
        }
        self.page.items.push(item);
        true
    }

    /// An object key found by the walk (grouped when a delimiter other than `/` is used).
    fn object(&mut self, key: String, id: u64) -> bool {
        if let Some(d) = self.q.delimiter.filter(|_| !self.slash)
            && let Some(pos) = key[self.q.prefix.len()..].find(d)
        {
            let cp = key[..self.q.prefix.len() + pos + d.len()].to_string();
            if self.last_prefix.as_deref() == Some(cp.as_str())
                || self.q.after.is_some_and(|a| cp.as_str() <= a)
            {
                return true;
            }
            self.last_prefix = Some(cp.clone());
            return self.push(Item::Prefix(cp));
        }
        self.push(Item::Object { key, id })
    }

    /// Whether any object lies below directory `dir`.
    fn has_object(&self, dir: u64) -> Result<bool> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let batch = self.tree.entries(dir, after.as_deref(), PAGE)?;
            if batch.entries.iter().any(|e| !e.dir) {
                return Ok(true);
            }
            for e in &batch.entries {
                if self.has_object(e.id)? {
                    return Ok(true);
                }
            }
            match batch.next {
                Some(n) => after = Some(n),
                None => return Ok(false),
            }
        }
    }

    /// Emit one entry of directory `dirkey` (in sort-key order); false to stop.
    fn emit(&mut self, dirkey: &str, e: TreeEntry, class: Class) -> Result<bool> {
        let name = String::from_utf8_lossy(&e.name);
        let key = format!("{dirkey}{name}");
        match (e.dir, class) {
            (_, Class::Exclude) => Ok(true),
            (false, _) => Ok(self.object(key, e.id)),
            (true, Class::Include) if self.slash => {
                if self.has_object(e.id)? {
                    Ok(self.push(Item::Prefix(format!("{key}/"))))
                } else {
                    Ok(true)
                }
            }
            // The bound lies inside this common prefix: it was listed already.
            (true, Class::Descend(_)) if self.slash => Ok(true),
            (true, Class::Include) => self.walk(e.id, &format!("{key}/"), None, b""),
            (true, Class::Descend(sub)) => self.walk(e.id, &format!("{key}/"), Some(&sub), b""),
        }
    }

    /// Walk directory `dir` (whose keys start with `dirkey`): entries whose names start with
    /// `nprefix` and whose keys sort after the bound `b` (relative to `dirkey`).
    fn walk(&mut self, dir: u64, dirkey: &str, b: Option<&[u8]>, nprefix: &[u8]) -> Result<bool> {
        let mut heap: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
        let hold = |heap: &mut BinaryHeap<_>, e: TreeEntry| {
            heap.push(Reverse((sort_key(&e), e.id, e.dir, e.name)));
        };
        // Where reading the directory starts, and the entries before it that may still sort
        // after the bound: those named by prefixes of the bound's first component.
        let start: Option<Vec<u8>> = match b {
            Some(b) if b >= nprefix => {
                let comp = b.split(|&c| c == b'/').next().unwrap_or(b);
                for k in 1..=comp.len() {
                    let q = &comp[..k];
                    // q/ sorts after the bound only if the bound continues below '/' there.
                    let next = b.get(k).copied();
                    let candidate = k == comp.len() || next.is_some_and(|c| c < b'/');
                    if candidate
                        && q.starts_with(nprefix)
                        && let Some(e) = self.tree.lookup(dir, q)?
                    {
                        hold(&mut heap, e);
                    }
                }
                Some(comp.to_vec())
            }
            _ if !nprefix.is_empty() => {
                if let Some(e) = self.tree.lookup(dir, nprefix)? {
                    hold(&mut heap, e);
                }
                Some(nprefix.to_vec())
            }
            _ => None,
        };
        let mut after = start;
        'pages: loop {
            let batch = self.tree.entries(dir, after.as_deref(), PAGE)?;
            for e in batch.entries {
                if !e.name.starts_with(nprefix) {
                    break 'pages;
                }
                // Entries held back that sort before this name come first: nothing read
                // later can sort before them.
                while heap.peek().is_some_and(|Reverse(h)| h.0 < e.name) {
                    let Reverse((_, id, isdir, name)) = heap.pop().expect("peeked");
                    let he = TreeEntry {
                        name,
                        id,
                        dir: isdir,
                    };
                    let class = classify(&he, b);
                    if !self.emit(dirkey, he, class)? {
                        return Ok(false);
                    }
                }
                hold(&mut heap, e);
            }
            match batch.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        while let Some(Reverse((_, id, isdir, name))) = heap.pop() {
            let he = TreeEntry {
                name,
                id,
                dir: isdir,
            };
            let class = classify(&he, b);
            if !self.emit(dirkey, he, class)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// One page of the objects and common prefixes of the tree below `root`.
pub fn list<T: Tree + ?Sized>(tree: &T, root: u64, q: Query) -> Result<Page> {
    let mut w = Walker {
        tree,
        q,
        slash: q.delimiter == Some("/"),
        page: Page::default(),
        last_prefix: None,
    };
    if q.max == 0 {
        return Ok(w.page);
    }
    // The directory the prefix lies in, and the part of the prefix inside it.
    let (dirpart, nprefix) = match q.prefix.rfind('/') {
        Some(i) => (&q.prefix[..=i], &q.prefix[i + 1..]),
        None => ("", q.prefix),
    };
    let mut dir = root;
    for comp in dirpart.split('/').filter(|c| !c.is_empty()) {
        match tree.lookup(dir, comp.as_bytes())? {
            Some(e) if e.dir => dir = e.id,
            _ => return Ok(w.page),
        }
    }
    if dirpart.split('/').rev().skip(1).any(|c| c.is_empty()) {
        // `a//b`: no key has an empty component.
        return Ok(w.page);
    }
    let bound = match q.after {
        Some(a) if a.starts_with(dirpart) => Some(&a.as_bytes()[dirpart.len()..]),
        Some(a) if a < dirpart => None,
        Some(_) => return Ok(w.page),
        None => None,
    };
    w.walk(dir, dirpart, bound, nprefix.as_bytes())?;
    Ok(w.page)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A directory tree in memory: id → (name → entry).
    #[derive(Default)]
    pub struct MemTree {
        dirs: BTreeMap<u64, BTreeMap<Vec<u8>, TreeEntry>>,
        next: u64,
        pub lookups: std::cell::Cell<usize>,
        pub reads: std::cell::Cell<usize>,
    }

    impl MemTree {
        pub fn new() -> MemTree {
            let mut t = MemTree {
                next: 2,
                ..Default::default()
            };
            t.dirs.insert(1, BTreeMap::new());
            t
        }

        fn child(&mut self, dir: u64, name: &str, is_dir: bool) -> u64 {
            if let Some(e) = self.dirs[&dir].get(name.as_bytes()) {
                assert_eq!(e.dir, is_dir, "{name} exists as the other kind");
                return e.id;
            }
            let id = self.next;
            self.next += 1;
            self.dirs.get_mut(&dir).unwrap().insert(
                name.as_bytes().to_vec(),
                TreeEntry {
                    name: name.as_bytes().to_vec(),
                    id,
                    dir: is_dir,
                },
            );
            if is_dir {
                self.dirs.insert(id, BTreeMap::new());
            }
            id
        }

        /// Add a file at `key` (directories made as needed); false if it cannot exist
        /// (a component is already a file, or the key already is a directory).
        pub fn add(&mut self, key: &str) -> bool {
            let parts: Vec<&str> = key.split('/').collect();
            let mut dir = 1;
            for (i, p) in parts.iter().enumerate() {
                let last = i + 1 == parts.len();
                if let Some(e) = self.dirs[&dir].get(p.as_bytes()) {
                    if e.dir == last {
                        return false;
                    }
                    if last {
                        return true;
                    }
                    dir = e.id;
                    continue;
                }
                dir = self.child(dir, p, !last);
            }
            true
        }

        /// An empty directory at `path`.
        pub fn mkdir(&mut self, path: &str) {
            let mut dir = 1;
            for p in path.split('/') {
                if self.dirs[&dir].get(p.as_bytes()).is_some_and(|e| !e.dir) {
                    return;
                }
                dir = self.child(dir, p, true);
            }
        }
    }

    impl Tree for MemTree {
        fn entries(&self, dir: u64, after: Option<&[u8]>, limit: usize) -> Result<Entries> {
            self.reads.set(self.reads.get() + 1);
            let entries: Vec<TreeEntry> = self.dirs[&dir]
                .values()
                .filter(|e| after.is_none_or(|a| e.name.as_slice() > a))
                .take(limit)
                .cloned()
                .collect();
            let next = (entries.len() == limit).then(|| entries[limit - 1].name.clone());
            Ok(Entries { entries, next })
        }
        fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<TreeEntry>> {
            self.lookups.set(self.lookups.get() + 1);
            Ok(self.dirs[&dir].get(name).cloned())
        }
    }

    /// The same listing from a sorted list of every key.
    fn model(keys: &[String], q: Query) -> Page {
        let mut items: Vec<Item> = Vec::new();
        let mut last_cp: Option<String> = None;
        for k in keys {
            if !k.starts_with(q.prefix) || q.after.is_some_and(|a| k.as_str() <= a) {
                continue;
            }
            let grouped = q.delimiter.and_then(|d| {
                k[q.prefix.len()..]
                    .find(d)
                    .map(|p| k[..q.prefix.len() + p + d.len()].to_string())
            });
            match grouped {
                Some(cp) => {
                    if last_cp.as_ref() != Some(&cp) && q.after.is_none_or(|a| cp.as_str() > a) {
                        items.push(Item::Prefix(cp.clone()));
                    }
                    last_cp = Some(cp);
                }
                None => items.push(Item::Object {
                    key: k.clone(),
                    id: 0,
                }),
            }
        }
        let truncated = items.len() > q.max;
        items.truncate(q.max);
        Page { items, truncated }
    }

    fn names(p: &Page) -> Vec<String> {
        p.items.iter().map(|i| i.name().to_string()).collect()
    }

    fn kinds(p: &Page) -> Vec<bool> {
        p.items
            .iter()
            .map(|i| matches!(i, Item::Prefix(_)))
            .collect()
    }

    fn check(tree: &MemTree, keys: &[String], q: Query) {
        let got = list(tree, 1, q).unwrap();
        let want = model(keys, q);
        assert_eq!(names(&got), names(&want), "{q:?}");
        assert_eq!(kinds(&got), kinds(&want), "{q:?}");
        assert_eq!(got.truncated, want.truncated, "{q:?}");
        // Paging through with the last item as the next bound gives the whole listing.
        if q.after.is_none() && q.max == usize::MAX {
            for max in [1, 2, 3, 7] {
                let mut all = Vec::new();
                let mut after: Option<String> = None;
                loop {
                    let p = list(
                        tree,
                        1,
                        Query {
                            after: after.as_deref(),
                            max,
                            ..q
                        },
                    )
                    .unwrap();
                    all.extend(names(&p));
                    if !p.truncated {
                        break;
                    }
                    after = Some(p.items.last().unwrap().name().to_string());
                }
                assert_eq!(all, names(&want), "paged by {max}: {q:?}");
            }
        }
    }

    #[test]
    fn keys_list_in_byte_order_across_directories() {
        let mut t = MemTree::new();
        let mut keys = Vec::new();
        for k in [
            "a/b", "a-b", "a.c", "a0", "ab/c", "a", "b/x/y", "b/x-y", "b/x.y", "b/x/z", "b-",
        ] {
            if t.add(k) {
                keys.push(k.to_string());
            }
        }
        t.mkdir("empty/deeper");
        t.mkdir("b/void");
        keys.sort();
        keys.dedup();
        let all = list(
            &t,
            1,
            Query {
                prefix: "",
                delimiter: None,
                after: None,
                max: usize::MAX,
            },
        )
        .unwrap();
        // `a` cannot be both a file and a directory: the first added (a/b) made it a dir.
        assert_eq!(
            names(&all),
            vec![
                "a-b", "a.c", "a/b", "a0", "ab/c", "b-", "b/x-y", "b/x.y", "b/x/y", "b/x/z"
            ]
        );
        let top = list(
            &t,
            1,
            Query {
                prefix: "",
                delimiter: Some("/"),
                after: None,
                max: usize::MAX,
            },
        )
        .unwrap();
        assert_eq!(
            names(&top),
            vec!["a-b", "a.c", "a/", "a0", "ab/", "b-", "b/"],
            "empty directories are not common prefixes"
        );
        for q in [
            ("", None),
            ("", Some("/")),
            ("a", Some("/")),
            ("a/", Some("/")),
            ("b/x", Some("/")),
            ("b/x", None),
            ("b/", Some("x")),
            ("", Some("-")),
            ("b/x/", Some("/")),
            ("nothing", None),
            ("a//", None),
            ("empty/", Some("/")),
        ] {
            check(
                &t,
                &keys,
                Query {
                    prefix: q.0,
                    delimiter: q.1,
                    after: None,
                    max: usize::MAX,
                },
            );
        }
        for after in [
            "a", "a-b", "a/", "a/b", "a/a", "a0", "b/x", "b/x/", "b/x/y", "z", "",
        ] {
            for d in [None, Some("/")] {
                check(
                    &t,
                    &keys,
                    Query {
                        prefix: "",
                        delimiter: d,
                        after: Some(after),
                        max: usize::MAX,
                    },
                );
            }
        }
    }

    /// A deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
            v[(self.next() % v.len() as u64) as usize]
        }
    }

    #[test]
    fn random_trees_list_like_the_model() {
        // Names chosen to collide around '/': separators below it ('-', '.', ' ', '!') and
        // above it ('0', 'a').
        let parts = ["a", "a-", "a.", "a0", "a b", "b", "!", "a-b", "ab", "é"];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..60 {
            let mut t = MemTree::new();
            let mut keys = Vec::new();
            for _ in 0..(5 + round % 25) {
                let depth = 1 + rng.next() % 3;
                let key: Vec<&str> = (0..depth).map(|_| rng.pick(&parts)).collect();
                let key = key.join("/");
                if t.add(&key) {
                    keys.push(key);
                }
            }
            if round % 3 == 0 {
                t.mkdir(&format!("{}/{}", rng.pick(&parts), rng.pick(&parts)));
            }
            keys.sort();
            keys.dedup();
            let prefixes = ["", "a", "a-", "a/", "a/a", "b/", "é", "a b/", "z"];
            let delims = [None, Some("/"), Some("-"), Some("a")];
            for _ in 0..20 {
                let prefix = rng.pick(&prefixes);
                let delimiter = delims[(rng.next() % 4) as usize];
                let after_owned = if rng.next().is_multiple_of(2) && !keys.is_empty() {
                    let k = &keys[(rng.next() % keys.len() as u64) as usize];
                    // A key, a prefix of one, or a key with a separator appended.
                    Some(match rng.next() % 3 {
                        0 => k.clone(),
                        1 => k.chars().take(k.chars().count() / 2).collect(),
                        _ => format!("{k}/"),
                    })
                } else {
                    None
                };
                let max = if rng.next().is_multiple_of(3) {
                    usize::MAX
                } else {
                    1 + (rng.next() % 5) as usize
                };
                check(
                    &t,
                    &keys,
                    Query {
                        prefix,
                        delimiter,
                        after: after_owned.as_deref(),
                        max,
                    },
                );
            }
        }
    }

    #[test]
    fn resuming_in_a_large_directory_does_not_read_it_from_the_start() {
        let mut t = MemTree::new();
        for i in 0..5000 {
            t.add(&format!("d/f{i:05}"));
        }
        t.reads.set(0);
        let p = list(
            &t,
            1,
            Query {
                prefix: "d/",
                delimiter: Some("/"),
                after: Some("d/f04990"),
                max: 1000,
            },
        )
        .unwrap();
        assert_eq!(p.items.len(), 9);
        assert_eq!(p.items[0].name(), "d/f04991");
        assert!(!p.truncated);
        assert_eq!(
            t.reads.get(),
            1,
            "one read of the directory, from the bound on"
        );
        assert!(t.lookups.get() <= 4, "lookups: {}", t.lookups.get());
    }
}
