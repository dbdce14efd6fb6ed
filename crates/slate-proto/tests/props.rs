//! Property tests of the agent wire protocol (issue #8, "bad input at every boundary"):
//! the decoder never panics on arbitrary byte streams (random bytes, a valid length
//! prefix with a random body, valid frames mutated), never reads a frame over
//! `MAX_FRAME`, and `encode` → `read_frame` gives back every message it was given.
//! The same inputs drive the cargo-fuzz target `fuzz/fuzz_targets/proto_decode.rs`.

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use slate_proto::*;
use std::collections::BTreeMap;

/// Cases per property (proptest's default is 256).
const CASES: u32 = 1024;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z0-9._/ -]{0,40}",
        Just(String::new()),
        Just("\"\\\u{0}\u{7f}\u{2028}\u{fffd}".to_string()),
    ]
}

fn env() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(text(), text(), 0..4)
}

fn stream() -> impl Strategy<Value = Stream> {
    prop_oneof![Just(Stream::Stdout), Just(Stream::Stderr)]
}

fn outcome() -> impl Strategy<Value = StepOutcome> {
    prop_oneof![
        Just(StepOutcome::Ok),
        Just(StepOutcome::Failed),
        Just(StepOutcome::TimedOut),
        Just(StepOutcome::SpawnError),
    ]
}

fn agent_msg() -> impl Strategy<Value = AgentMsg> {
    prop_oneof![
        (any::<u32>(), text(), text(), any::<u64>()).prop_map(
            |(protocol, token, agent_version, resume_after)| AgentMsg::Hello {
                protocol,
                token,
                agent_version,
                resume_after,
            }
        ),
        any::<u32>().prop_map(|step| AgentMsg::StepStarted { step }),
        (
            any::<u64>(),
            any::<u32>(),
            stream(),
            vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(seq, step, stream, data)| AgentMsg::Output {
                seq,
                step,
                stream,
                data,
            }),
        (
            any::<u32>(),
            outcome(),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
            any::<u64>()
        )
            .prop_map(|(step, outcome, exit_code, signal, duration_ms)| {
                AgentMsg::StepFinished {
                    step,
                    outcome,
                    exit_code,
                    signal,
                    duration_ms,
                }
            }),
        any::<bool>().prop_map(|success| AgentMsg::Done { success }),
        Just(AgentMsg::Heartbeat),
    ]
}

fn step_spec() -> impl Strategy<Value = StepSpec> {
    (text(), text(), any::<Option<u64>>(), any::<bool>(), env()).prop_map(
        |(name, run, timeout_ms, allow_failure, env)| StepSpec {
            name,
            run,
            timeout_ms,
            allow_failure,
            env,
        },
    )
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<i64>(), text(), env(), vec(step_spec(), 0..4)).prop_map(
            |(job_id, workdir, env, steps)| ServerMsg::Welcome {
                job: JobSpec {
                    job_id,
                    workdir,
                    env,
                    steps,
                    collect: Vec::new(),
                },
            }
        ),
        text().prop_map(|reason| ServerMsg::Reject { reason }),
        any::<u64>().prop_map(|seq| ServerMsg::Ack { seq }),
        text().prop_map(|reason| ServerMsg::Cancel { reason }),
    ]
}

/// Reads frames until the first error, as a connection loop does; returns how many
/// decoded. Never more than one frame per 4 bytes of input.
fn drain<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) -> usize {
    let mut r = bytes;
    let mut n = 0;
    loop {
        match read_frame::<_, T>(&mut r) {
            Ok(_) => n += 1,
            Err(ProtoError::TooLarge(len)) => {
                assert!(len > MAX_FRAME);
                return n;
            }
            Err(_) => return n,
        }
        assert!(n <= bytes.len() / 4);
    }
}

/// A frame with a correct length prefix around an arbitrary body.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn read_frame_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..4096)) {
        drain::<AgentMsg>(&bytes);
        drain::<ServerMsg>(&bytes);
    }

    #[test]
    fn read_frame_never_panics_on_well_framed_garbage(
        bodies in vec(prop_oneof![
            vec(any::<u8>(), 0..512),
            // JSON-looking bodies get further into the decoder.
            "\\{\"type\":\"(hello|output|step_finished|done|heartbeat|welcome|ack)\"[ -~]{0,80}\\}"
                .prop_map(String::into_bytes),
        ], 1..6)
    ) {
        let stream: Vec<u8> = bodies.iter().flat_map(|b| framed(b)).collect();
        drain::<AgentMsg>(&stream);
        drain::<ServerMsg>(&stream);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        msgs in vec(agent_msg(), 1..4),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        for (at, byte) in flips {
            let i = at.index(stream.len());
            stream[i] = byte;
        }
        let cut = cut.index(stream.len() + 1);
        drain::<AgentMsg>(&stream[..cut]);
        drain::<ServerMsg>(&stream[..cut]);
    }

    #[test]
    fn oversized_length_prefixes_are_refused_before_reading(len in (MAX_FRAME as u32 + 1)..=u32::MAX) {
        let bytes = len.to_be_bytes();
        let r: Result<AgentMsg, _> = read_frame(&mut &bytes[..]);
        prop_assert!(matches!(r, Err(ProtoError::TooLarge(n)) if n == len as usize));
    }

    #[test]
    fn agent_messages_round_trip(msgs in vec(agent_msg(), 1..5)) {
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut r = &stream[..];
        for m in &msgs {
            let back: AgentMsg = read_frame(&mut r).unwrap();
            prop_assert_eq!(&back, m);
        }
        prop_assert!(matches!(read_frame::<_, AgentMsg>(&mut r), Err(ProtoError::Closed)));
    }

    #[test]
    fn server_messages_round_trip(msgs in vec(server_msg(), 1..5)) {
        let mut stream = Vec::new();
        for m in &msgs {
            write_frame(&mut stream, m).unwrap();
        }
        let mut r = &stream[..];
        for m in &msgs {
            let back: ServerMsg = read_frame(&mut r).unwrap();
            prop_assert_eq!(&back, m);
        }
        prop_assert!(matches!(read_frame::<_, ServerMsg>(&mut r), Err(ProtoError::Closed)));
    }
}
