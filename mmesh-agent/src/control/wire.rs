//! The control plane's messages as the agent decodes them: a snapshot's
//! accounts left as their bytes, each decoded when it is validated.
//!
//! Decoded whole, a snapshot of 100,000 accounts (a 20 MB message) became
//! 67 MB of strings and vectors, alive beside the raw schema made from it
//! and the encoded accounts held for deltas: the agent's peak. These types
//! have the contract's field numbers and types (`proto/mmesh/v1/control.proto`,
//! `ControlMessage`, `Snapshot`, `Policy`, and the last-known-good file's
//! `LastKnownGood`), except that an account is its
//! bytes, a slice of the received message (no copy). Protobuf's rules hold
//! as for the generated types: a policy given twice is merged (its
//! accounts appended), unknown fields are skipped.

use bytes::Bytes;

use super::proto;

/// `mmesh.v1.ControlMessage`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ControlMessage {
    #[prost(oneof = "Body", tags = "1, 2, 3")]
    pub body: Option<Body>,
}

/// `mmesh.v1.ControlMessage.body`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    #[prost(message, tag = "1")]
    Snapshot(Snapshot),
    #[prost(message, tag = "2")]
    Delta(proto::Delta),
    #[prost(message, tag = "3")]
    Heartbeat(proto::Heartbeat),
}

/// `mmesh.v1.Snapshot`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Snapshot {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub nonce: String,
    #[prost(message, optional, tag = "3")]
    pub policy: Option<Policy>,
}

/// `mmesh.v1.LastKnownGood`: the last-known-good file's payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LastKnownGood {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub policy: Option<Policy>,
}

/// `mmesh.v1.Policy`, its accounts encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Policy {
    #[prost(message, optional, tag = "1")]
    pub global: Option<proto::Global>,
    #[prost(message, optional, tag = "2")]
    pub defaults: Option<proto::Defaults>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub accounts: Vec<Bytes>,
}

/// An account decoded from its bytes.
pub fn account(bytes: &[u8]) -> Result<proto::Account, prost::DecodeError> {
    <proto::Account as prost::Message>::decode(bytes)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn account(id: &str) -> proto::Account {
        proto::Account {
            id: id.into(),
            prefixes: vec!["10.0.0.1".into(), "fd00::1".into()],
            mode: Some("monitor".into()),
            limits: Some(proto::Limits {
                inbound: Some(proto::DirLimits {
                    pps: Some("1k".into()),
                    ..proto::DirLimits::default()
                }),
                outbound: None,
            }),
            ..proto::Account::default()
        }
    }

    fn policy(ids: &[&str]) -> proto::Policy {
        proto::Policy {
            global: Some(proto::Global {
                mode: Some("enforce".into()),
                events_per_second: Some("100".into()),
                ..proto::Global::default()
            }),
            defaults: Some(proto::Defaults {
                mode: Some("monitor".into()),
                limits: None,
            }),
            accounts: ids.iter().map(|id| account(id)).collect(),
        }
    }

    /// Every account as its bytes and decoded, equal to what was sent.
    fn decoded(p: &Policy) -> Vec<proto::Account> {
        p.accounts
            .iter()
            .map(|b| super::account(b).expect("decodes"))
            .collect()
    }

    #[test]
    fn a_snapshot_reads_as_the_contracts_message_with_its_accounts_as_bytes() {
        let snapshot = proto::Snapshot {
            version: "v7".into(),
            nonce: "n".into(),
            policy: Some(policy(&["a", "b"])),
        };
        let sent = proto::ControlMessage {
            body: Some(proto::control_message::Body::Snapshot(snapshot.clone())),
        };
        let bytes = Bytes::from(sent.encode_to_vec());
        let Some(Body::Snapshot(s)) = ControlMessage::decode(bytes.clone()).expect("decodes").body
        else {
            panic!("a snapshot");
        };
        assert_eq!((s.version.as_str(), s.nonce.as_str()), ("v7", "n"));
        // The same bytes again: nothing of the contract's message is lost.
        assert_eq!(s.encode_to_vec(), snapshot.encode_to_vec());
        let p = s.policy.expect("a policy");
        let want = policy(&["a", "b"]);
        assert_eq!((&p.global, &p.defaults), (&want.global, &want.defaults));
        assert_eq!(decoded(&p), want.accounts);
        // The accounts lie in the received message: no copies.
        let whole = bytes.as_ptr_range();
        assert!(
            p.accounts
                .iter()
                .all(|a| whole.contains(&a.as_ptr()) && !a.is_empty())
        );
        assert_eq!(&*p.accounts[1], &*account("b").encode_to_vec());
    }

    #[test]
    fn a_policy_given_twice_is_merged_and_other_bodies_decode_as_generated() {
        // Two `policy` fields in one snapshot, as protobuf allows: merged,
        // the second's accounts after the first's, its `global` merged in.
        let mut twice = proto::Snapshot {
            version: "v1".into(),
            nonce: String::new(),
            policy: Some(policy(&["a"])),
        }
        .encode_to_vec();
        let mut second = policy(&["b", "c"]);
        second.defaults = None;
        if let Some(g) = second.global.as_mut() {
            g.mode = None;
            g.malformed = Some("drop".into());
        }
        proto::Snapshot {
            policy: Some(second),
            ..proto::Snapshot::default()
        }
        .encode(&mut twice)
        .expect("room");
        let generated = proto::Snapshot::decode(twice.as_slice()).expect("decodes");
        let mine = Snapshot::decode(Bytes::from(twice)).expect("decodes");
        let (want, got) = (generated.policy.expect("one"), mine.policy.expect("one"));
        assert_eq!((&got.global, &got.defaults), (&want.global, &want.defaults));
        assert_eq!(
            want.global.as_ref().and_then(|g| g.malformed.as_deref()),
            Some("drop")
        );
        assert_eq!(decoded(&got), want.accounts);
        assert_eq!(want.accounts.len(), 3);

        let delta = proto::ControlMessage {
            body: Some(proto::control_message::Body::Delta(proto::Delta {
                version: "v2".into(),
                base_version: "v1".into(),
                upsert_accounts: vec![account("a")],
                ..proto::Delta::default()
            })),
        };
        let Some(Body::Delta(d)) = ControlMessage::decode(Bytes::from(delta.encode_to_vec()))
            .expect("decodes")
            .body
        else {
            panic!("a delta");
        };
        assert_eq!(
            Some(proto::control_message::Body::Delta(d)),
            delta.body,
            "as the generated type decodes it"
        );
        assert!(super::account(&[0x0a, 0x05, b'a']).is_err());
    }
}
