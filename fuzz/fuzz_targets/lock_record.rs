#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rbdfence::fuzzing::lock_record(data));
