//! Push, scatter, compute on the engines with the scattered variable, gather.
//!
//! ```sh
//! ipcluster start -n 4 --daemonize
//! cargo run --release -p rpx --example data_movement
//! ```

use std::time::Duration;

fn main() -> rpx::Result<()> {
    let client = rpx::Client::connect()?;
    client.wait_for_engines(1, Duration::from_secs(30))?;
    let dv = client.direct_view(..);

    // The same value on every engine.
    dv.push("offset", &1000u64)?;

    // Contiguous chunks of 0..100, one per engine.
    let xs: Vec<u64> = (0..100).collect();
    dv.scatter("xs", &xs)?;

    // A cell on every engine using both variables; each engine prints its part.
    let r = dv.execute(
        r#"let ys: Vec<u64> = xs.iter().map(|x| x * x + offset).collect();
println!("engine {} holds {} items, from {:?} to {:?}", std::env::var("RPX_ENGINE_ID").unwrap(), xs.len(), xs.first(), xs.last());"#,
    )?; // an Err (every engine's output inside) if the cell failed anywhere
    print!("{r}");

    // A closure reading a pushed value.
    let shifted: Vec<u64> = dv.apply(rpx::remote!(|x: u64| x + rpx::get::<u64>("offset")), (1u64,))?;
    println!("1 + offset on each engine: {shifted:?}");

    // The computed chunks, concatenated in engine order.
    let ys: Vec<u64> = dv.gather("ys")?;
    assert_eq!(ys, xs.iter().map(|x| x * x + 1000).collect::<Vec<_>>());
    println!("gathered {} values: {:?} ... {:?}", ys.len(), &ys[..3], &ys[ys.len() - 3..]);

    // Each engine's own copy of a pushed value.
    let offsets: Vec<u64> = dv.pull("offset")?;
    println!("offset on each engine: {offsets:?}");
    Ok(())
}
