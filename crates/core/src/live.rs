//! A sandbox the server runs: its record, agent channel, tier instance and each feature's
//! per-sandbox state. Features see it through narrow views (`observe::UsageSource`,
//! `interp::KernelHost`, `network::NetSlot`), never whole.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::agent_client::AgentClient;
use crate::envd::EnvdState;
use crate::observe::SandboxObs;
use crate::store::{SandboxRecord, SandboxState};
use crate::tier::{AnyInstance, TierKind};
use crate::time::now_ms;

/// A sandbox the server is running.
#[derive(Debug)]
pub struct Live {
    pub record: Mutex<SandboxRecord>,
    pub client: Arc<AgentClient>,
    pub envd: Arc<EnvdState>,
    /// Code-interpreter contexts (port 49999).
    pub interp: crate::interp::Contexts,
    /// Metrics, security events and audit records of this sandbox.
    pub obs: Arc<SandboxObs>,
    /// The sandbox's network (egress policy, connections); empty once torn down.
    pub net: crate::network::NetSlot,
    /// When the sandbox was last used, for idle timeouts.
    pub activity: Activity,
    /// The isolation tier it runs in.
    pub tier: TierKind,
    /// The tier's live instance; taken (and with that ended) when the sandbox goes.
    pub(crate) instance: Mutex<Option<AnyInstance>>,
}

impl crate::observe::UsageSource for Live {
    fn usage(&self) -> Option<crate::tier::Usage> {
        self.with_instance(|i| i.usage()).flatten()
    }

    fn limit_events(&self) -> Option<(u64, u64)> {
        self.with_instance(|i| i.limit_events())
    }

    fn memory_cpu(&self) -> Option<(u64, Option<u64>)> {
        self.with_instance(|i| i.memory_cpu()).flatten()
    }

    fn disk_usage(&self) -> Option<(u64, u64)> {
        self.with_instance(|i| i.disk_usage()).flatten()
    }

    fn sizes(&self) -> Option<(u32, u32)> {
        self.record.lock().ok().map(|r| (r.cpu_count, r.disk_mb))
    }
}

impl crate::interp::KernelHost for Live {
    fn sandbox_id(&self) -> String {
        self.id()
    }

    fn env(&self) -> BTreeMap<String, String> {
        self.record.lock().map(|r| r.env.clone()).unwrap_or_default()
    }

    fn client(&self) -> &Arc<AgentClient> {
        &self.client
    }

    fn contexts(&self) -> &crate::interp::Contexts {
        &self.interp
    }

    fn obs(&self) -> &Arc<SandboxObs> {
        &self.obs
    }

    fn tier(&self) -> Option<TierKind> {
        self.with_instance(|i| i.kind())
    }

    fn can_inject(&self) -> bool {
        self.with_instance(|i| i.injectable().is_some()).unwrap_or(false)
    }

    fn inject(
        &self,
        zygote: &ringfence_jail::zygote::Zygote,
        plan: &ringfence_jail::zygote::EntryPlan,
        within: Duration,
    ) -> Result<ringfence_jail::zygote::Injected, ringfence_jail::zygote::ZygoteError> {
        use ringfence_jail::zygote::ZygoteError;
        self.with_instance(|i| match i.injectable() {
            Some(sb) => zygote.inject(sb, plan, within),
            None => Err(ZygoteError::Entry {
                step: "enter".into(),
                message: "this sandbox's tier has no namespaces to enter".into(),
            }),
        })
        .unwrap_or(Err(ZygoteError::SandboxGone))
    }
}

/// Signs of use the idle timeout looks at.
#[derive(Debug, Default)]
pub struct Activity {
    /// Unix ms of the last API request for the sandbox (or of its start).
    pub last_ms: std::sync::atomic::AtomicI64,
    /// cgroup CPU time at the last idle check, and when that was.
    pub cpu_ns: std::sync::atomic::AtomicU64,
    pub cpu_checked_ms: std::sync::atomic::AtomicI64,
}

impl Live {
    /// Wraps a started (or re-attached) instance, counted as used now and linked to its
    /// observer.
    pub(crate) fn new(
        record: SandboxRecord,
        client: Arc<AgentClient>,
        obs: Arc<SandboxObs>,
        instance: AnyInstance,
    ) -> Arc<Live> {
        let live = Arc::new(Live {
            tier: instance.kind(),
            record: Mutex::new(record),
            client,
            envd: Arc::new(EnvdState::observed(obs.clone())),
            interp: Default::default(),
            obs: obs.clone(),
            net: Mutex::default(),
            activity: Activity::default(),
            instance: Mutex::new(Some(instance)),
        });
        live.touch();
        let source: Arc<dyn crate::observe::UsageSource> = live.clone();
        obs.attach(Arc::downgrade(&source));
        live
    }

    /// The sandbox's state, without copying its record.
    pub fn state(&self) -> Option<SandboxState> {
        self.record.lock().ok().map(|r| r.state)
    }

    /// Marks the sandbox as used now.
    pub fn touch(&self) {
        self.activity.last_ms.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes the tier's instance out (dropping it ends the sandbox).
    pub fn take_instance(&self) -> Option<AnyInstance> {
        self.instance.lock().ok().and_then(|mut j| j.take())
    }

    /// Runs `f` on the tier's instance, if the sandbox still has one.
    pub fn with_instance<R>(&self, f: impl FnOnce(&AnyInstance) -> R) -> Option<R> {
        let guard = self.instance.lock().ok()?;
        guard.as_ref().map(f)
    }

    pub fn snapshot(&self) -> Option<SandboxRecord> {
        self.record.lock().ok().map(|r| r.clone())
    }

    /// The sandbox's id (empty only if its record's lock is poisoned).
    pub fn id(&self) -> String {
        self.record.lock().map(|r| r.id.clone()).unwrap_or_default()
    }

    /// The API key that owns the sandbox.
    pub fn key_id(&self) -> String {
        self.record.lock().map(|r| r.key_id.clone()).unwrap_or_default()
    }
}
