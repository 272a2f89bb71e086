//! Who created or changed a work item's content through this router, for the self-approval check.
//!
//! The store has no column for a work item's creator, so the router remembers, in memory, the token names
//! that created, edited, attached a recipe to or submitted each work item through it. It is per process:
//! lost on restart, not shared between replicas, and blind to work items created by a host in-process;
//! requirements drafts are checked against their stored `proposed_by` instead.

use orchestrator_core::ids::WorkItemId;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// How many work items are remembered (the oldest are forgotten first).
const CAPACITY: usize = 100_000;

#[derive(Debug, Default)]
pub(crate) struct Authors {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_item: HashMap<WorkItemId, Vec<String>>,
    order: VecDeque<WorkItemId>,
}

impl Authors {
    /// Records that `name` created or changed `item`.
    pub(crate) fn record(&self, item: WorkItemId, name: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *g;
        match inner.by_item.get_mut(&item) {
            Some(names) => {
                if !names.iter().any(|n| n == name) {
                    names.push(name.to_string());
                }
            }
            None => {
                if inner.order.len() >= CAPACITY {
                    if let Some(old) = inner.order.pop_front() {
                        inner.by_item.remove(&old);
                    }
                }
                inner.by_item.insert(item, vec![name.to_string()]);
                inner.order.push_back(item);
            }
        }
    }

    /// Whether `name` created or changed `item` through this router.
    pub(crate) fn is_author(&self, item: WorkItemId, name: &str) -> bool {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.by_item.get(&item).is_some_and(|names| names.iter().any(|n| n == name))
    }
}
