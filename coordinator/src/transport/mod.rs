//! Network edges of the coordinator. The MQTT session is shared with the agent
//! and lives in its own crate (`swell-mqtt`).

pub use swell_mqtt as mqtt;
