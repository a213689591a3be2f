//! The configuration schema, its loading and its documented rendering, through `load_str`.

use super::*;

fn load(text: &str) -> Result<Loaded, Vec<String>> {
    load_str(text, "node.toml", Vec::new()).map_err(|e| e.0)
}

fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Loaded, Vec<String>> {
    load_str(text, "node.toml", env.iter().map(|(k, v)| (k.to_string(), v.to_string()))).map_err(|e| e.0)
}

#[test]
fn defaults_match_the_reference() {
    let c = load("").unwrap().config;
    assert_eq!(c.cluster_id, "polars-onprem");
    assert_eq!(c.scheduler.client_service.bind_addr, Address::any(5051));
    assert_eq!(c.scheduler.worker_service.bind_addr, Address::any(5050));
    assert_eq!(c.worker.task_service.bind_addr, Address::any(5052));
    assert_eq!(c.worker.shuffle_service.bind_addr, Address::any(5053));
    assert_eq!(c.observatory.service.bind_addr, Address::any(5049));
    assert_eq!(c.observatory.rest_api.service.bind_addr, Address::any(3001));
    assert!(c.observatory.rest_api.enabled);
    assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(5));
    assert!(c.scheduler.allow_local_scans && c.scheduler.allow_local_sinks && !c.scheduler.deny_anonymous_users);
    assert_eq!(c.observatory.max_metrics_bytes_total, 104857600);
    assert_eq!(c.observatory.database_path, PathBuf::from("/tmp/polars/observatory/data.db"));
    assert_eq!(
        c.worker.shuffle_location,
        StorageLocation::Local(LocalPath { path: "/tmp/polars/shuffle-data".into() })
    );
    assert!(c.monitoring.host_metrics.enabled);
}

#[test]
fn the_seed_layout_parses() {
    let text = r#"
instance_id = "worker-0"
cluster_id = "polars-onprem"

[worker]
enabled = true
task_service.bind_addr.port = 4005
task_service.public_addr = "192.168.1.1:4005"
shuffle_service.bind_addr.port = 4006
shuffle_service.public_addr = "192.168.1.1:4006"
heartbeat_period = "PT5S"

[static_leader]
leader_instance_id = "scheduler"
scheduler_service.public_addr = "192.168.1.2:5051"
observatory_service.public_addr = "192.168.1.2:5049"
"#;
    let c = load(text).unwrap().config;
    assert!(c.worker.enabled);
    assert_eq!(c.worker.task_service.bind_addr, Address::any(4005));
    assert_eq!(c.worker.shuffle_service.public_addr, Some(Address::parse("192.168.1.1:4006").unwrap()));
    assert_eq!(c.static_leader.leader_instance_id.as_deref(), Some("scheduler"));
}

#[test]
fn jwks_issuers_are_one_string_or_a_list_on_every_service_with_auth() {
    let jwks = |issuers: &str| format!("jwks.url = \"https://idp.example/jwks.json\"\njwks.issuers = {issuers}\n");
    for section in ["scheduler.client_service.auth", "observatory.rest_api.service.auth"] {
        let pick = |c: Config| match section.starts_with("scheduler") {
            true => c.scheduler.client_service.auth,
            false => c.observatory.rest_api.service.auth,
        };
        for (issuers, expected) in [
            ("\"https://idp.example\"", vec!["https://idp.example"]),
            ("[\"https://a.example\", \"https://b.example\"]", vec!["https://a.example", "https://b.example"]),
            ("[]", Vec::<&str>::new()),
        ] {
            let text = format!("[{section}]\n{}", jwks(issuers));
            let c = load(&text).unwrap_or_else(|e| panic!("{text}: {e:?}")).config;
            assert_eq!(pick(c).unwrap().jwks.issuers, expected, "{text}");
        }
        let errors = load(&format!("[{section}]\n{}", jwks("5"))).err().unwrap();
        assert!(errors.iter().any(|e| e.contains("a string or a list of strings")), "{errors:?}");
    }
}

/// The forms Polars' own tooling and users write for the same keys: every one is read.
#[test]
fn keys_take_every_form_their_writers_use() {
    let c = load(
        "memory_limit = \"16GiB\"\ncpu_reserved = \"1.5\"\n[worker]\nheartbeat_period = 5\n\
         env_vars = { POLARS_MAX_THREADS = 4, POLARS_VERBOSE = true, RATIO = 0.5, NAME = \"x\" }\n\
         [scheduler]\ncheckpoint.period = 60\nclient_service.bind_addr = \":5051\"\n\
         client_service.auth.jwks = { url = \"https://idp/jwks\", audience = [\"a\", \"b\"] }\n\
         [observatory]\nmax_metrics_bytes_total = \"100 MB\"\n\
         rest_api.service.auth.jwks = { url = \"https://idp/jwks\", audience = \"c\" }\n",
    )
    .unwrap()
    .config;
    assert_eq!(c.memory_limit, Some(16 << 30));
    assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(5));
    assert_eq!(c.scheduler.checkpoint.unwrap().period.unwrap().0, Duration::from_secs(60));
    assert_eq!(c.scheduler.client_service.bind_addr, Address::any(5051));
    assert_eq!(c.scheduler.client_service.auth.unwrap().jwks.audience, ["a", "b"]);
    assert_eq!(c.observatory.rest_api.service.auth.unwrap().jwks.audience, ["c"]);
    assert_eq!(c.observatory.max_metrics_bytes_total, 100_000_000);
    let env: Vec<(&str, &str)> = c.worker.env_vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(env, [("NAME", "x"), ("POLARS_MAX_THREADS", "4"), ("POLARS_VERBOSE", "true"), ("RATIO", "0.5")]);
    let c = load("memory_limit = 17179869184\ncpu_reserved = 2\n[observatory]\nmax_metrics_bytes_total = 1000\n")
        .unwrap()
        .config;
    assert_eq!((c.memory_limit, c.observatory.max_metrics_bytes_total), (Some(17179869184), 1000));
    for (size, bytes) in [("512k", 512_000), ("1.5 GiB", 1_610_612_736), ("7", 7), ("2TB", 2_000_000_000_000)] {
        assert_eq!(parse_byte_size(size), Ok(bytes), "{size}");
    }
    let errors = load("memory_limit = \"lots\"\n").err().unwrap();
    assert!(errors[0].contains("`lots` is not a size"), "{errors:?}");
    let errors = load("[worker]\nheartbeat_period = -5\n").err().unwrap();
    assert!(errors[0].contains("a string or a whole number"), "{errors:?}");
}

#[test]
fn durations_in_iso_and_friendly_forms() {
    for (text, secs) in [("PT5S", 5), ("5s", 5), ("5 secs", 5), ("1m 30s", 90), ("PT1M30S", 90), ("2 minutes", 120)] {
        assert_eq!(ConfigDuration::parse(text).unwrap().0, Duration::from_secs(secs), "{text}");
    }
    let errors = load("[worker]\nheartbeat_period = \"soon\"\n").err().unwrap();
    assert_eq!(
        errors,
        vec![
            "node.toml:2: `worker.heartbeat_period`: `soon` is not a duration: write it as \"5s\", \"2 mins\", \"1h 30m\" or ISO 8601 \"PT5S\""
        ]
    );
    assert_eq!(ConfigDuration(Duration::from_secs(90)).to_string(), "1m 30s");
}

#[test]
fn unknown_keys_name_the_key_its_line_and_the_nearest_valid_key() {
    let errors = load("[scheduler]\nenabled = true\nclient_sevice.bind_addr = \":1\"\n").err().unwrap();
    assert_eq!(
        errors,
        vec!["node.toml:3: unknown key `scheduler.client_sevice`; did you mean `scheduler.client_service`?"]
    );

    // Every unknown key is reported in one run, each with its own line.
    let errors =
        load("instanc_id = \"a\"\n[worker]\nenabled = true\nheartbeat_perod = \"5s\"\n[observatory]\nbogus = 1\n")
            .err()
            .unwrap();
    assert_eq!(
        errors,
        vec![
            "node.toml:1: unknown key `instanc_id`; did you mean `instance_id`?",
            "node.toml:4: unknown key `worker.heartbeat_perod`; did you mean `worker.heartbeat_period`?",
            "node.toml:6: unknown key `observatory.bogus`; valid keys here: enabled, service, rest_api, database_path, max_metrics_bytes_total, database_export",
        ]
    );

    // A real key in the wrong section.
    let errors = load("[scheduler]\nheartbeat_period = \"5s\"\n").err().unwrap();
    assert_eq!(
        errors,
        vec![
            "node.toml:2: unknown key `scheduler.heartbeat_period`; `heartbeat_period` belongs at `worker.heartbeat_period`"
        ]
    );
}

#[test]
fn wrong_types_are_located() {
    let errors = load("[scheduler]\nenabled = \"yes\"\n\n[worker.task_service]\nbind_addr = 5052\n").err().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0], "node.toml:2: `scheduler.enabled`: invalid type: string \"yes\", expected a boolean");
    assert!(
        errors[1].starts_with(
            "node.toml:5: `worker.task_service.bind_addr`: invalid type: integer `5052`, expected an address"
        ),
        "{}",
        errors[1]
    );
}

#[test]
fn malformed_toml_is_a_syntax_error_with_its_line() {
    let errors = load("[scheduler]\nenabled = true\n[worker\n").err().unwrap();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("node.toml:3: TOML syntax error:"), "{}", errors[0]);
}

#[test]
fn environment_overrides_any_key() {
    let c = load_env(
        "[worker]\nenabled = false\n",
        &[
            ("PC_CUBLET__worker__enabled", "true"),
            ("PC_CUBLET__worker__heartbeat_period", "10s"),
            ("PC_CUBLET__worker__task_service__public_addr", "10.0.0.7:5052"),
            ("PC_CUBLET__worker__shuffle_service__bind_addr", "{ port = 4006 }"),
            ("PC_CUBLET__instance_id", "worker-7"),
            ("UNRELATED", "x"),
        ],
    )
    .unwrap()
    .config;
    assert!(c.worker.enabled);
    assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(10));
    assert_eq!(c.worker.task_service.public_addr, Some(Address::parse("10.0.0.7:5052").unwrap()));
    assert_eq!(c.worker.shuffle_service.bind_addr, Address::any(4006));
    assert_eq!(c.instance_id, "worker-7");

    let errors = load_env("", &[("PC_CUBLET__worker__heartbeat_perod", "10s")]).err().unwrap();
    assert_eq!(
        errors,
        vec![
            "environment variable PC_CUBLET__worker__heartbeat_perod: unknown key `worker.heartbeat_perod`; did you mean `worker.heartbeat_period`?"
        ]
    );
}

#[test]
fn real_keys_not_implemented_yet_warn_and_load() {
    let loaded = load("[license.on_prem_enterprise]\nlicense_path = \"/etc/polars/license.json\"\n[scheduler]\ncheckpoint.period = \"1m\"\n[worker]\ncheckpoint_location.local.path = \"/var/lib/polars/checkpoints\"\n").unwrap();
    assert_eq!(loaded.warnings, vec!["`license` is accepted but not implemented yet; it has no effect"]);
}

#[test]
fn storage_locations() {
    let c = load("[worker]\nshuffle_location = { s3 = { url = \"s3://bucket/shuffle\", region = \"eu-west-1\" } }\n[scheduler]\nanonymous_result_location.shared_filesystem.path = \"/mnt/results\"\n").unwrap().config;
    match &c.worker.shuffle_location {
        StorageLocation::S3(o) => {
            assert_eq!(o.url, "s3://bucket/shuffle");
            assert_eq!(o.options.get("region").map(String::as_str), Some("eu-west-1"));
        }
        other => panic!("{other:?}"),
    }
    assert!(!c.worker.shuffle_location.is_local());
    assert_eq!(
        c.scheduler.anonymous_result_location,
        StorageLocation::SharedFilesystem(LocalPath { path: "/mnt/results".into() })
    );
}

#[test]
fn default_config_is_complete_and_reads_back() {
    let text = default_config_toml(&[]);
    let c = load(&text).unwrap().config;
    assert_eq!(c.instance_id, "polars-node");
    assert_eq!(c.worker.heartbeat_period.0, Duration::from_secs(5));
    // Every key of the schema appears, set or commented out, with its documentation.
    for path in all_key_paths() {
        let leaf = path.rsplit('.').next().unwrap();
        assert!(
            text.contains(&format!("{leaf} ="))
                || text.contains(&format!("[{path}]"))
                || text.contains(&format!("# [{path}]")),
            "{path} missing from:\n{text}"
        );
    }
    assert!(
        text.contains("# How often the worker tells the scheduler it is alive.\nheartbeat_period = \"5s\""),
        "{text}"
    );
    assert!(
        text.contains("[scheduler.client_service]\n# Address the service listens on.\nbind_addr = \":5051\""),
        "{text}"
    );
}
