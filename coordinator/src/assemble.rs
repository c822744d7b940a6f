//! One way to put a coordinator together, used by `swell-coordinator` (both
//! modes), `swell demo`, the fleet benchmark's coordinator process and the
//! test harnesses, so what is benchmarked and tested is the production wiring:
//! the epoch raised in `{state_dir}/epoch` (ROLL-4; combined with the lease
//! term in Kubernetes mode), the instance id of `{state_dir}/instance`
//! (`crate::presence`), the store opened in `{state_dir}/db`, the engine
//! started from it, and the server loop run ([`crate::server::run_with`]).

use crate::engine::{Engine, EngineError, Out, Settings};
use crate::server::{self, Hooks, LoopConfig, unix_now};
use crate::store::{DEFAULT_CACHE_BYTES, DiskStore, StoreError};
use std::path::PathBuf;
use std::sync::Arc;
use swell_mqtt::MqttConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssembleError {
    #[error("{path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What a coordinator is made of.
#[derive(Debug)]
pub struct Coordinator {
    /// Its `epoch` is set at start.
    pub settings: Settings,
    pub state_dir: PathBuf,
    pub db_cache_bytes: u64,
    pub mqtt: MqttConfig,
    pub loop_cfg: LoopConfig,
}

/// A coordinator whose engine has started, ready to serve.
#[derive(Debug)]
pub struct Started {
    pub engine: Engine,
    initial: Vec<Out>,
    mqtt: MqttConfig,
    loop_cfg: LoopConfig,
}

impl Coordinator {
    pub fn new(settings: Settings, state_dir: PathBuf, mqtt: MqttConfig) -> Self {
        Coordinator {
            settings,
            state_dir,
            db_cache_bytes: DEFAULT_CACHE_BYTES,
            mqtt,
            loop_cfg: LoopConfig::default(),
        }
    }

    /// Raises the epoch, opens the store, starts the engine. `lease_term`:
    /// the Kubernetes lease's term this replica leads in, if it runs elected.
    pub fn start(mut self, lease_term: Option<u32>) -> Result<Started, AssembleError> {
        std::fs::create_dir_all(&self.state_dir).map_err(|source| AssembleError::StateDir {
            path: self.state_dir.clone(),
            source,
        })?;
        let path = self.state_dir.join("epoch");
        let local = crate::epoch::next(&path).map_err(|source| AssembleError::StateDir {
            path: path.clone(),
            source,
        })?;
        self.settings.epoch = match lease_term {
            Some(term) => crate::epoch::of_term(term, local),
            None => local,
        };
        let instance = crate::presence::instance_id(&self.state_dir).map_err(|source| {
            AssembleError::StateDir {
                path: self.state_dir.join("instance"),
                source,
            }
        })?;
        self.loop_cfg.instance = Some(instance);
        let store = Arc::new(DiskStore::open_with_cache(
            &self.state_dir.join("db"),
            self.db_cache_bytes,
        )?);
        let (engine, initial) = Engine::start(self.settings, store, unix_now())?;
        Ok(Started {
            engine,
            initial,
            mqtt: self.mqtt,
            loop_cfg: self.loop_cfg,
        })
    }
}

impl Started {
    pub fn epoch(&self) -> u64 {
        self.engine.epoch()
    }

    /// Runs the server loop until `cancel` fires (or the lease is lost).
    pub async fn serve(
        self,
        cancel: CancellationToken,
        ready: watch::Sender<bool>,
        hooks: Hooks,
    ) -> Result<(), EngineError> {
        server::run_with(
            self.engine,
            self.initial,
            self.mqtt,
            self.loop_cfg,
            cancel,
            ready,
            hooks,
        )
        .await
    }
}
