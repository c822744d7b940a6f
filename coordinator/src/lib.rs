//! The Swell coordinator (library): the engine, its store and MQTT loop, and
//! (feature `kube`) its Kubernetes face. The component map, module by module,
//! is docs/architecture.md.

pub mod assemble;
pub mod engine;
pub mod epoch;
pub mod fleet;
pub mod heap_trim;
pub mod http;
pub mod ingest_probe;
#[cfg(feature = "kube")]
pub mod k8s;
pub mod keyfile;
pub mod metrics;
pub mod ops;
pub mod precheck;
pub mod presence;
pub mod rollout;
pub mod server;
pub mod status;
pub mod store;
