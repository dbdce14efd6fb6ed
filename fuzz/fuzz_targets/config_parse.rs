//! The config parser: arbitrary text through `Config::parse`; every error must point at a
//! line ≥ 1 within the text and a column ≥ 1, and name a key or say something. Each line
//! is also tried as a duration and a size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slate_core::config::Config;
use slate_core::duration::{parse_duration, parse_size};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Err(errs) = Config::parse(&text, "slate.toml") {
        assert!(!errs.0.is_empty());
        let lines = text.split('\n').count();
        for e in &errs.0 {
            assert!(e.line >= 1 && e.line <= lines.max(1), "{e}");
            assert!(e.column >= 1, "{e}");
            assert!(
                !e.key.trim().is_empty() || !e.message.trim().is_empty(),
                "{e:?}"
            );
            let _ = e.to_string();
        }
    }
    for line in text.lines().take(64) {
        let _ = parse_duration(line);
        let _ = parse_size(line);
    }
});
