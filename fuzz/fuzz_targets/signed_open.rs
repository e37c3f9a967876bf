#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| publisher_transport_fuzz::check_signed_open(data));
