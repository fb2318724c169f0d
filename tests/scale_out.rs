//! Three instances of each consumer sharing a six-partition topic under steady load: the group
//! spreads the partitions, and they move when an instance is killed with SIGKILL, stopped,
//! started, or paused long enough to lose them (a zombie, whose late commits must be fenced),
//! and two sinks commit at the same moment. After each scenario the load pauses and the test
//! checks that every acknowledged reading is in Iceberg (read by PyIceberg) and in the
//! PostgreSQL windows exactly once (see `weather_testkit::stack::verify`).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use weather_testkit::{
    load::Load,
    stack::{CONSUMERS, Instance, Stack, Totals, verify},
};

const INSTANCES: usize = 3;
const PARTITIONS: i32 = 6;

/// Who owns which partition, per consumer, among `instances`; each instance's /metrics asked
/// with a timeout (a paused one does not answer).
async fn owners(stack: &Stack, instances: &[Instance]) -> BTreeMap<Instance, Vec<i32>> {
    let mut owners = BTreeMap::new();
    for &instance in instances {
        let owned = tokio::time::timeout(Duration::from_secs(2), stack.owned_partitions(instance)).await;
        owners.insert(instance, owned.unwrap_or_default());
    }
    owners
}

/// Waits until, for each consumer, the running instances not in `except` own every partition
/// exactly once between them, each at least one when there are enough partitions; returns the
/// assignment.
async fn wait_for_spread(stack: &Stack, except: &[Instance], scenario: &str) -> BTreeMap<Instance, Vec<i32>> {
    wait_for_spread_within(stack, except, scenario, Duration::from_secs(90)).await
}

/// [`wait_for_spread`], failing after `limit`.
async fn wait_for_spread_within(
    stack: &Stack,
    except: &[Instance],
    scenario: &str,
    limit: Duration,
) -> BTreeMap<Instance, Vec<i32>> {
    let started = Instant::now();
    let deadline = started + limit;
    loop {
        let mut all = BTreeMap::new();
        let mut spread = true;
        for consumer in CONSUMERS {
            let instances: Vec<Instance> = stack
                .instances(consumer)
                .into_iter()
                .filter(|i| stack.running.contains_key(i) && !except.contains(i))
                .collect();
            let owners = owners(stack, &instances).await;
            let mut owned: Vec<i32> = owners.values().flatten().copied().collect();
            owned.sort_unstable();
            spread &= owned == (0..PARTITIONS).collect::<Vec<_>>() && owners.values().all(|p| !p.is_empty());
            all.extend(owners);
        }
        if spread {
            println!("{scenario}: partitions {all:?} after {:?}", started.elapsed());
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "{scenario}: the partitions were not spread over the running instances: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sum of a counter over `instances`.
async fn total(stack: &Stack, instances: &[Instance], counter: &str) -> f64 {
    let mut sum = 0.0;
    for &instance in instances {
        let prefix = instance.0.replace('-', "_");
        sum += stack
            .metric(instance, &format!("{prefix}_{counter}_total"))
            .await
            .unwrap_or(0.0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread")]
async fn three_instances_of_each_consumer_store_every_reading_exactly_once() {
    let mut stack = Stack::start_with(INSTANCES, PARTITIONS).await;
    let load = Load::start(stack.addr("logging-server"), 4);
    let mut totals = Totals::default();
    let all = |name: &'static str| (0..INSTANCES).map(move |i| (name, i));
    let sinks: Vec<Instance> = all("iceberg-sink").collect();

    wait_for_spread(&stack, &[], "start").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    verify(&stack, &load, "3 instances of each consumer, steady load", &mut totals).await;

    // SIGKILL: the group notices after the session timeout and gives the partitions to the others.
    let killed: Vec<Instance> = CONSUMERS.iter().map(|c| (*c, 1)).collect();
    for &instance in &killed {
        stack.kill9_instance(instance);
    }
    wait_for_spread(&stack, &[], "kill -9 of one instance each").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "kill -9 of one instance each", &mut totals).await;
    for &instance in &killed {
        stack.spawn_instance(instance);
    }
    wait_for_spread(&stack, &[], "the killed instances back").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "the killed instances back", &mut totals).await;

    // SIGTERM: the instance commits, leaves the group, and its partitions move at once.
    let stopped: Vec<Instance> = CONSUMERS.iter().map(|c| (*c, 2)).collect();
    for &instance in &stopped {
        stack.stop_instance(instance);
    }
    wait_for_spread(&stack, &[], "one instance each stopped").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "one instance each stopped", &mut totals).await;
    for &instance in &stopped {
        stack.spawn_instance(instance);
    }
    wait_for_spread(&stack, &[], "the stopped instances started again").await;

    // A zombie: paused past the session timeout with readings read but not committed, its
    // partitions go to the others; when it wakes, its commits of them must store nothing.
    let zombies: Vec<Instance> = CONSUMERS.iter().map(|c| (*c, 0)).collect();
    let fenced_before = total(&stack, &zombies, "fenced_partitions").await;
    for &zombie in &zombies {
        stack.signal_instance(zombie, libc::SIGSTOP);
    }
    wait_for_spread(&stack, &zombies, "instance 0 of each paused").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for &zombie in &zombies {
        stack.signal_instance(zombie, libc::SIGCONT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let fenced = loop {
        let fenced = total(&stack, &zombies, "fenced_partitions").await - fenced_before;
        if fenced > 0.0 || Instant::now() > deadline {
            break fenced;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("the paused instances woke: {fenced} of their partitions fenced");
    assert!(fenced > 0.0, "a paused instance's late commit was fenced");
    wait_for_spread(&stack, &[], "the paused instances back").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "paused instances came back as zombies", &mut totals).await;

    // Two sinks commit at the same moment: both paused briefly (well within the session
    // timeout) with readings buffered, then woken together.
    let conflicts_before = total(&stack, &sinks, "commit_conflicts").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let conflicts = loop {
        for &sink in &sinks[1..] {
            stack.signal_instance(sink, libc::SIGSTOP);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for &sink in &sinks[1..] {
            stack.signal_instance(sink, libc::SIGCONT);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let conflicts = total(&stack, &sinks, "commit_conflicts").await - conflicts_before;
        if conflicts > 0.0 || Instant::now() > deadline {
            break conflicts;
        }
    };
    println!("two sinks committing at once: {conflicts} commits merged again on the other's snapshot");
    assert!(conflicts > 0.0, "two sinks committed at the same moment");
    verify(&stack, &load, "two sinks committing at the same moment", &mut totals).await;

    load.stop().await;
    for (instance, mut guard) in std::mem::take(&mut stack.running) {
        let status = guard.terminate(Duration::from_secs(60)).expect("exit");
        assert!(status.success(), "{instance:?} stopped cleanly: {status:?}");
    }
}

/// How long the group may take to hand a killed member's partitions to the others: its session
/// timeout (10 s), then a rebalance.
const HANDOVER: Duration = Duration::from_secs(30);

/// The same group on nisshi with its log on disk, as `pipeline` runs it: the partitions of an
/// instance killed with SIGKILL reach the others within the session timeout and a rebalance,
/// whether it was the first to join (the group's leader) or not; an instance started again
/// takes its share back as promptly; every acknowledged reading is stored exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn on_nisshi_the_partitions_of_a_killed_instance_reach_the_others() {
    let mut stack = Stack::start_on_nisshi(INSTANCES, PARTITIONS).await;
    let load = Load::start(stack.addr("logging-server"), 4);
    let mut totals = Totals::default();
    wait_for_spread(&stack, &[], "nisshi: start").await;
    // Instance 0 of each consumer started, and joined its group, first.
    for (number, scenario) in [
        (1, "nisshi: kill -9 of an instance that joined later"),
        (0, "nisshi: kill -9 of the instance that joined first"),
    ] {
        let killed: Vec<Instance> = CONSUMERS.iter().map(|c| (*c, number)).collect();
        for &instance in &killed {
            stack.kill9_instance(instance);
        }
        wait_for_spread_within(&stack, &[], scenario, HANDOVER).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        verify(&stack, &load, scenario, &mut totals).await;
        for &instance in &killed {
            stack.spawn_instance(instance);
        }
        wait_for_spread_within(&stack, &[], &format!("{scenario}, then started again"), HANDOVER).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    verify(&stack, &load, "nisshi: the killed instances back", &mut totals).await;

    load.stop().await;
    for (instance, mut guard) in std::mem::take(&mut stack.running) {
        let status = guard.terminate(Duration::from_secs(60)).expect("exit");
        assert!(status.success(), "{instance:?} stopped cleanly: {status:?}");
    }
}
