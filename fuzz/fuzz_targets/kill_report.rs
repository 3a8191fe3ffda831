#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rbdfence::fuzzing::kill_report(data));
