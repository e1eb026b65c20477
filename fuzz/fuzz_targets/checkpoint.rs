#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| snapblk::fuzzing::checkpoint(data));
