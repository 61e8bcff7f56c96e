//! Loaders, replay file and recipe on fixtures written in the traces' schemas.

use std::path::PathBuf;

use medes_trace::{
    DurationsReader, FunctionInvocations, Invocations2021Reader, InvocationsReader, MemoryReader,
    ReadError, RecipeConfig, Trace, TraceReadError, TraceStats, Trigger, bin_2021, recipe,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn collect_err<T>(it: impl Iterator<Item = Result<T, ReadError>>) -> ReadError {
    it.filter_map(Result::err).next().expect("an error")
}

#[test]
fn invocations_2019_load() {
    let rows: Vec<FunctionInvocations> =
        InvocationsReader::open(fixture("invocations_per_function_md.anon.d01.csv"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].trigger, Trigger::Http);
    assert_eq!(rows[0].total(), 11);
    assert_eq!(rows[0].counts[59], 2);
    assert_eq!(rows[1].trigger, Trigger::Timer);
    assert_eq!(rows[1].total(), 1440);
    assert_eq!(rows[3].counts.len(), 1440);
    assert_eq!(
        (
            rows[2].owner.as_str(),
            rows[2].app.as_str(),
            rows[2].function.as_str()
        ),
        ("o2", "a2", "f3")
    );
}

#[test]
fn malformed_count_names_line_and_column() {
    let e = collect_err(InvocationsReader::open(fixture("invocations_bad_count.csv")).unwrap());
    match &e {
        ReadError::Field {
            line,
            column,
            name,
            value,
            ..
        } => {
            assert_eq!(
                (*line, *column, name.as_str(), value.as_str()),
                (3, 11, "7", "x")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains("line 3, column 11"), "{e}");
}

#[test]
fn unknown_trigger_and_short_row_are_errors() {
    let e = collect_err(InvocationsReader::open(fixture("invocations_bad_trigger.csv")).unwrap());
    assert!(
        matches!(
            &e,
            ReadError::Field {
                line: 4,
                column: 4,
                ..
            }
        ),
        "{e:?}"
    );
    let e = collect_err(InvocationsReader::open(fixture("invocations_short_row.csv")).unwrap());
    assert!(
        matches!(
            e,
            ReadError::Width {
                line: 5,
                expected: 1444,
                found: 1439
            }
        ),
        "{e:?}"
    );
}

#[test]
fn bad_header_is_rejected_before_rows() {
    let e = InvocationsReader::open(fixture("invocations_bad_header.csv"))
        .err()
        .expect("header error");
    assert!(matches!(&e, ReadError::Header { column: 21, .. }), "{e:?}");
    let e = DurationsReader::open(fixture("app_memory_percentiles.anon.d01.csv"))
        .err()
        .expect("header error");
    assert!(matches!(&e, ReadError::Header { column: 3, .. }), "{e:?}");
    let e = InvocationsReader::open(fixture("no-such-file.csv"))
        .err()
        .expect("open error");
    assert!(matches!(e, ReadError::Open { .. }));
}

#[test]
fn durations_and_memory_load_and_reject_bad_values() {
    let d: Vec<_> = DurationsReader::open(fixture("function_durations_percentiles.anon.d01.csv"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(d.len(), 3);
    assert_eq!(d[2].average_ms, 2000.25);
    assert_eq!(d[2].count, 2060);
    assert_eq!(
        d[0].percentiles_ms,
        [3.0, 4.0, 50.0, 100.0, 180.0, 850.0, 900.0]
    );
    let e = collect_err(DurationsReader::open(fixture("durations_negative.csv")).unwrap());
    assert!(
        matches!(
            &e,
            ReadError::Field {
                line: 3,
                column: 4,
                problem: "negative value",
                ..
            }
        ),
        "{e:?}"
    );

    let m: Vec<_> = MemoryReader::open(fixture("app_memory_percentiles.anon.d01.csv"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].average_mb, 150.5);
    assert_eq!(m[1].percentiles_mb[7], 64.0);
    let e = collect_err(MemoryReader::open(fixture("memory_empty_field.csv")).unwrap());
    assert!(
        matches!(
            &e,
            ReadError::Field {
                line: 3,
                column: 2,
                problem: "empty field",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn azure_2021_loads_and_bins_by_arrival_minute() {
    let rows: Vec<_> = Invocations2021Reader::open(fixture("azure2021_invocations.csv"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 7);
    assert!((rows[2].start_s() - 59.5).abs() < 1e-9);
    let binned = bin_2021(rows.into_iter().map(Ok), 0).unwrap();
    assert_eq!(binned.len(), 3);
    let fa = &binned[0];
    assert_eq!((fa.app.as_str(), fa.function.as_str()), ("app1", "fa"));
    assert_eq!((fa.counts[0], fa.counts[1]), (2, 1));
    let fb = &binned[1];
    assert_eq!((fb.counts[0], fb.counts[2]), (1, 1));
    // app3: one arrival on day 0 (86399.8 s), the other on day 1.
    assert_eq!(binned[2].total(), 1);
    let e = collect_err(Invocations2021Reader::open(fixture("azure2021_bad_number.csv")).unwrap());
    assert!(
        matches!(
            &e,
            ReadError::Field {
                line: 4,
                column: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn replay_file_round_trips_and_rejects_bad_rows() {
    let t = Trace::read_path(fixture("replay_ok.csv")).unwrap();
    assert_eq!(t.len(), 3);
    let e = t.entries();
    assert_eq!((e[0].time_ms, e[0].function.as_str()), (0, "vanilla"));
    assert_eq!(e[0].params.as_ref().unwrap()["n"], 10);
    // Stable sort keeps file order among equal times.
    assert_eq!(
        (e[1].function.as_str(), e[2].function.as_str()),
        ("linalg", "imagepro")
    );
    assert!(e[1].params.is_none());
    let mut buf = Vec::new();
    t.write(&mut buf).unwrap();
    assert_eq!(Trace::read(buf.as_slice()).unwrap(), t);

    let err = Trace::read_path(fixture("replay_bad_json.csv")).unwrap_err();
    assert!(
        matches!(
            &err,
            TraceReadError::Field {
                line: 3,
                column: 3,
                problem: "invalid json",
                ..
            }
        ),
        "{err:?}"
    );
    let err = Trace::read_path(fixture("replay_bad_time.csv")).unwrap_err();
    assert!(
        matches!(
            &err,
            TraceReadError::Field {
                line: 3,
                column: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let err = Trace::read(&b"t,f,p\n"[..]).unwrap_err();
    assert!(matches!(err, TraceReadError::Header { .. }));
}

#[test]
fn recipe_from_loaded_trace_is_deterministic_and_scaled() {
    let load =
        || InvocationsReader::open(fixture("invocations_per_function_md.anon.d01.csv")).unwrap();
    let cfg = RecipeConfig {
        seed: 5,
        functions: vec!["linalg".into(), "vanilla".into()],
        min_per_hour: 1.0,
        max_per_hour: 10_000.0,
        ..Default::default()
    };
    let a = recipe(load(), &cfg).unwrap();
    let b = recipe(load(), &cfg).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.picks.len(), 2);
    for p in &a.picks {
        assert_eq!(p.start_minute % 60, 0);
        assert!(p.source_invocations > 0);
        let n = a
            .trace
            .entries()
            .iter()
            .filter(|e| e.function == p.function)
            .count() as u64;
        assert_eq!(n, p.invocations);
        // ×5 of an integer count is exact.
        assert_eq!(p.invocations, 5 * p.source_invocations);
        if p.trigger == Trigger::Timer {
            let ts: Vec<u64> = a
                .trace
                .entries()
                .iter()
                .filter(|e| e.function == p.function)
                .map(|e| e.time_ms)
                .collect();
            let gaps: Vec<u64> = ts.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(gaps.iter().all(|&g| g == 12_000), "periodic: {gaps:?}");
        }
    }
    assert!(a.trace.entries().iter().all(|e| e.time_ms < 3_600_000));
    let stats = TraceStats::of(&a.trace);
    assert_eq!(stats.invocations, a.trace.len() as u64);
    let c = recipe(
        load(),
        &RecipeConfig {
            seed: 6,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_ne!(a.trace, c.trace);
    let too_many = RecipeConfig {
        functions: (0..10).map(|i| format!("f{i}")).collect(),
        ..cfg
    };
    assert!(recipe(load(), &too_many).is_err());
}
