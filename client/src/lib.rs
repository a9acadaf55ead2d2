//! `rpx`: the Rust client of an rpx cluster (and of any ipyparallel 9 controller).
//!
//! Connect to a running cluster (`ipcluster start -n 4 --daemonize`), then run closures and
//! cells on its engines through views:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! fn main() -> rpx::Result<()> {
//!     let client = rpx::Client::connect()?; // RPX_PROFILE, or the `default` profile
//!     client.wait_for_engines(4, Duration::from_secs(30))?;
//!
//!     // Load-balanced: the controller picks an engine per task (chunk of items).
//!     let view = client.view();
//!     let squares: Vec<u64> = view.map(rpx::remote!(|x: u64| x * x), 0..1000)?;
//!     assert_eq!(squares[10], 100);
//!     let sum: u64 = view.apply(rpx::remote!(|a: u64, b: u64| a + b), (1, 2))?;
//!     assert_eq!(sum, 3);
//!
//!     // Direct: every call goes to each targeted engine.
//!     let dv = client.direct_view(..);
//!     let r = dv.execute("let a = 40 + 2; println!(\"{a}\");")?; // Err if it failed on any engine
//!     println!("{:?}", r.stdout()); // one String per engine
//!     match dv.execute("let n: u64 = \"x\".parse()?;") {
//!         // A failed cell still gives every engine's output and error.
//!         Err(e) => println!("{}", e.execute_result().expect("a cell's outcome")),
//!         Ok(_) => unreachable!("a `?` on an Err fails the cell"),
//!     }
//!     let each = dv.execute_results("1 + 1")?; // the opt-out: Ok, failures inside each engine's result
//!     dv.push("scale", &3u64)?;
//!     let scaled: Vec<u64> = dv.apply(rpx::remote!(|x: u64| x * rpx::get::<u64>("scale")), (2,))?;
//!     dv.scatter("xs", &(0..16).collect::<Vec<u64>>())?;
//!     let xs: Vec<u64> = dv.gather("xs")?;
//!     assert_eq!(xs.len(), 16);
//!
//!     // Non-blocking: every call has an `_async` twin returning a handle (also a Future).
//!     let ar = view.chunksize(100).map_async(rpx::remote!(|x: u64| x + 1), 0..100_000)?;
//!     let (done, total) = ar.progress();
//!     let all = ar.get()?;
//!     # let _ = (scaled, done, total, all, each);
//!     Ok(())
//! }
//! ```
//!
//! # Layout
//! - [`client`](Client): connection files, the engine table, views, and hub/control requests
//!   (`queue_status`, `abort`, `send_signal`, `clear`, `shutdown`, `hub_history`).
//! - [`view`](DirectView): [`DirectView`] (execute, apply, map, push, pull, scatter, gather on
//!   each targeted engine) and [`LoadBalancedView`] (apply, chunked map with retries, timeouts
//!   and dependencies, lazy [`Imap`]).
//! - [`result`](AsyncResult): [`AsyncResult`], [`AsyncMapResult`] (ordered and unordered
//!   iteration, per-item results), [`ExecuteResult`], timings and outputs; reply decoding.
//! - [`remote`](Remote): [`remote!`] / [`Remote`], the [`RemoteFn`] arity trait, and
//!   [`sanitize_type_name`] for the argument types engines compile closures with.
//! - [`targets`](TargetSpec): the [`Targets`] trait, the target grammar shared with the magics
//!   ([`TargetSpec::parse`], from `rpx_protocol::targets`), and the [`partition`] / [`chunk_ranges`] splits.
//! - [`error`](Error): [`Error`] and [`RemoteError`] (what failed, on which engine and item,
//!   and what to do).
//! - `io` (private): the sockets, their reader tasks, and the single dispatcher that matches
//!   replies and iopub output to requests.
//! - `drive` (private): which thread runs the request runtime: the one waiting for a reply,
//!   else a background thread while requests are outstanding.
//! - `dataplane` (private): push / pull / scatter / gather through files in a same-host
//!   engine's namespace (shared memory) instead of message buffers.
//! - `datalink` (private): large values streamed straight to and from engines on other hosts
//!   over their data links, the controller routing only the requests.
//! - `tracker` (private): the per-request state shared by the dispatcher and the handles.
//!
//! # Behaviour worth knowing
//! - Closures are compiled once per cluster by the engines' shared compiler, from their
//!   source: annotate argument types, capture nothing, read pushed values with [`get`].
//! - Arguments, results and pushed values travel as postcard (`rpx_runtime::encode`), so types
//!   must be `serde` types that exist on the engines under the same name.
//! - A client never hangs: if the controller dies or stops answering, pending results fail
//!   with [`Error::Connection`] within seconds; an engine that dies fails its tasks with
//!   [`RemoteErrorKind::EngineDied`].

mod client;
mod closures;
mod datalink;
mod dataplane;
mod drive;
mod error;
mod io;
mod premap;
mod remote;
mod result;
mod targets;
mod tracker;
mod vecview;
mod view;

pub use client::{Client, EngineQueue, Jobs, QueueStatus, Signal};
pub use error::{Error, RemoteError, RemoteErrorKind, Result};
pub use io::{IDLE_GRACE, LIVENESS_TIMEOUT, PROBE_AFTER, SEND_LIMIT};
pub use remote::{sanitize_type_name, storage_type_name, type_name_of, Remote, RemoteFn};
pub use result::{parse_date, AsyncMapResult, AsyncResult, EngineOutput, ExecuteResult, MapIter, TaskEvent, TaskOutput, TaskTiming};
pub use targets::{chunk_ranges, partition, slice_indices, Selector, Slice, TargetError, TargetSpec, Targets};
pub use vecview::VecView;
pub use view::{DirectView, Imap, LoadBalancedView, MapOptions};

/// Inside a remote closure: read a value pushed to the engine, e.g.
/// `rpx::get::<u64>("scale")` after `dv.push("scale", &3u64)`. It panics (failing the task with
/// a clear message) when nothing was pushed under that name; outside an engine it panics too.
pub use rpx_runtime::{get, PlainElem};
