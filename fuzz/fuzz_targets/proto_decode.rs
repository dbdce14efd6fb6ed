//! The agent protocol decoder: arbitrary bytes read as a stream of frames, both as the
//! server reads them (`AgentMsg`) and as the agent does (`ServerMsg`). Every frame that
//! decodes must encode again and decode to the same message; an oversized length must be
//! refused before anything is allocated for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slate_proto::{encode, read_frame, AgentMsg, ProtoError, ServerMsg, MAX_FRAME};

fn drain<T>(data: &[u8])
where
    T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut r = data;
    loop {
        match read_frame::<_, T>(&mut r) {
            Ok(msg) => {
                let bytes = encode(&msg).expect("a decoded message encodes");
                let back: T = read_frame(&mut &bytes[..]).expect("and decodes again");
                assert_eq!(back, msg);
            }
            Err(ProtoError::TooLarge(n)) => {
                assert!(n > MAX_FRAME);
                return;
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    drain::<AgentMsg>(data);
    drain::<ServerMsg>(data);
});
