//! Host lists for launchers that start engines on other hosts: `--hosts h1:2,h2:3`,
//! `--hostfile F` (lines `host`, `host:n` or `host slots=n`, `#` comments), how many engines
//! they add up to, and how those engines are placed (contiguous start indices per host).
//!
//! Pure functions: every error is a message for a usage error (exit 2).

/// One host as listed, with its engine count if one was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub host: String,
    pub count: Option<usize>,
}

/// Engines to start on one host: start indices `first..first + n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub first: usize,
    pub n: usize,
}

/// `--hosts h1:2,h2:3` or `--hosts h1,h2`.
pub fn parse_hosts(list: &str) -> Result<Vec<HostSpec>, String> {
    let specs = list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(parse_entry).collect::<Result<Vec<_>, _>>()?;
    if specs.is_empty() {
        return Err("--hosts lists no host (for example --hosts h1:2,h2:3)".into());
    }
    check_counts(&specs)?;
    Ok(specs)
}

/// A host file: one host per line as `host`, `host:n` or `host slots=n` (Open MPI's
/// spelling); `#` starts a comment; blank lines are skipped.
pub fn parse_hostfile(text: &str) -> Result<Vec<HostSpec>, String> {
    let mut specs = Vec::new();
    for (no, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let spec = parse_hostfile_line(line).map_err(|e| format!("line {}: {e}", no + 1))?;
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err("it lists no host (lines `host`, `host:n` or `host slots=n`)".into());
    }
    check_counts(&specs)?;
    Ok(specs)
}

fn parse_hostfile_line(line: &str) -> Result<HostSpec, String> {
    let mut words = line.split_whitespace();
    let mut spec = parse_entry(words.next().unwrap_or(""))?;
    for w in words {
        if let Some(v) = w.strip_prefix("slots=") {
            if spec.count.is_some() {
                return Err(format!("{line:?} gives the engine count twice"));
            }
            spec.count = Some(parse_count(v, line)?);
        } else if w.starts_with("max_slots=") || w.starts_with("max-slots=") {
            // Open MPI's upper bound: says nothing about how many to start.
        } else {
            return Err(format!("{line:?}: expected `host`, `host:n` or `host slots=n`, not {w:?}"));
        }
    }
    Ok(spec)
}

/// `host`, `host:n`, `user@host:n`, `[v6addr]:n`; a bare IPv6 address is a host without count.
fn parse_entry(s: &str) -> Result<HostSpec, String> {
    let (host, count) = match s.rsplit_once(':') {
        Some((h, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => {
            (h, Some(parse_count(n, s)?))
        }
        _ => (s, None),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    check_host(host)?;
    Ok(HostSpec { host: host.to_string(), count })
}

fn parse_count(n: &str, whole: &str) -> Result<usize, String> {
    match n.parse::<usize>() {
        Ok(c) if c >= 1 => Ok(c),
        _ => Err(format!("{whole:?}: the engine count must be a number of at least 1")),
    }
}

/// A host name goes to ssh as an argument: it must not look like an option or hold spaces.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("empty host name".into());
    }
    if host.starts_with('-') {
        return Err(format!("host {host:?} must not start with '-'"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '\'' | '"' | '\\' | '/')) {
        return Err(format!("host {host:?} holds a character a host name cannot have"));
    }
    Ok(())
}

/// Counts for every host or for none.
fn check_counts(specs: &[HostSpec]) -> Result<(), String> {
    let with = specs.iter().filter(|s| s.count.is_some()).count();
    if with != 0 && with != specs.len() {
        return Err("give an engine count for every host (h1:2,h2:3) or for none (h1,h2 with -n)".into());
    }
    Ok(())
}

/// How many engines the hosts get: the sum of their counts (then `-n` must be absent or
/// equal), or `-n`, or one per listed host.
pub fn total(specs: &[HostSpec], n: Option<usize>) -> Result<usize, String> {
    if specs.iter().all(|s| s.count.is_some()) {
        let sum: usize = specs.iter().filter_map(|s| s.count).sum();
        return match n {
            Some(n) if n != sum => {
                Err(format!("-n {n} does not match the {sum} engines the host counts add up to; drop -n or make them agree"))
            }
            _ => Ok(sum),
        };
    }
    Ok(n.unwrap_or(specs.len()))
}

/// Engines per host for `n` engines in all: the hosts' own counts, or `n` spread round-robin
/// over the listed hosts. A host listed twice is one host (one connection) with both shares;
/// hosts are in order of first appearance; hosts that get none are left out.
pub fn spread(specs: &[HostSpec], n: usize) -> Vec<(String, usize)> {
    let k = specs.len().max(1);
    let mut out: Vec<(String, usize)> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let share = s.count.unwrap_or(n / k + usize::from(i < n % k));
        match out.iter_mut().find(|(h, _)| *h == s.host) {
            Some((_, c)) => *c += share,
            None => out.push((s.host.clone(), share)),
        }
    }
    out.retain(|(_, c)| *c > 0);
    out
}

/// [`spread`] with start indices from `first`, contiguous per host.
pub fn place(specs: &[HostSpec], n: usize, first: usize) -> Vec<Placement> {
    let mut next = first;
    spread(specs, n)
        .into_iter()
        .map(|(host, c)| {
            let p = Placement { host, first: next, n: c };
            next += c;
            p
        })
        .collect()
}

/// Does `host` name this machine (so a controller on 127.0.0.1 is reachable from it)?
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.rsplit('@').next().unwrap_or(host);
    h == "localhost" || h.starts_with("127.") || h == "::1"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, count: Option<usize>) -> HostSpec {
        HostSpec { host: host.into(), count }
    }

    #[test]
    fn hosts_with_and_without_counts() {
        assert_eq!(parse_hosts("h1:2,h2:3").unwrap(), vec![spec("h1", Some(2)), spec("h2", Some(3))]);
        assert_eq!(parse_hosts(" h1 , user@h2 ,").unwrap(), vec![spec("h1", None), spec("user@h2", None)]);
        assert_eq!(parse_hosts("[fe80::1]:2,10.0.0.2:1").unwrap(), vec![spec("fe80::1", Some(2)), spec("10.0.0.2", Some(1))]);
        assert_eq!(parse_hosts("fe80::1").unwrap(), vec![spec("fe80::1", None)]);
        assert!(parse_hosts("h1:2,h2").unwrap_err().contains("every host"));
        assert!(parse_hosts("h1:0").unwrap_err().contains("at least 1"));
        assert!(parse_hosts("-oProxyCommand=x").unwrap_err().contains("'-'"));
        assert!(parse_hosts("a b").is_err());
        assert!(parse_hosts(",").unwrap_err().contains("no host"));
    }

    #[test]
    fn hostfile_lines() {
        let text = "# cluster\nh1\n\nh2:3  # three\nh3 slots=4 max_slots=8\n";
        assert_eq!(parse_hostfile(text).unwrap_err(), "give an engine count for every host (h1:2,h2:3) or for none (h1,h2 with -n)");
        let text = "# cluster\nh1:1\n\nh2:3  # three\nh3 slots=4 max_slots=8\n";
        assert_eq!(parse_hostfile(text).unwrap(), vec![spec("h1", Some(1)), spec("h2", Some(3)), spec("h3", Some(4))]);
        assert_eq!(parse_hostfile("a\nb\n").unwrap(), vec![spec("a", None), spec("b", None)]);
        let e = parse_hostfile("a:1\nb slotz=2\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(parse_hostfile("a:1 slots=2").unwrap_err().contains("twice"));
        assert!(parse_hostfile("# nothing\n\n").unwrap_err().contains("no host"));
    }

    #[test]
    fn totals_follow_counts_or_n() {
        let counted = parse_hosts("h1:2,h2:3").unwrap();
        assert_eq!(total(&counted, None), Ok(5));
        assert_eq!(total(&counted, Some(5)), Ok(5));
        assert!(total(&counted, Some(4)).unwrap_err().contains("-n 4 does not match the 5"));
        let bare = parse_hosts("h1,h2").unwrap();
        assert_eq!(total(&bare, Some(5)), Ok(5));
        assert_eq!(total(&bare, None), Ok(2), "one engine per listed host");
    }

    #[test]
    fn round_robin_and_merging() {
        let bare = parse_hosts("h1,h2,h3").unwrap();
        assert_eq!(spread(&bare, 7), vec![("h1".into(), 3), ("h2".into(), 2), ("h3".into(), 2)]);
        assert_eq!(spread(&bare, 2), vec![("h1".into(), 1), ("h2".into(), 1)], "h3 gets none: no connection");
        let twice = parse_hosts("h1,h2,h1").unwrap();
        assert_eq!(spread(&twice, 3), vec![("h1".into(), 2), ("h2".into(), 1)]);
        let counted = parse_hosts("h1:2,h2:3,h1:1").unwrap();
        assert_eq!(spread(&counted, 6), vec![("h1".into(), 3), ("h2".into(), 3)]);
        assert_eq!(
            place(&counted, 6, 4),
            vec![Placement { host: "h1".into(), first: 4, n: 3 }, Placement { host: "h2".into(), first: 7, n: 3 }]
        );
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("localhost"));
        assert!(is_loopback_host("me@127.0.0.1"));
        assert!(!is_loopback_host("10.0.0.2"));
    }
}
