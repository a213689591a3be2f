//! Heartbeat datagrams between workers and the scheduler: their wire form and how they are
//! authenticated. The worker side is `crate::worker::registration`, the scheduler side
//! `crate::scheduler::registry`.
//!
//! A registration hands the worker a fresh HMAC-SHA256 key over the (token- or
//! certificate-checked) membership call. Every datagram carries a sequence number that grows
//! within a registration and a MAC over it, so a datagram can be neither forged nor replayed
//! to keep a dead worker alive; the scheduler's acknowledgements carry a MAC too, so a forged
//! "unknown" cannot make a worker drop its tasks.

use aws_lc_rs::hmac;
use prost::Message as _;

use crate::proto::{HeartbeatAck, HeartbeatDatagram};

/// Larger than any datagram of this protocol (an instance id is at most a few hundred bytes).
pub const MAX_DATAGRAM: usize = 1024;

/// The key of one registration's heartbeats.
#[derive(Clone)]
pub struct HeartbeatKey(hmac::Key);

impl HeartbeatKey {
    /// A new random key: its bytes for the registration answer, and the key.
    pub fn generate() -> (Vec<u8>, HeartbeatKey) {
        let mut bytes = vec![0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source");
        let key = HeartbeatKey::from_bytes(&bytes);
        (bytes, key)
    }

    pub fn from_bytes(bytes: &[u8]) -> HeartbeatKey {
        HeartbeatKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The datagram of heartbeat `sequence` of `instance_id`.
    pub fn beat(&self, instance_id: &str, sequence: u64) -> Vec<u8> {
        let mac = self.sign(&beat_message(instance_id, sequence));
        HeartbeatDatagram { instance_id: instance_id.into(), sequence, mac }.encode_to_vec()
    }

    /// Whether `beat` was made with this key.
    pub fn verify_beat(&self, beat: &HeartbeatDatagram) -> bool {
        hmac::verify(&self.0, &beat_message(&beat.instance_id, beat.sequence), &beat.mac).is_ok()
    }

    /// The scheduler's answer to heartbeat `sequence`.
    pub fn ack(&self, instance_id: &str, sequence: u64, known: bool) -> Vec<u8> {
        let mac = self.sign(&ack_message(instance_id, sequence, known));
        HeartbeatAck { instance_id: instance_id.into(), sequence, known, mac }.encode_to_vec()
    }

    /// Whether `ack` was made with this key.
    pub fn verify_ack(&self, ack: &HeartbeatAck) -> bool {
        hmac::verify(&self.0, &ack_message(&ack.instance_id, ack.sequence, ack.known), &ack.mac).is_ok()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        hmac::sign(&self.0, message).as_ref().to_vec()
    }
}

/// The answer to a heartbeat from a worker the scheduler has no key for (it restarted): it
/// cannot be authenticated, so it only makes the worker ask over the authenticated call.
pub fn unauthenticated_unknown(instance_id: &str, sequence: u64) -> Vec<u8> {
    HeartbeatAck { instance_id: instance_id.into(), sequence, known: false, mac: Vec::new() }.encode_to_vec()
}

// The messages differ in their first bytes, so an acknowledgement can never pass for a
// heartbeat (or the other way round).
fn beat_message(instance_id: &str, sequence: u64) -> Vec<u8> {
    [b"beat".as_slice(), &sequence.to_be_bytes(), instance_id.as_bytes()].concat()
}

fn ack_message(instance_id: &str, sequence: u64, known: bool) -> Vec<u8> {
    [b"ack".as_slice(), &[u8::from(known)], &sequence.to_be_bytes(), instance_id.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_and_acks_verify_only_with_their_key_and_content() {
        let (bytes, key) = HeartbeatKey::generate();
        assert_eq!(bytes.len(), 32);
        let beat = HeartbeatDatagram::decode(key.beat("w1", 7).as_slice()).unwrap();
        assert!(key.verify_beat(&beat));
        let (_, other) = HeartbeatKey::generate();
        assert!(!other.verify_beat(&beat), "another registration's key");
        let replayed_later = HeartbeatDatagram { sequence: 8, ..beat.clone() };
        assert!(!key.verify_beat(&replayed_later), "the sequence is under the MAC");
        let renamed = HeartbeatDatagram { instance_id: "w2".into(), ..beat.clone() };
        assert!(!key.verify_beat(&renamed), "the instance id is under the MAC");

        let ack = HeartbeatAck::decode(key.ack("w1", 7, true).as_slice()).unwrap();
        assert!(key.verify_ack(&ack));
        let flipped = HeartbeatAck { known: false, ..ack.clone() };
        assert!(!key.verify_ack(&flipped), "`known` is under the MAC");
        // A heartbeat's MAC is no acknowledgement's.
        let reflected = HeartbeatAck { instance_id: "w1".into(), sequence: 7, known: true, mac: beat.mac };
        assert!(!key.verify_ack(&reflected));
        let hint = HeartbeatAck::decode(unauthenticated_unknown("w1", 7).as_slice()).unwrap();
        assert!(!hint.known && !key.verify_ack(&hint));
    }
}
