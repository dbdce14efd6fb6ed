//! The webhook boundary: `verify_signature` over arbitrary headers and bodies, then
//! `parse_event` over arbitrary bodies and event names. Input layout: one byte choosing
//! the event name, a header line (the signature, also tried as an event name), then the
//! body. A crash, a hang, or a signature accepted without the secret is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slate_core::Secret;
use slate_forge::webhook::{parse_event, verify_signature};

const EVENTS: [&str; 5] = ["pull_request", "push", "ping", "issue_comment", ""];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (line, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&rest[..0], rest),
    };
    let line = String::from_utf8_lossy(line);

    // No input can carry a valid HMAC of itself under a secret it does not know.
    let secret = Secret::new("slate fuzz secret");
    assert!(verify_signature(&secret, body, Some(&line)).is_err());
    let _ = verify_signature(&secret, body, None);
    let _ = verify_signature(&Secret::new(""), body, Some(&line));

    let _ = parse_event(EVENTS[pick as usize % EVENTS.len()], body);
    let _ = parse_event(&line, body);
});
