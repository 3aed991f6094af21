//! Per-gateway MQTT topic names: `{prefix}/{site}/{gateway}/{channel}`.
//!
//! AWS IoT Core allows at most 7 slashes and 256 bytes in a topic name and reserves topics
//! that start with `$`; [`Topics::new`] refuses a prefix or ids that would break any of that.

use super::envelope::Kind;
use super::payload::{Target, is_topic_segment};

/// The most slashes a topic may have (AWS IoT Core).
pub const MAX_TOPIC_SLASHES: usize = 7;
/// The longest topic name in bytes (AWS IoT Core).
pub const MAX_TOPIC_BYTES: usize = 256;
/// The prefix used when the configuration names none.
pub const DEFAULT_PREFIX: &str = "doorbridge";

/// The gateway's topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Snapshot manifests (signed), cloud → gateway.
    Manifest,
    /// Snapshot chunks (bare), cloud → gateway.
    Chunk,
    /// Deltas (signed), cloud → gateway.
    Delta,
    /// Heartbeats (signed), cloud → gateway; published at `QoS` 0.
    Heartbeat,
    /// Open-door commands (signed), cloud → gateway.
    OpenDoor,
    /// Resync commands (signed), cloud → gateway.
    Resync,
    /// Door-unit settings (signed), cloud → gateway.
    Settings,
    /// Online/offline, retained, gateway → cloud.
    State,
    /// Acks, rejections and resync requests, gateway → cloud.
    Sync,
    /// Results of commands, gateway → cloud.
    CommandResult,
    /// Outbox records (activity, door events, alarms, battery readings) in batches,
    /// gateway → cloud.
    Records,
    /// Telemetry summaries (battery per unit, gateway health), gateway → cloud.
    Telemetry,
}

impl Channel {
    pub const ALL: [Channel; 12] = [
        Channel::Manifest,
        Channel::Chunk,
        Channel::Delta,
        Channel::Heartbeat,
        Channel::OpenDoor,
        Channel::Resync,
        Channel::Settings,
        Channel::State,
        Channel::Sync,
        Channel::CommandResult,
        Channel::Records,
        Channel::Telemetry,
    ];
    /// The channels the gateway subscribes to.
    pub const INBOUND: [Channel; 7] = [
        Channel::Manifest,
        Channel::Chunk,
        Channel::Delta,
        Channel::Heartbeat,
        Channel::OpenDoor,
        Channel::Resync,
        Channel::Settings,
    ];
    /// The channels the gateway publishes on.
    pub const OUTBOUND: [Channel; 5] = [
        Channel::State,
        Channel::Sync,
        Channel::CommandResult,
        Channel::Records,
        Channel::Telemetry,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Channel::Manifest => "keys/manifest",
            Channel::Chunk => "keys/chunk",
            Channel::Delta => "keys/delta",
            Channel::Heartbeat => "keys/heartbeat",
            Channel::OpenDoor => "cmd/open-door",
            Channel::Resync => "cmd/resync",
            Channel::Settings => "cmd/settings",
            Channel::State => "state",
            Channel::Sync => "sync",
            Channel::CommandResult => "cmd/result",
            Channel::Records => "records",
            Channel::Telemetry => "telemetry",
        }
    }

    /// The envelope kind a message on this channel must carry (`None`: not an envelope).
    pub fn kind(self) -> Option<Kind> {
        match self {
            Channel::Manifest => Some(Kind::Manifest),
            Channel::Delta => Some(Kind::Delta),
            Channel::Heartbeat => Some(Kind::Heartbeat),
            Channel::OpenDoor => Some(Kind::OpenDoor),
            Channel::Resync => Some(Kind::Resync),
            Channel::Settings => Some(Kind::UnitSettings),
            Channel::Chunk
            | Channel::State
            | Channel::Sync
            | Channel::CommandResult
            | Channel::Records
            | Channel::Telemetry => None,
        }
    }
}

/// Why the topics cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error(
        "topic prefix {0:?}: each level must be non-empty, without '+', '#' or NUL, and not start with '$'"
    )]
    BadPrefix(String),
    #[error("{0:?} cannot stand as one topic level")]
    BadId(String),
    #[error("topic {topic:?} has {slashes} slashes; AWS IoT Core allows {MAX_TOPIC_SLASHES}")]
    TooDeep { topic: String, slashes: usize },
    #[error("topic {0:?} is longer than {MAX_TOPIC_BYTES} bytes")]
    TooLong(String),
}

/// The topic names of one gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(prefix: &str, target: &Target) -> Result<Topics, TopicError> {
        if prefix.starts_with('$') || !prefix.split('/').all(is_topic_segment) {
            return Err(TopicError::BadPrefix(prefix.into()));
        }
        for id in [&target.site, &target.gateway] {
            if !is_topic_segment(id) || id.starts_with('$') {
                return Err(TopicError::BadId(id.clone()));
            }
        }
        let topics = Topics {
            base: format!("{prefix}/{}/{}", target.site, target.gateway),
        };
        for channel in Channel::ALL {
            let topic = topics.topic(channel);
            let slashes = topic.matches('/').count();
            if slashes > MAX_TOPIC_SLASHES {
                return Err(TopicError::TooDeep { topic, slashes });
            }
            if topic.len() > MAX_TOPIC_BYTES {
                return Err(TopicError::TooLong(topic));
            }
        }
        Ok(topics)
    }

    /// The full topic name of `channel`.
    pub fn topic(&self, channel: Channel) -> String {
        format!("{}/{}", self.base, channel.suffix())
    }

    /// Which of this gateway's channels `topic` is, if any.
    pub fn channel_of(&self, topic: &str) -> Option<Channel> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix('/')?;
        Channel::ALL.into_iter().find(|c| c.suffix() == rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            site: "s1".into(),
            gateway: "gw1".into(),
        }
    }

    #[test]
    fn topics_are_per_gateway_under_the_prefix() {
        let t = Topics::new(DEFAULT_PREFIX, &target()).unwrap();
        assert_eq!(
            t.topic(Channel::Manifest),
            "doorbridge/s1/gw1/keys/manifest"
        );
        assert_eq!(
            t.topic(Channel::OpenDoor),
            "doorbridge/s1/gw1/cmd/open-door"
        );
        for c in Channel::ALL {
            assert_eq!(t.channel_of(&t.topic(c)), Some(c));
        }
        assert_eq!(t.channel_of("doorbridge/s1/gw2/keys/manifest"), None);
        assert_eq!(t.channel_of("doorbridge/s1/gw1/keys"), None);
        assert_eq!(t.channel_of("doorbridge/s1/gw1keys/chunk"), None);
    }

    #[test]
    fn at_most_seven_slashes() {
        // A prefix of 4 levels gives the deepest topic exactly 7 slashes.
        let t = Topics::new("a/b/c/d", &target()).unwrap();
        assert_eq!(t.topic(Channel::Delta).matches('/').count(), 7);
        assert!(matches!(
            Topics::new("a/b/c/d/e", &target()),
            Err(TopicError::TooDeep { slashes: 8, .. })
        ));
    }

    #[test]
    fn bad_prefixes_and_ids_are_refused() {
        for prefix in ["", "a//b", "a/+", "#", "$aws/things", "a/"] {
            assert!(
                matches!(
                    Topics::new(prefix, &target()),
                    Err(TopicError::BadPrefix(_))
                ),
                "{prefix:?}"
            );
        }
        let mut t = target();
        t.gateway = "g/1".into();
        assert!(matches!(Topics::new("p", &t), Err(TopicError::BadId(_))));
        let mut t = target();
        t.site = "x".repeat(250);
        assert!(matches!(Topics::new("p", &t), Err(TopicError::TooLong(_))));
    }
}
