#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rbdfence::fuzzing::blocklist_ls(data));
