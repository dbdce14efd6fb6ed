//! Property tests of the webhook boundary (issue #8, "bad input at every boundary"): the
//! signature check never accepts a body it was not signed for, nor a header it did not
//! compute, and never panics on arbitrary headers; `parse_event` never panics on
//! arbitrary bytes and event names (nor on real payloads cut or mutated), and real
//! payloads round-trip. The same inputs drive `fuzz/fuzz_targets/webhook_parse.rs`.

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{json, Value};
use slate_core::Secret;
use slate_forge::webhook::{parse_event, verify_signature, PrAction, SignatureError, WebhookEvent};
use slate_testkit::github::{
    fixture, fixture_bytes, fixture_names, pr_payload, push_payload, sign,
};
use std::sync::OnceLock;

/// Cases per property (proptest's default is 256).
const CASES: u32 = 1024;

/// Every real payload with the event name GitHub sends it under (its directory).
fn fixtures() -> &'static [(String, Vec<u8>)] {
    static F: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    F.get_or_init(|| {
        let all: Vec<_> = fixture_names()
            .into_iter()
            .map(|n| (n.split('/').next().unwrap().to_string(), fixture_bytes(&n)))
            .collect();
        assert!(all.len() >= 9, "fixtures missing: {}", all.len());
        all
    })
}

fn event_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("pull_request".to_string()),
        Just("push".to_string()),
        Just("ping".to_string()),
        any::<String>(),
    ]
}

fn header() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "sha256=[0-9a-fA-F]{0,70}",
        "sha256=[0-9a-f]{64}",
        "(sha1|sha256|SHA256|sha512)=?[ -~]{0,80}",
        " *sha256=[0-9a-f]{64} *",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn a_signature_verifies_only_its_own_body_and_secret(
        secret in "[ -~]{1,64}",
        other_secret in "[ -~]{1,64}",
        body in vec(any::<u8>(), 0..2048),
        other in vec(any::<u8>(), 0..2048),
    ) {
        let header = sign(&secret, &body);
        prop_assert_eq!(verify_signature(&Secret::new(secret.clone()), &body, Some(&header)), Ok(()));
        if other != body {
            prop_assert_eq!(
                verify_signature(&Secret::new(secret.clone()), &other, Some(&header)),
                Err(SignatureError::Mismatch)
            );
        }
        if other_secret != secret {
            prop_assert_eq!(
                verify_signature(&Secret::new(other_secret), &body, Some(&header)),
                Err(SignatureError::Mismatch)
            );
        }
    }

    #[test]
    fn a_changed_digest_never_verifies(
        body in vec(any::<u8>(), 0..512),
        at in 0usize..64,
        digit in "[0-9a-f]",
    ) {
        let header = sign("It's a Secret to Everybody", &body);
        let mut hexd: Vec<char> = header["sha256=".len()..].chars().collect();
        let d = digit.chars().next().unwrap();
        prop_assume!(hexd[at] != d);
        hexd[at] = d;
        let forged = format!("sha256={}", hexd.into_iter().collect::<String>());
        prop_assert_eq!(
            verify_signature(&Secret::new("It's a Secret to Everybody"), &body, Some(&forged)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn arbitrary_headers_never_panic_and_never_verify(
        secret in any::<String>(),
        body in vec(any::<u8>(), 0..512),
        header in proptest::option::of(header()),
    ) {
        let s = Secret::new(secret.clone());
        let r = verify_signature(&s, &body, header.as_deref());
        // Only the right digest is accepted: a random one matches with odds 2^-256.
        let right = header.as_deref().map(str::trim).map(str::to_ascii_lowercase)
            == Some(sign(&secret, &body));
        prop_assert!(r.is_err() || right, "{header:?} accepted");
        if secret.is_empty() {
            prop_assert_eq!(r, Err(SignatureError::NoSecret));
        }
    }

    #[test]
    fn parse_event_never_panics_on_arbitrary_bytes(
        event in event_name(),
        body in vec(any::<u8>(), 0..2048),
    ) {
        let _ = parse_event(&event, &body);
    }

    #[test]
    fn parse_event_never_panics_on_cut_or_mutated_payloads(
        which in any::<prop::sample::Index>(),
        event in proptest::option::of(event_name()),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let (name, bytes) = which.get(fixtures());
        let mut bytes = bytes.clone();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        let cut = cut.index(bytes.len() + 1);
        let _ = parse_event(event.as_deref().unwrap_or(name), &bytes[..cut]);
    }

    #[test]
    fn parse_event_never_panics_on_wrongly_typed_fields(
        which in prop::sample::select(vec!["pull_request/opened.payload.json", "push/payload.json", "ping/payload.json"]),
        path in prop::sample::select(vec![
            "action", "number", "ref", "before", "after", "deleted", "zen", "repository",
            "pusher", "sender", "pull_request", "pull_request/title", "pull_request/draft",
            "pull_request/head", "pull_request/head/repo", "pull_request/head/sha",
            "pull_request/base/repo/full_name", "pull_request/user",
        ]),
        value in prop_oneof![
            Just(Value::Null), Just(json!(-1)), Just(json!(1e300)), Just(json!(u64::MAX)),
            Just(json!([])), Just(json!({})), Just(json!(true)), any::<String>().prop_map(Value::String),
        ],
    ) {
        let event = which.split('/').next().unwrap();
        let mut v = fixture(which);
        let mut at = &mut v;
        for key in path.split('/') {
            if !at.is_object() { break; }
            at = &mut at[key];
        }
        *at = value;
        let _ = parse_event(event, &serde_json::to_vec(&v).unwrap());
    }

    /// Re-encoding a real payload (pretty, with fields GitHub may add one day) parses to
    /// the same event.
    #[test]
    fn fixtures_round_trip_through_reencoding(
        which in any::<prop::sample::Index>(),
        extra in vec(("x_[a-z]{1,8}", any::<String>()), 0..4),
        pretty in any::<bool>(),
    ) {
        let (event, bytes) = which.get(fixtures());
        let parsed = parse_event(event, bytes).unwrap();
        let mut v: Value = serde_json::from_slice(bytes).unwrap();
        for (k, s) in extra {
            v[&k] = Value::String(s.clone());
            if v["pull_request"].is_object() {
                v["pull_request"][&k] = Value::String(s);
            }
        }
        let again = if pretty { serde_json::to_vec_pretty(&v) } else { serde_json::to_vec(&v) }.unwrap();
        prop_assert_eq!(parse_event(event, &again).unwrap(), parsed);
    }

    /// The fields the server acts on come out as they were put into a real payload.
    #[test]
    fn pull_request_fields_round_trip(
        action in prop::sample::select(vec!["opened", "reopened", "synchronize", "closed", "labeled", "edited"]),
        repo in "[A-Za-z0-9_.-]{1,20}/[A-Za-z0-9_.-]{1,20}",
        number in any::<u64>(),
        head in "[0-9a-f]{40}",
        head_ref in any::<String>(),
        base in "[0-9a-f]{40}",
        base_ref in any::<String>(),
    ) {
        let clone = format!("https://github.com/{repo}.git");
        let body = pr_payload(action, &repo, &clone, number, &head, &head_ref, &base, &base_ref);
        let WebhookEvent::PullRequest(pr) = parse_event("pull_request", &body).unwrap() else {
            panic!("not a pull request");
        };
        prop_assert_eq!(pr.action.as_str(), action);
        prop_assert_eq!(pr.action.clone(), PrAction::parse(action));
        prop_assert_eq!(pr.number, number);
        prop_assert_eq!(&pr.repo, &repo);
        prop_assert_eq!(&pr.clone_url, &clone);
        prop_assert_eq!(&pr.head_sha, &head);
        prop_assert_eq!(&pr.head_ref, &head_ref);
        prop_assert_eq!(&pr.base_sha, &base);
        prop_assert_eq!(&pr.base_ref, &base_ref);
        prop_assert!(!pr.from_fork);
    }

    #[test]
    fn push_fields_round_trip(
        repo in "[A-Za-z0-9_.-]{1,20}/[A-Za-z0-9_.-]{1,20}",
        branch in any::<String>(),
        before in "[0-9a-f]{40}",
        after in "[0-9a-f]{40}",
    ) {
        let clone = format!("https://github.com/{repo}.git");
        let body = push_payload(&repo, &clone, &branch, &before, &after);
        let WebhookEvent::Push(push) = parse_event("push", &body).unwrap() else {
            panic!("not a push");
        };
        prop_assert_eq!(&push.repo, &repo);
        prop_assert_eq!(&push.branch, &branch);
        prop_assert_eq!(&push.before, &before);
        prop_assert_eq!(&push.after, &after);
        prop_assert!(!push.deleted);
    }
}
