#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| jrs_fuzz::targets::dialback::run(data));
