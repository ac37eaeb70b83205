//! Gateway documents as an operator or a request body may give them: any bytes.
//!
//! Invariants: parsing never panics; a refusal is one line naming the origin; an accepted
//! gateway writes back to a document that parses to the same gateway, its shares add up
//! to the routes' weights, and its bucket table only names its own targets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use splitter_common::table::{build_bucket_table, BUCKET_TABLE_SIZE};
use splitter_user::gateway::{parse_documents, Document};

const ORIGIN: &str = "fuzz.yaml";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_documents(ORIGIN, text) {
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "a refusal is one line: {line:?}");
            assert!(line.starts_with(ORIGIN), "a refusal names where: {line:?}");
        }
        Ok(documents) => {
            for document in documents {
                let Document::Gateway(gateway) = document else { continue };
                let yaml = gateway.to_yaml();
                match parse_documents("written back", &yaml).as_deref() {
                    Ok([Document::Gateway(again)]) => {
                        assert_eq!(again, &gateway, "the written document parses to the same gateway:\n{yaml}")
                    }
                    other => panic!("the written document does not parse back: {other:?}\n{yaml}"),
                }
                let shares = gateway.weighted_targets();
                let total: u64 = shares.iter().map(|(_, s)| u64::from(*s)).sum();
                let weights: u64 = gateway.routes.iter().filter(|r| !r.targets.is_empty()).map(|r| u64::from(r.weight.min(10_000))).sum();
                assert_eq!(total, weights * 100, "shares (ppm) add up to the weights of routes with targets");
                let slots = build_bucket_table(&gateway.table_targets());
                assert!(slots.is_empty() || slots.len() == BUCKET_TABLE_SIZE);
                assert!(slots.iter().all(|s| usize::from(*s) < shares.len()), "a slot names a target of the gateway");
            }
        }
    }
});
