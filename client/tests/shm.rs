//! Push, pull, scatter and gather through shared memory on one host (`rpx_protocol::dataplane`),
//! on a real 4-engine cluster: every engine is reached through its namespace, nested and empty
//! values, scatter/gather order, a 256 MiB value that never passes through the controller, a
//! 1 GiB value, a push made while a cell runs (the cell never sees it half-written), a replaced
//! value's pages written over by a later push but never while a cell holds them, a file cut
//! short or swapped for a link refused with nothing lost, `pull_view` reading snapshots where
//! they lie, and the buffer path when shared memory is off
//! (`Client::set_shared_memory(false)`, as `RPX_DATA_PLANE=buffers` does).

mod common;

use std::collections::BTreeMap;
use std::time::Instant;

use common::{client, serial, Steps, TestCluster};
use rpx_tests::Gate;

fn vm_hwm_kib(pid: i64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn transfer_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".xfer-"))
        .collect()
}

#[test]
fn shared_memory_transfers_on_four_engines() {
    let _serial = serial();
    let cluster = TestCluster::start(4);
    let c = client(&cluster);
    let all = c.direct_view(..);
    let one = c.direct_view(0usize);
    let mut steps = Steps::default();
    let namespaces = c.shared_memory_namespaces();

    steps.run("every engine on this host is reached through its namespace", || {
        assert_eq!(namespaces.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3], "{namespaces:?}");
        for dir in namespaces.values() {
            assert!(dir.is_dir(), "{}", dir.display());
        }
    });

    steps.run("nested values on every engine, and back", || {
        let v: BTreeMap<String, Vec<(u8, Option<String>)>> =
            [("a".to_string(), vec![(1, Some("x".into())), (2, None)]), ("".to_string(), vec![])].into_iter().collect();
        all.push("nested", &v).unwrap();
        type Nested = BTreeMap<String, Vec<(u8, Option<String>)>>;
        let back: Vec<Nested> = all.pull("nested").unwrap();
        assert_eq!(back, vec![v.clone(); 4]);
        // The cells and closures see it as always.
        let r = all.execute("nested.len()").unwrap();
        assert_eq!(r.results(), vec![Some("2".to_string()); 4], "{r}");
        for dir in namespaces.values() {
            assert!(transfer_files(dir).is_empty(), "no transfer file is left behind in {}", dir.display());
        }
    });

    steps.run("0-byte values", || {
        all.push("unit", &()).unwrap();
        assert_eq!(all.pull::<()>("unit").unwrap(), vec![(); 4]);
        all.scatter("none", &Vec::<u64>::new()).unwrap();
        assert_eq!(all.gather::<u64>("none").unwrap(), Vec::<u64>::new());
        all.push("empty", &Vec::<u8>::new()).unwrap();
        assert_eq!(all.pull::<Vec<u8>>("empty").unwrap(), vec![Vec::<u8>::new(); 4]);
    });

    steps.run("scatter/gather keep engine order (101 items, one view in reverse order)", || {
        let xs: Vec<u64> = (0..101).collect();
        all.scatter("xs", &xs).unwrap();
        assert_eq!(all.gather::<u64>("xs").unwrap(), xs);
        let chunks: Vec<Vec<u64>> = all.pull("xs").unwrap();
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![26, 25, 25, 25]);
        let rev = c.direct_view([3usize, 2, 1, 0]);
        let words: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        rev.scatter("words", &words).unwrap();
        assert_eq!(rev.gather::<String>("words").unwrap(), words);
        assert_eq!(
            one.pull::<Vec<String>>("words").unwrap(),
            vec![vec!["w8".to_string(), "w9".to_string()]],
            "engine 0 got the last chunk"
        );
        // Plain vectors are gathered straight into one vector, each part in its place.
        let fs: Vec<f64> = (0..1001).map(|i| i as f64 / 7.0).collect();
        rev.scatter("fs", &fs).unwrap();
        assert_eq!(rev.gather::<f64>("fs").unwrap(), fs);
        assert_eq!(
            all.gather::<f64>("fs").unwrap(),
            [&fs[751..], &fs[501..751], &fs[251..501], &fs[..251]].concat(),
            "in the view's order (engine 3 got the first 251)"
        );
        let bs: Vec<i8> = (0..300).map(|i| (i % 200 - 100) as i8).collect();
        all.scatter("bs", &bs).unwrap();
        assert_eq!(all.gather::<i8>("bs").unwrap(), bs);
        for dir in namespaces.values() {
            assert!(transfer_files(dir).is_empty(), "no transfer file is left behind in {}", dir.display());
        }
    });

    steps.run("a 256 MiB value: to every engine, back, scattered and gathered; the controller never holds it", || {
        let controller = cluster.cluster_state().and_then(|s| s["controller_pid"].as_i64()).expect("controller pid");
        let before = vm_hwm_kib(controller);
        let big: Vec<u8> = (0..256usize << 20).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        all.push("big", &big).unwrap();
        let pushed = t.elapsed();
        let t = Instant::now();
        let back: Vec<Vec<u8>> = one.pull("big").unwrap();
        let pulled = t.elapsed();
        assert!(back[0] == big, "the value came back whole");
        drop(back);
        all.scatter("bigs", &big).unwrap();
        let g: Vec<u8> = all.gather("bigs").unwrap();
        assert!(g == big, "gathered in order");
        let after = vm_hwm_kib(controller);
        eprintln!("256 MiB: push to 4 engines {pushed:?}, pull from one {pulled:?}; controller peak RSS {before} -> {after} KiB");
        assert!(after < before + 64 * 1024, "the controller's peak RSS grew from {before} to {after} KiB: it held the value");
        all.execute("drop(big); drop(bigs);").unwrap();
    });

    steps.run("a 1 GiB value to one engine and back", || {
        let huge: Vec<u8> = (0..1usize << 30).map(|i| (i % 253) as u8).collect();
        one.push("huge", &huge).unwrap();
        let r = one.execute("(huge.len(), huge[12345], huge[(1 << 30) - 1])").unwrap();
        assert_eq!(r.results(), vec![Some(format!("({}, {}, {})", 1usize << 30, 12345 % 253, ((1usize << 30) - 1) % 253))], "{r}");
        let back: Vec<Vec<u8>> = one.pull("huge").unwrap();
        assert!(back[0] == huge, "the value came back whole");
        drop(back);
        one.execute("drop(huge);").unwrap();
        assert!(transfer_files(&namespaces[&0]).is_empty(), "no transfer file is left behind");
    });

    steps.run("a value pushed while a cell runs is never seen half-written", || {
        one.push("v", &vec![7u8; 1000]).unwrap();
        let gate = Gate::new();
        let cell = one
            .execute_async(&format!("{} let w: Vec<u8> = ::rpx_runtime::get(\"v\"); (w.len(), w.iter().all(|b| *b == 7))", gate.hold()))
            .unwrap();
        gate.wait_started();
        let big = vec![9u8; 64 << 20];
        let push = one.push_async("v", &big).unwrap();
        assert!(!push.ready(), "the push waits for the cell");
        gate.open();
        let r = cell.get().unwrap();
        assert_eq!(r.results(), vec![Some("(1000, true)".to_string())], "{r}");
        push.get().unwrap();
        let now: Vec<Vec<u8>> = one.pull("v").unwrap();
        assert!(now[0] == big);
    });

    steps.run("a large value replaced is written over by a later push, never while a cell still holds it", || {
        use std::os::unix::fs::MetadataExt;
        let dir = &namespaces[&0];
        let ino = || std::fs::metadata(dir.join("spare_s")).unwrap().ino();
        let n = 2usize << 20; // 16 MiB of f64: above rpx_protocol::dataplane::SPARE_FROM
        let push = |x: f64| one.push("spare_s", &vec![x; n]).unwrap();
        let last = |expected: f64| {
            let r = one.execute("(spare_s.len(), spare_s[0], spare_s[spare_s.len() - 1])").unwrap();
            assert_eq!(r.results(), vec![Some(format!("({n}, {expected:?}, {expected:?})"))], "{r}");
        };
        push(1.5);
        let first = ino();
        push(2.5);
        push(3.5);
        last(3.5);
        assert_eq!(ino(), first, "the third push was written over the first value's pages");
        let spares = std::fs::read_dir(dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".spare-")).count();
        assert!(spares <= 2, "{spares} spares");
        // A cell keeps the value's file open: those pages are never reused.
        let r = one.execute("let held = std::fs::File::open(format!(\"{}/spare_s\", std::env::var(\"RPX_NS_DIR\").unwrap())).unwrap();").unwrap();
        r.check().unwrap();
        push(4.5);
        push(5.5);
        last(5.5);
        assert_ne!(ino(), first, "the held file was not written over");
        let r = one
            .execute("{ use std::io::Read; let mut b = Vec::new(); (&held).read_to_end(&mut b).unwrap(); (b.len(), f64::from_le_bytes(b[b.len() - 8..].try_into().unwrap())) }")
            .unwrap();
        let size = rpx_runtime::encode(&vec![3.5f64; n]).len();
        assert_eq!(r.results(), vec![Some(format!("({size}, 3.5)"))], "{r}");
        one.execute("drop(held); drop(spare_s);").unwrap().check().unwrap();
        assert!(transfer_files(dir).is_empty(), "no transfer file is left behind");
    });

    steps.run("values of two sizes pushed and scattered again and again, over spares mapped ahead, are right every time", || {
        // Each push's reply names the engine's spares; the client maps them ahead and the next
        // value of about that size is copied into one (client/src/premap.rs). Whichever way a
        // value is written, every engine must hold exactly the last one.
        let n = 2usize << 20; // 16 MiB of f64 pushed; 40 MiB scattered, 10 MiB per engine
        let m = 5usize << 20;
        for round in 0..6u32 {
            let x = round as f64 + 0.25;
            let v: Vec<f64> = (0..n).map(|i| x + i as f64).collect();
            one.push("mapped_ahead", &v).unwrap();
            let back: Vec<Vec<f64>> = one.pull("mapped_ahead").unwrap();
            assert!(back[0] == v, "round {round}: the pushed value");
            let r = one.execute("(mapped_ahead.len(), mapped_ahead[0], mapped_ahead[mapped_ahead.len() - 1])").unwrap();
            assert_eq!(r.results(), vec![Some(format!("({n}, {x:?}, {:?})", x + (n - 1) as f64))], "round {round}: {r}");
            let w: Vec<f64> = (0..m).map(|i| -x - i as f64).collect();
            all.scatter("mapped_parts", &w).unwrap();
            let g: Vec<f64> = all.gather("mapped_parts").unwrap();
            assert!(g == w, "round {round}: the scattered value, gathered from 4 engines");
        }
        one.execute("drop(mapped_ahead);").unwrap().check().unwrap();
        for dir in namespaces.values() {
            assert!(transfer_files(dir).is_empty(), "no transfer file is left behind");
        }
    });

    steps.run("pull_view maps each engine's snapshot where it lies, and a view keeps the value it pulled", || {
        let n = 3 << 20;
        let v: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 3.0).collect();
        all.push("viewed", &v).unwrap();
        let views = all.pull_view::<f64>("viewed").unwrap();
        assert_eq!(views.len(), 4);
        for (i, w) in views.iter().enumerate() {
            assert!(w.is_zero_copy(), "engine {i}: mapped, not copied");
            assert!(**w == v[..], "engine {i}: the pushed value");
        }
        for dir in namespaces.values() {
            assert!(transfer_files(dir).is_empty(), "the snapshots' names are gone once mapped");
        }
        // The engines replace the value, three times over (a replaced value's pages become a
        // spare the next push writes over, unless something still maps them): the views keep
        // what they pulled, and cells and pulls see the new value.
        for round in 1..=3 {
            all.push("viewed", &vec![-(round as f64); n]).unwrap();
            let r = all.execute("viewed[0]").unwrap();
            assert_eq!(r.results(), vec![Some(format!("{:?}", -(round as f64))); 4], "{r}");
        }
        assert!(views.iter().all(|w| **w == v[..]), "a view keeps the value it pulled");
        let again = one.pull_view::<f64>("viewed").unwrap();
        assert!(again[0].is_zero_copy() && again[0].iter().all(|&x| x == -3.0));
        drop(views);
        // A small vector reads the same, copied; the wrong element type is a clear error.
        one.push("small", &vec![1u8, 2, 3]).unwrap();
        assert_eq!(one.pull_view::<u8>("small").unwrap()[0], vec![1u8, 2, 3]);
        let err = one.pull_view::<f64>("small").unwrap_err().to_string();
        assert!(err.contains("not a vector of f64") && err.contains("engine 0"), "{err}");
        assert_eq!(one.pull::<Vec<u8>>("small").unwrap(), vec![vec![1u8, 2, 3]], "the value is intact");
        // Through the controller (shared memory off): the same elements.
        c.set_shared_memory(false);
        let buffered = one.pull_view::<f64>("viewed").unwrap();
        c.set_shared_memory(true);
        assert!(buffered[0].iter().all(|&x| x == -3.0) && buffered[0].len() == n);
        assert_eq!(buffered.into_iter().next().unwrap().into_vec(), vec![-3.0; n]);
    });

    steps.run("a file cut short or swapped for a link is refused with a clear error and nothing is lost", || {
        one.push("t", &vec![1u8; 4096]).unwrap();
        let dir = &namespaces[&0];
        // Each push waits behind a held cell while its file is damaged.
        let damaged = |damage: &dyn Fn(&std::path::Path)| {
            let gate = Gate::new();
            let cell = one.execute_async(&gate.hold()).unwrap();
            gate.wait_started();
            let push = one.push_async("t", &vec![2u8; 4096]).unwrap();
            let files = transfer_files(dir);
            assert_eq!(files.len(), 1, "{files:?}");
            damage(&dir.join(&files[0]));
            gate.open();
            cell.get().unwrap().check().unwrap();
            push.get().unwrap_err().to_string()
        };
        let err = damaged(&|f| std::fs::write(f, [2u8; 100]).unwrap());
        assert!(err.contains("size 100 where") && err.contains("`t` keeps its previous value") && err.contains("engine 0"), "{err}");
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), [2u8; 4096]).unwrap();
        let err = damaged(&|f| {
            std::fs::remove_file(f).unwrap();
            std::os::unix::fs::symlink(outside.path(), f).unwrap();
        });
        assert!(err.contains("refused the pushed value `t`") && err.contains("`t` keeps its previous value"), "{err}");
        assert_eq!(one.pull::<Vec<u8>>("t").unwrap(), vec![vec![1u8; 4096]], "the old value is intact");
        assert!(transfer_files(dir).is_empty(), "the refused files were removed");
        one.push("t", &vec![3u8; 10]).unwrap();
        assert_eq!(one.pull::<Vec<u8>>("t").unwrap(), vec![vec![3u8; 10]], "later pushes work");
    });

    steps.run("shared memory off: the buffer path, unchanged", || {
        c.set_shared_memory(false);
        assert!(c.shared_memory_namespaces().is_empty());
        let v: Vec<(String, f64)> = vec![("x".into(), 1.5)];
        all.push("buffered", &v).unwrap();
        assert_eq!(all.pull::<Vec<(String, f64)>>("buffered").unwrap(), vec![v.clone(); 4]);
        all.scatter("bx", &(0..10u32).collect::<Vec<_>>()).unwrap();
        assert_eq!(all.gather::<u32>("bx").unwrap(), (0..10).collect::<Vec<_>>());
        let fs: Vec<f32> = (0..130).map(|i| i as f32 * 0.5).collect();
        all.scatter("fx", &fs).unwrap();
        assert_eq!(all.gather::<f32>("fx").unwrap(), fs, "plain vectors from buffers, in place");
        // Values cross between the paths: pushed as buffers, pulled as files, and back.
        c.set_shared_memory(true);
        assert_eq!(all.pull::<Vec<(String, f64)>>("buffered").unwrap(), vec![v; 4]);
        all.push("filed", &42u64).unwrap();
        c.set_shared_memory(false);
        assert_eq!(all.pull::<u64>("filed").unwrap(), vec![42; 4]);
        c.set_shared_memory(true);
    });

    steps.run("RPX_DATA_PLANE=buffers turns it off for a new client", || {
        std::env::set_var("RPX_DATA_PLANE", "buffers");
        let c2 = client(&cluster);
        std::env::remove_var("RPX_DATA_PLANE");
        assert!(c2.shared_memory_namespaces().is_empty());
        c2.direct_view(..).push("from2", &5u8).unwrap();
        assert_eq!(c2.direct_view(..).pull::<u8>("from2").unwrap(), vec![5; 4]);
    });

    steps.finish();
}
