//! `--include` / `--exclude` rules, rsync-like: the rules are tried in the order given and
//! the first whose pattern matches decides; an entry no rule matches is included. An
//! excluded directory is not entered.
//!
//! Patterns: `*` matches within one name (no `/`), `**` matches across `/`, `?` one
//! character, `[abc]`/`[a-z]`/`[!a]` one character of a class. A pattern without `/`
//! matches the entry's name at any depth; a pattern with `/` matches its whole path from the
//! root of the sync (a leading `/` is allowed); a pattern ending with `/` matches only
//! directories (a directory filter).

use super::{Result, SyncError};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    include: bool,
    pattern: Vec<char>,
    /// Matched against the whole relative path (else the name).
    anchored: bool,
    dirs_only: bool,
}

/// The ordered rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    rules: Vec<Rule>,
}

impl Filter {
    /// Rules from `(include, pattern)` pairs in command-line order.
    pub fn new(rules: &[(bool, String)]) -> Result<Filter> {
        let mut out = Vec::new();
        for (include, p) in rules {
            let flag = if *include { "--include" } else { "--exclude" };
            if p.is_empty() || p == "/" {
                return Err(SyncError::Invalid(format!(
                    "{flag} {p:?}: empty pattern; give a glob like '*.tmp' or 'logs/'"
                )));
            }
            if p.matches('[').count() != p.matches(']').count() {
                return Err(SyncError::Invalid(format!(
                    "{flag} {p:?}: unbalanced '[' ']' in the pattern"
                )));
            }
            let dirs_only = p.ends_with('/');
            let body = p.trim_end_matches('/');
            let anchored = body.contains('/');
            let body = body.trim_start_matches('/');
            out.push(Rule {
                include: *include,
                pattern: body.chars().collect(),
                anchored,
                dirs_only,
            });
        }
        Ok(Filter { rules: out })
    }

    /// The `--include`/`--exclude` options of a command line, in their order (clap keeps
    /// each option's values apart; the order between the two decides here).
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Filter> {
        let mut rules = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            if a == "--" {
                break;
            }
            for (flag, include) in [("--include", true), ("--exclude", false)] {
                if a == flag {
                    if let Some(v) = it.next() {
                        rules.push((include, v));
                    }
                } else if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
                    rules.push((include, v.to_string()));
                }
            }
        }
        Filter::new(&rules)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the entry at `path` (relative, `/`-separated) is copied.
    pub fn included(&self, path: &str, is_dir: bool) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        let path_chars: Vec<char> = path.chars().collect();
        let name_chars: Vec<char> = name.chars().collect();
        for r in &self.rules {
            if r.dirs_only && !is_dir {
                continue;
            }
            let subject = if r.anchored { &path_chars } else { &name_chars };
            if glob(&r.pattern, subject) {
                return r.include;
            }
        }
        true
    }

    /// A short form for the state file (a changed filter starts a new pass).
    pub fn describe(&self) -> String {
        self.rules
            .iter()
            .map(|r| {
                format!(
                    "{}{}{}{}",
                    if r.include { '+' } else { '-' },
                    if r.anchored { "/" } else { "" },
                    r.pattern.iter().collect::<String>(),
                    if r.dirs_only { "/" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Whether `p` matches all of `s`.
fn glob(p: &[char], s: &[char]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some('*') if p.get(1) == Some(&'*') => {
            let rest = &p[2..];
            // `**/` also matches nothing ("a/**/b" matches "a/b").
            if rest.first() == Some(&'/') && glob(&rest[1..], s) {
                return true;
            }
            (0..=s.len()).any(|i| glob(rest, &s[i..]))
        }
        Some('*') => {
            let rest = &p[1..];
            for i in 0..=s.len() {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == '/' {
                    break;
                }
            }
            false
        }
        Some('?') => !s.is_empty() && s[0] != '/' && glob(&p[1..], &s[1..]),
        Some('[') => {
            let Some(end) = p.iter().skip(1).position(|c| *c == ']').map(|i| i + 1) else {
                return !s.is_empty() && s[0] == '[' && glob(&p[1..], &s[1..]);
            };
            let Some(&c) = s.first() else { return false };
            let mut class = &p[1..end];
            let negate = matches!(class.first(), Some('!') | Some('^'));
            if negate {
                class = &class[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && c != '/' && glob(&p[end + 1..], &s[1..])
        }
        Some(&c) => !s.is_empty() && s[0] == c && glob(&p[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(rules: &[(bool, &str)]) -> Filter {
        Filter::new(
            &rules
                .iter()
                .map(|(i, p)| (*i, p.to_string()))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn globs() {
        let g = |p: &str, s: &str| {
            glob(
                &p.chars().collect::<Vec<_>>(),
                &s.chars().collect::<Vec<_>>(),
            )
        };
        assert!(g("*.txt", "a.txt"));
        assert!(!g("*.txt", "a/b.txt"));
        assert!(g("**/*.txt", "a/b/c.txt"));
        assert!(g("a/**/b", "a/b"));
        assert!(g("a/**/b", "a/x/y/b"));
        assert!(g("f?o", "foo"));
        assert!(!g("f?o", "f/o"));
        assert!(g("[a-c]x", "bx"));
        assert!(!g("[!a-c]x", "bx"));
        assert!(g("[!a-c]x", "dx"));
        assert!(!g("*.txt", "a.txt.bak"));
    }

    #[test]
    fn first_match_wins_and_directory_rules() {
        let fl = f(&[(true, "keep.log"), (false, "*.log"), (false, "cache/")]);
        assert!(fl.included("a/keep.log", false));
        assert!(!fl.included("a/other.log", false));
        assert!(!fl.included("x/cache", true));
        assert!(
            fl.included("x/cache", false),
            "a directory rule skips files"
        );
        assert!(fl.included("x/data.bin", false));
        let anchored = f(&[(false, "/top/sub")]);
        assert!(!anchored.included("top/sub", true));
        assert!(anchored.included("other/top/sub", true));
        let only = f(&[(true, "*/"), (true, "*.txt"), (false, "*")]);
        assert!(only.included("d", true));
        assert!(only.included("d/a.txt", false));
        assert!(!only.included("d/a.bin", false));
    }

    #[test]
    fn order_from_the_command_line() {
        let args = [
            "strata",
            "sync",
            "--include=*.txt",
            "a",
            "--exclude",
            "*",
            "b",
        ];
        let fl = Filter::from_args(args.iter().map(|s| s.to_string())).unwrap();
        assert_eq!(fl.describe(), "+*.txt -*");
        assert!(Filter::new(&[(false, "a[b".into())]).is_err());
    }
}
