//! The windows rebuilt from the Iceberg table (`window-aggregator rebuild`) while the pipeline
//! runs under load, on nisshi with its log on disk as `pipeline` runs it: after the window table
//! is dropped, after the whole database is, and with a rebuild killed with -9 before its
//! commit. Each time every acknowledged reading is in the table once and counted once by the
//! windows, and each window equals what PyIceberg computes from the table's rows.

use std::time::{Duration, Instant};

use weather_testkit::{
    ChildGuard, connect,
    load::Load,
    stack::{Stack, Totals, verify},
};

/// The windows in PostgreSQL, once the load is paused and the aggregator caught up, are the
/// table's as PyIceberg computes them, window by window.
async fn assert_windows_are_the_tables(stack: &Stack, load: &Load, scenario: &str) {
    load.pause().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ours, theirs) = (stack.windows().await, stack.table_windows(5));
        let same = ours.len() == theirs.len()
            && ours
                .iter()
                .zip(&theirs)
                .all(|((key, (count, sum)), (their_key, (their_count, their_sum)))| {
                    key == their_key
                        && count == their_count
                        && (sum - their_sum).abs() <= 1e-9 * their_sum.abs().max(1.0)
                });
        if same {
            println!(
                "{scenario}: {} windows, each as PyIceberg computes it from the table",
                ours.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{scenario}: {} windows in PostgreSQL, {} from the table; first difference: {:?}",
            ours.len(),
            theirs.len(),
            ours.iter().zip(&theirs).find(|(a, b)| a != b)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    load.resume();
}

fn rebuild(stack: &Stack, args: &[&str]) {
    let started = Instant::now();
    let status = stack.rebuild(args).status().expect("window-aggregator rebuild");
    assert!(status.success(), "rebuild: {status}");
    println!("rebuild {args:?} took {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn windows_lost_or_rebuilt_while_running_end_exact() {
    let stack = Stack::start_on_nisshi(1, 3).await;
    let load = Load::start(stack.addr("logging-server"), 4);
    let mut totals = Totals::default();
    tokio::time::sleep(Duration::from_secs(5)).await;
    verify(&stack, &load, "steady load", &mut totals).await;

    // The window table dropped under load: the aggregator cannot commit until the rebuild
    // makes it again, and then reads on from the table's checkpoints.
    let client = connect(&stack.database_url).await.expect("connect");
    client.batch_execute("DROP TABLE weather").await.expect("drop");
    tokio::time::sleep(Duration::from_secs(3)).await;
    rebuild(&stack, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&stack, &load, "window table dropped, rebuilt", &mut totals).await;
    assert_windows_are_the_tables(&stack, &load, "window table dropped, rebuilt").await;

    // A rebuild while everything runs, killed with -9 after its windows are written and before
    // its commit: nothing of it stays, and the aggregator, held meanwhile, goes on.
    let mut held = ChildGuard::spawn("rebuild", &mut stack.rebuild(&["--hold-before-commit", "60s"])).expect("rebuild");
    tokio::time::sleep(Duration::from_secs(5)).await;
    held.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "rebuild killed before its commit", &mut totals).await;
    rebuild(&stack, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&stack, &load, "rebuilt again while running", &mut totals).await;
    assert_windows_are_the_tables(&stack, &load, "rebuilt again while running").await;

    // The whole database lost: the aggregator and the dashboard connect to an empty one, and
    // the rebuild fills it from the table.
    drop(client);
    let admin = connect(&stack.postgres.url("postgres")).await.expect("connect");
    // Each alone: PostgreSQL runs neither inside a transaction block.
    for statement in ["DROP DATABASE weather WITH (FORCE)", "CREATE DATABASE weather"] {
        admin.batch_execute(statement).await.expect(statement);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    rebuild(&stack, &[]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&stack, &load, "database dropped, rebuilt", &mut totals).await;
    assert_windows_are_the_tables(&stack, &load, "database dropped, rebuilt").await;
    load.stop().await;
}
