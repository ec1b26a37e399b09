//! The tap pool: taps created ahead of time, so a VM create renames one
//! instead of waiting on `/dev/net/tun` and several netlink requests.
//!
//! A pooled tap is `bgpool<N>`: persistent, a port of the bridge (isolated
//! when the settings say so), down, and open by no process. Its name is its
//! state: a tap handed to a VM is renamed to the VM's `bgtap<N>`, so a
//! daemon killed at any point leaves only pool taps (kept) and VM taps
//! (kept when a lease claims them, else deleted as leaked).
//!
//! 1. Daemon start: [`TapPool::adopt`] reserves the names of the `bgpool<N>`
//!    taps an earlier daemon left; [`TapPool::run`], spawned in the
//!    background, checks them ([`TapPool::fill`]: re-attached to the bridge
//!    with the current isolation, set down, deleted if a process holds one
//!    or the pool is full) and creates new ones until `size` are ready.
//! 2. Create ([`TapPool::take`]): pops a ready tap and renames it to the
//!    VM's tap name, up, in one request; with none ready (or if the rename
//!    fails) it creates the tap as before. Either way it wakes the filler to
//!    top the pool up.
//! 3. Delete ([`TapPool::give_back`]): a VM tap no process holds goes back
//!    while the pool has room: set down (the bridge forgets the MACs it
//!    learned on it) and renamed to a free `bgpool<N>`. Otherwise it is
//!    deleted.
//! 4. [`TapPool::drain`] deletes every pool tap (teardown).
//!
//! Concurrency: one std mutex guards the pool's bookkeeping and is never
//! held across an await. A pool name is reserved in it from the moment it is
//! chosen until the tap of that name is renamed away or deleted, so a
//! filler, a take and a give-back never pick the same name.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::netlink::{
    parse_pool_tap_name, pool_tap_name, HostNetwork, NetlinkError, POOL_TAP_PREFIX,
};

/// Where [`TapPool::take`] got the tap from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapSource {
    /// A pooled tap, renamed.
    Pool,
    /// Created on the spot (the pool was empty or disabled).
    Created,
}

/// What [`TapPool::give_back`] did with a tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapFate {
    /// Back in the pool.
    Pooled,
    /// Deleted (the pool was full, or a process still held the tap).
    Deleted,
    /// There was no such tap.
    Absent,
}

/// The pool's bookkeeping; see the module docs.
#[derive(Default, Debug)]
struct PoolState {
    /// Checked pool taps, ready to hand out.
    ready: Vec<String>,
    /// Pool taps found at start, not checked yet.
    unchecked: Vec<String>,
    /// Taps on their way into the pool (being created or given back).
    incoming: usize,
    /// Indexes of every `bgpool<N>` that exists or is being made.
    reserved: BTreeSet<u32>,
}

impl PoolState {
    fn occupancy(&self) -> usize {
        self.ready.len() + self.unchecked.len() + self.incoming
    }

    /// Reserves the lowest free pool name.
    fn reserve(&mut self) -> String {
        let index = (0..=u32::MAX)
            .find(|index| !self.reserved.contains(index))
            .unwrap_or(u32::MAX);
        self.reserved.insert(index);
        pool_tap_name(index)
    }

    fn release(&mut self, name: &str) {
        if let Some(index) = parse_pool_tap_name(name) {
            self.reserved.remove(&index);
        }
    }
}

/// How many taps are ready and the size the pool aims at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub ready: usize,
    pub size: usize,
}

/// A pool of pre-created taps on one bridge.
pub struct TapPool {
    host: Arc<dyn HostNetwork>,
    bridge: String,
    isolated: bool,
    size: usize,
    state: Mutex<PoolState>,
    wake: tokio::sync::Notify,
}

impl TapPool {
    /// A pool of `size` taps on `bridge` (0: no pool, every take creates a
    /// tap and every give-back deletes it).
    #[must_use]
    pub fn new(host: Arc<dyn HostNetwork>, bridge: &str, isolated: bool, size: usize) -> Self {
        Self {
            host,
            bridge: bridge.to_owned(),
            isolated,
            size,
            state: Mutex::new(PoolState::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[must_use]
    pub fn status(&self) -> PoolStatus {
        PoolStatus {
            ready: self.state().ready.len(),
            size: self.size,
        }
    }

    /// Reserves the pool taps that exist on the host (left by an earlier
    /// daemon) for [`TapPool::fill`] to check. Returns their names.
    ///
    /// # Errors
    /// Listing links fails.
    pub async fn adopt(&self) -> Result<Vec<String>, NetlinkError> {
        let found: Vec<String> = self
            .host
            .list_links(POOL_TAP_PREFIX)
            .await?
            .into_iter()
            .filter(|name| parse_pool_tap_name(name).is_some())
            .collect();
        let mut state = self.state();
        for name in &found {
            if let Some(index) = parse_pool_tap_name(name) {
                if state.reserved.insert(index) {
                    state.unchecked.push(name.clone());
                }
            }
        }
        Ok(found)
    }

    /// Fills the pool now, then again each time a take wakes it. Runs until
    /// the task is dropped; failures are logged and retried on the next
    /// wake.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(error) = self.fill().await {
                tracing::warn!(%error, "failed to fill the tap pool");
            }
            self.wake.notified().await;
        }
    }

    /// Checks adopted taps and creates new ones until the pool holds `size`
    /// ready taps. Returns how many were created.
    ///
    /// # Errors
    /// Creating a tap fails (the half-made tap is deleted); the pool keeps
    /// what it has.
    pub async fn fill(&self) -> Result<usize, NetlinkError> {
        loop {
            let Some(name) = self.state().unchecked.pop() else {
                break;
            };
            self.check_adopted(&name).await;
        }
        let mut created = 0;
        loop {
            let name = {
                let mut state = self.state();
                if state.occupancy() >= self.size {
                    break;
                }
                state.incoming += 1;
                state.reserve()
            };
            let made = self.make_pool_tap(&name).await;
            if made.is_err() {
                let _ = self.host.delete_link(&name).await;
            }
            let mut state = self.state();
            state.incoming -= 1;
            match made {
                Ok(()) => {
                    state.ready.push(name);
                    created += 1;
                }
                Err(error) => {
                    state.release(&name);
                    return Err(error);
                }
            }
        }
        Ok(created)
    }

    /// A tap for a VM, named `name` and up on the bridge.
    ///
    /// # Errors
    /// There was no pooled tap and creating one failed. A tap created here
    /// is not removed (the caller's undo deletes it by name).
    pub async fn take(&self, name: &str) -> Result<TapSource, NetlinkError> {
        let pooled = self.state().ready.pop();
        self.wake.notify_one();
        if let Some(pooled) = pooled {
            match self.host.rename_link(&pooled, name, true).await {
                Ok(()) => {
                    self.state().release(&pooled);
                    return Ok(TapSource::Pool);
                }
                Err(error) => {
                    tracing::warn!(%error, tap = %pooled, "could not hand out a pooled tap");
                    self.keep_or_drop(&pooled).await;
                }
            }
        }
        self.host.create_tap(name).await?;
        self.host
            .attach_to_bridge(name, &self.bridge, self.isolated)
            .await?;
        Ok(TapSource::Created)
    }

    /// Returns VM tap `name` to the pool, or deletes it; see the module docs.
    ///
    /// # Errors
    /// Netlink fails for a tap that then could not be deleted either.
    pub async fn give_back(&self, name: &str) -> Result<TapFate, NetlinkError> {
        let Some(status) = self.host.link_status(name).await? else {
            return Ok(TapFate::Absent);
        };
        let reusable = !status.carrier && status.controller.as_deref() == Some(&self.bridge);
        let pooled_name = {
            let mut state = self.state();
            (reusable && state.occupancy() < self.size).then(|| {
                state.incoming += 1;
                state.reserve()
            })
        };
        let Some(pooled_name) = pooled_name else {
            self.host.delete_link(name).await?;
            return Ok(TapFate::Deleted);
        };
        let renamed = self.host.rename_link(name, &pooled_name, false).await;
        {
            let mut state = self.state();
            state.incoming -= 1;
            if renamed.is_ok() {
                state.ready.push(pooled_name);
                return Ok(TapFate::Pooled);
            }
            state.release(&pooled_name);
        }
        if let Err(error) = renamed {
            tracing::warn!(%error, tap = %name, "could not return a tap to the pool; deleting it");
        }
        self.host.delete_link(name).await?;
        Ok(TapFate::Deleted)
    }

    /// Deletes every pool tap. Returns how many.
    ///
    /// # Errors
    /// A deletion fails (the others are still attempted).
    pub async fn drain(&self) -> Result<usize, NetlinkError> {
        let names: Vec<String> = {
            let mut state = self.state();
            let mut names = std::mem::take(&mut state.ready);
            names.append(&mut state.unchecked);
            names
        };
        let mut result = Ok(0);
        for name in &names {
            match self.host.delete_link(name).await {
                Ok(()) => {
                    if let Ok(count) = &mut result {
                        *count += 1;
                    }
                }
                Err(error) => result = Err(error),
            }
            self.state().release(name);
        }
        result
    }

    /// After a failed rename: a pool tap that is still as the pool left it
    /// (say the VM's name was taken) goes back; anything else is deleted.
    async fn keep_or_drop(&self, pooled: &str) {
        match self.host.link_status(pooled).await {
            Ok(Some(status)) if !status.up && !status.carrier => {
                self.state().ready.push(pooled.to_owned());
            }
            _ => {
                let _ = self.host.delete_link(pooled).await;
                self.state().release(pooled);
            }
        }
    }

    /// Creates pool tap `name`: persistent, on the bridge, down.
    async fn make_pool_tap(&self, name: &str) -> Result<(), NetlinkError> {
        self.host.create_tap(name).await?;
        self.host
            .attach_to_bridge(name, &self.bridge, self.isolated)
            .await?;
        self.host.set_link_down(name).await
    }

    /// Keeps an adopted pool tap if the pool has room and no process holds
    /// it, re-attached with the current isolation and down; else deletes it.
    async fn check_adopted(&self, name: &str) {
        let keep = {
            let mut state = self.state();
            let keep = state.occupancy() < self.size;
            if keep {
                state.incoming += 1;
            }
            keep
        };
        let checked = if keep {
            match self.host.link_status(name).await {
                Ok(Some(status)) if !status.carrier => {
                    self.make_pool_tap(name).await.map(|()| true)
                }
                Ok(Some(_)) => Ok(false),
                Ok(None) => {
                    let mut state = self.state();
                    state.incoming -= 1;
                    state.release(name);
                    return;
                }
                Err(error) => Err(error),
            }
        } else {
            Ok(false)
        };
        let kept = match checked {
            Ok(kept) => kept,
            Err(error) => {
                tracing::warn!(%error, tap = %name, "deleting a pool tap that failed its check");
                false
            }
        };
        if !kept {
            if let Err(error) = self.host.delete_link(name).await {
                tracing::warn!(%error, tap = %name, "failed to delete a surplus pool tap");
            }
        }
        let mut state = self.state();
        if keep {
            state.incoming -= 1;
        }
        if kept {
            state.ready.push(name.to_owned());
        } else {
            state.release(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{BridgeConfig, FakeLink, HostNetworkCall, RecordingHostNetwork};

    async fn pool(size: usize) -> (RecordingHostNetwork, TapPool) {
        let host = RecordingHostNetwork::new();
        host.ensure_bridge(&BridgeConfig::default()).await.unwrap();
        let pool = TapPool::new(Arc::new(host.clone()), "banger0", true, size);
        (host, pool)
    }

    fn pool_taps(host: &RecordingHostNetwork) -> Vec<String> {
        host.links()
            .into_keys()
            .filter(|name| name.starts_with(POOL_TAP_PREFIX))
            .collect()
    }

    fn pooled() -> FakeLink {
        FakeLink::Tap {
            controller: Some("banger0".to_owned()),
            isolated: true,
            up: false,
            carrier: false,
        }
    }

    #[tokio::test]
    async fn fill_creates_down_isolated_taps_on_the_bridge() {
        let (host, pool) = pool(3).await;
        assert_eq!(pool.fill().await.unwrap(), 3);
        assert_eq!(pool_taps(&host), ["bgpool0", "bgpool1", "bgpool2"]);
        assert_eq!(host.links()["bgpool1"], pooled());
        assert_eq!(pool.status(), PoolStatus { ready: 3, size: 3 });
        // Full: nothing more to do.
        assert_eq!(pool.fill().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn take_renames_a_pooled_tap_in_one_call() {
        let (host, pool) = pool(2).await;
        pool.fill().await.unwrap();
        let before = host.calls().len();
        assert_eq!(pool.take("bgtap0").await.unwrap(), TapSource::Pool);
        assert_eq!(
            host.calls()[before..],
            [HostNetworkCall::RenameLink {
                name: "bgpool1".to_owned(),
                new_name: "bgtap0".to_owned(),
                up: true
            }]
        );
        assert_eq!(
            host.links()["bgtap0"],
            FakeLink::Tap {
                controller: Some("banger0".to_owned()),
                isolated: true,
                up: true,
                carrier: false
            }
        );
        // Topping up reuses the freed pool name.
        assert_eq!(pool.fill().await.unwrap(), 1);
        assert_eq!(pool_taps(&host), ["bgpool0", "bgpool1"]);
    }

    #[tokio::test]
    async fn an_empty_or_disabled_pool_creates_the_tap() {
        let (host, pool) = pool(0).await;
        assert_eq!(pool.fill().await.unwrap(), 0);
        assert_eq!(pool.take("bgtap4").await.unwrap(), TapSource::Created);
        assert_eq!(
            host.links()["bgtap4"],
            FakeLink::Tap {
                controller: Some("banger0".to_owned()),
                isolated: true,
                up: true,
                carrier: false
            }
        );
        // Disabled: a returned tap is deleted.
        assert_eq!(pool.give_back("bgtap4").await.unwrap(), TapFate::Deleted);
        assert!(host.links().len() == 1, "{:?}", host.links());
    }

    #[tokio::test]
    async fn a_failed_rename_falls_back_to_creating() {
        let (host, pool) = pool(1).await;
        pool.fill().await.unwrap();
        // The VM's name is taken (a stale tap): the pool tap stays pooled
        // and the existing tap is reused.
        host.add_link("bgtap0", FakeLink::new_tap());
        assert_eq!(pool.take("bgtap0").await.unwrap(), TapSource::Created);
        assert_eq!(pool_taps(&host), ["bgpool0"]);
        assert_eq!(pool.status().ready, 1);
        // A pool tap left in an unknown state by a failed rename is dropped.
        host.fail_call(host.calls().len());
        host.set_carrier("bgpool0", true);
        assert_eq!(pool.take("bgtap1").await.unwrap(), TapSource::Created);
        assert!(host.links().contains_key("bgtap1"));
        assert_eq!(pool_taps(&host), Vec::<String>::new(), "broken tap kept");
        assert_eq!(pool.status().ready, 0);
        assert_eq!(pool.fill().await.unwrap(), 1);
        assert_eq!(pool_taps(&host), ["bgpool0"]);
    }

    #[tokio::test]
    async fn give_back_returns_clean_taps_while_there_is_room() {
        let (host, pool) = pool(1).await;
        pool.take("bgtap0").await.unwrap();
        pool.take("bgtap1").await.unwrap();
        pool.take("bgtap2").await.unwrap();
        host.set_carrier("bgtap0", true);
        host.set_carrier("bgtap1", true);
        host.set_carrier("bgtap1", false);
        // Still held by a process: never pooled.
        assert_eq!(pool.give_back("bgtap0").await.unwrap(), TapFate::Deleted);
        assert_eq!(pool.give_back("bgtap1").await.unwrap(), TapFate::Pooled);
        assert_eq!(host.links()["bgpool0"], pooled());
        // Full now.
        assert_eq!(pool.give_back("bgtap2").await.unwrap(), TapFate::Deleted);
        assert_eq!(pool.give_back("bgtap9").await.unwrap(), TapFate::Absent);
        assert_eq!(
            host.links().into_keys().collect::<Vec<_>>(),
            ["banger0", "bgpool0"]
        );
        // The returned tap is handed out again.
        assert_eq!(pool.take("bgtap5").await.unwrap(), TapSource::Pool);
    }

    #[tokio::test]
    async fn adopted_taps_are_checked_and_trimmed_to_size() {
        let (host, pool) = pool(2).await;
        // Left by an earlier daemon: one fine, one up and off the bridge
        // (killed mid-creation), one held by a process, one surplus.
        host.add_link("bgpool0", pooled());
        host.add_link(
            "bgpool3",
            FakeLink::Tap {
                controller: None,
                isolated: false,
                up: true,
                carrier: false,
            },
        );
        host.add_link(
            "bgpool5",
            FakeLink::Tap {
                controller: Some("banger0".to_owned()),
                isolated: true,
                up: true,
                carrier: true,
            },
        );
        host.add_link("bgpool7", pooled());
        host.add_link("bgpoolside", FakeLink::new_tap());
        assert_eq!(
            pool.adopt().await.unwrap(),
            ["bgpool0", "bgpool3", "bgpool5", "bgpool7"]
        );
        assert_eq!(pool.fill().await.unwrap(), 0);
        let taps = pool_taps(&host);
        assert_eq!(taps.len(), 3, "{taps:?}");
        assert!(taps.contains(&"bgpoolside".to_owned()), "not ours: kept");
        assert!(!taps.contains(&"bgpool5".to_owned()), "held tap kept");
        for name in taps.iter().filter(|name| *name != "bgpoolside") {
            assert_eq!(host.links()[name], pooled(), "{name}");
        }
        assert_eq!(pool.status().ready, 2);
        assert_eq!(pool.drain().await.unwrap(), 2);
        assert_eq!(pool_taps(&host), ["bgpoolside"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_takes_and_returns_never_share_a_name() {
        let (host, pool) = pool(4).await;
        let pool = Arc::new(pool);
        pool.fill().await.unwrap();
        let mut tasks = Vec::new();
        for index in 0..16 {
            let pool = Arc::clone(&pool);
            tasks.push(tokio::spawn(async move {
                let name = format!("bgtap{index}");
                pool.take(&name).await.unwrap();
                pool.fill().await.unwrap();
                pool.give_back(&name).await.unwrap()
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        pool.fill().await.unwrap();
        assert_eq!(pool_taps(&host).len(), 4);
        assert_eq!(pool.status().ready, 4);
        assert_eq!(host.links().len(), 5, "{:?}", host.links());
    }
}
