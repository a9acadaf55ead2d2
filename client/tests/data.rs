//! Moving data with a direct view on a real 4-engine cluster: push/pull round trips of nested
//! serde values (one engine and all), pushed values in cells and closures, scatter/gather
//! (16 and 101 items), a missing name, and a larger buffer.

mod common;

use std::collections::BTreeMap;

use common::{client, serial, Steps, TestCluster};
use rpx::{Error, RemoteErrorKind};

#[test]
fn push_pull_scatter_gather_on_four_engines() {
    let _serial = serial();
    let cluster = TestCluster::start(4);
    let c = client(&cluster);
    let all = c.direct_view(..);
    let one = c.direct_view(0usize);
    let mut steps = Steps::default();

    // Regression: only a push created the engine's namespace directory, so pulling a cell's
    // variable from an engine that had nothing pushed panicked "cannot store ...".
    steps.run("gather a cell variable before anything was pushed", || {
        all.execute("let counts: Vec<u64> = vec![1, 2];").unwrap().check().unwrap();
        let back: Vec<u64> = all.gather("counts").unwrap();
        assert_eq!(back, vec![1, 2, 1, 2, 1, 2, 1, 2]);
    });

    steps.run("push/pull a nested value on one engine", || {
        let v: Vec<(String, Vec<u64>)> = vec![("a".into(), vec![1, 2, 3]), ("".into(), vec![]), ("ü".into(), vec![u64::MAX])];
        one.push("nested", &v).unwrap();
        let back: Vec<Vec<(String, Vec<u64>)>> = one.pull("nested").unwrap();
        assert_eq!(back, vec![v]);
    });

    steps.run("push/pull a map of options on all engines", || {
        let m: BTreeMap<String, Option<Vec<f64>>> =
            [("x".to_string(), Some(vec![1.5, -2.0])), ("none".to_string(), None), ("empty".to_string(), Some(vec![]))]
                .into_iter()
                .collect();
        all.push("table", &m).unwrap();
        let back: Vec<BTreeMap<String, Option<Vec<f64>>>> = all.pull("table").unwrap();
        assert_eq!(back.len(), 4);
        assert!(back.iter().all(|b| *b == m), "{back:?}");
        // A string slice is stored as a String.
        all.push("greeting", "hello").unwrap();
        assert_eq!(all.pull::<String>("greeting").unwrap(), vec!["hello".to_string(); 4]);
    });

    steps.run("pushed values are cell variables and readable from closures", || {
        all.push("scale", &21u64).unwrap();
        let r = all.execute("scale * 2").unwrap();
        assert_eq!(r.results(), vec![Some("42".to_string()); 4], "{r}");
        let out: Vec<u64> = all.apply(rpx::remote!(|x: u64| x * rpx::get::<u64>("scale")), (2u64,)).unwrap();
        assert_eq!(out, vec![42; 4]);
    });

    steps.run("scatter/gather 0..16 over 4 engines", || {
        let xs: Vec<u64> = (0..16).collect();
        all.scatter("xs", &xs).unwrap();
        let on_zero: Vec<Vec<u64>> = one.pull("xs").unwrap();
        assert_eq!(on_zero, vec![vec![0, 1, 2, 3]]);
        let chunks: Vec<Vec<u64>> = all.pull("xs").unwrap();
        assert_eq!(chunks, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9, 10, 11], vec![12, 13, 14, 15]]);
        let back: Vec<u64> = all.gather("xs").unwrap();
        assert_eq!(back, xs);
        // Cells see the scattered chunk.
        let r = all.execute("xs.iter().sum::<u64>()").unwrap();
        assert_eq!(r.results(), vec![Some("6".to_string()), Some("22".to_string()), Some("38".to_string()), Some("54".to_string())], "{r}");
    });

    steps.run("scatter/gather 101 items: the first engine gets the extra", || {
        let ys: Vec<String> = (0..101).map(|i| format!("item-{i}")).collect();
        all.scatter("ys", &ys).unwrap();
        let chunks: Vec<Vec<String>> = all.pull("ys").unwrap();
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), vec![26, 25, 25, 25]);
        assert_eq!(chunks[1][0], "item-26");
        assert_eq!(all.gather::<String>("ys").unwrap(), ys);
        // On a subset of the engines.
        let sub = c.direct_view("1:3");
        sub.scatter("zs", &[1u8, 2, 3]).unwrap();
        assert_eq!(sub.pull::<Vec<u8>>("zs").unwrap(), vec![vec![1, 2], vec![3]]);
        assert_eq!(sub.gather::<u8>("zs").unwrap(), vec![1, 2, 3]);
    });

    steps.run("pulling a missing name is a NameError per engine", || {
        let e = one.pull::<u64>("never_pushed").unwrap_err();
        match &e {
            Error::Remote(r) => assert_eq!((r.kind.clone(), r.engine_id), (RemoteErrorKind::Name, Some(0)), "{e}"),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("push"), "says what to do: {e}");
        match all.gather::<u64>("never_pushed").unwrap_err() {
            Error::Engines { failed, total, outputs } => {
                assert_eq!(total, 4);
                assert_eq!(outputs.len(), 4, "every engine's output is kept");
                assert!(failed.iter().all(|f| f.kind == RemoteErrorKind::Name), "{failed:#?}");
            }
            other => panic!("{other}"),
        }
    });

    steps.run("a 10 MB value round trip on every engine", || {
        let big: Vec<u8> = (0..10_000_000u32).map(|i| (i % 251) as u8).collect();
        all.push("big", &big).unwrap();
        let back: Vec<Vec<u8>> = all.pull("big").unwrap();
        assert_eq!(back.len(), 4);
        assert!(back.iter().all(|b| *b == big));
    });

    steps.finish();
}
