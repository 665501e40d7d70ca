//! The hub's grant for a site's leafnode identity, against real servers:
//! a hub and the leaves of two sites. Each site's leaf can be mirrored to
//! the hub (flow control included), and cannot reach the other site's
//! JetStream in either direction.

use crate::support;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use presenced::acl::render;
use presenced::naming::{self, Site};
use std::time::Duration;
use support::{NatsOptions, NatsServer};

const DEADLINE: Duration = Duration::from_secs(30);
/// Mirrored values: four of them are more than a mirror consumer sends
/// without a flow-control reply (2 MiB window), so the mirror completing
/// proves the replies get through.
const BIG: usize = 700 << 10;

struct Leaf {
    site: Site,
    server: NatsServer,
    js: jetstream::Context,
    client: async_nats::Client,
}

async fn leaf(site: &str, hub_port: u16, seed: &str) -> Leaf {
    let site = Site::new(site).unwrap();
    let server = NatsServer::start(NatsOptions {
        domain: Some(site.leaf_domain()),
        extra: format!(
            "leafnodes {{\n  remotes: [ {{ urls: [\"nats://127.0.0.1:{hub_port}\"], nkey: \"{seed}\" }} ]\n}}\n"
        ),
        ..Default::default()
    });
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let store = js
        .create_key_value(kv::Config {
            bucket: naming::PRESENCE_BUCKET.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..4 {
        store
            .put(format!("big-{i}"), vec![b'x'; BIG].into())
            .await
            .unwrap();
    }
    store
        .put("hall", site.as_str().to_owned().into())
        .await
        .unwrap();
    Leaf {
        site,
        server,
        js,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_mirrors_its_own_keyspaces_to_the_hub_and_cannot_reach_another_site() {
    let home_kp = nkeys::KeyPair::new_user();
    let away_kp = nkeys::KeyPair::new_user();
    let admin_kp = nkeys::KeyPair::new_user();
    let home_site = Site::new("home").unwrap();
    let away_site = Site::new("away").unwrap();
    // The hub's authorization as `presenced acl-hub` renders it from the
    // sites' access files.
    let files = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (site, kp) in [(&home_site, &home_kp), (&away_site, &away_kp)] {
        let path = files.path().join(format!("{site}-access.toml"));
        std::fs::write(
            &path,
            format!("leafnode = {{ nkey = \"{}\" }}\n", kp.public_key()),
        )
        .unwrap();
        pairs.push(format!("{site}={}", path.display()));
    }
    let admin_public = admin_kp.public_key();
    let mut args = vec!["acl-hub", "--admin-nkey", admin_public.as_str()];
    args.extend(pairs.iter().map(String::as_str));
    let out = support::daemon::run_presenced(&args, &[]);
    assert!(
        out.status.success(),
        "acl-hub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let authorization = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        authorization,
        render::render_hub(
            Some(&admin_public),
            &[
                (away_site.clone(), away_kp.public_key()),
                (home_site.clone(), home_kp.public_key()),
            ],
        ),
        "the CLI renders what the library does, sites in order"
    );
    // A site file without a leafnode identity is refused by name.
    let bare = files.path().join("bare.toml");
    std::fs::write(&bare, "").unwrap();
    let out =
        support::daemon::run_presenced(&["acl-hub", &format!("bare={}", bare.display())], &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no `leafnode` identity"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hub_port = support::free_port();
    // A test-only user of the hub that watches mirror deliveries: what
    // the hub accepted from a leaf onto them.
    let observer_kp = nkeys::KeyPair::new_user();
    let observed = authorization.replacen(
        "users = [\n",
        &format!(
            "users = [\n    {{ nkey: \"{}\", permissions: {{ publish: {{ deny: [\">\"] }}, subscribe: {{ allow: [\"$JS.M.>\"] }} }} }}\n",
            observer_kp.public_key()
        ),
        1,
    );
    let hub = NatsServer::start(NatsOptions {
        domain: Some(naming::HUB_DOMAIN.to_owned()),
        extra: format!("leafnodes {{\n  listen: \"127.0.0.1:{hub_port}\"\n}}\n{observed}"),
        ..Default::default()
    });
    let home = leaf("home", hub_port, &home_kp.seed().unwrap()).await;
    let away = leaf("away", hub_port, &away_kp.seed().unwrap()).await;
    let hub_client = async_nats::ConnectOptions::new()
        .nkey(admin_kp.seed().unwrap())
        .connect(hub.url())
        .await
        .unwrap();
    let hub_js = jetstream::new(hub_client.clone());

    // Mirrors of both sites' presence, each through its own site's API and
    // delivered under its own site's prefix, as provision-hub makes them.
    for l in [&home, &away] {
        let m = presenced::hub::mirrors::mirrors(&l.site)
            .into_iter()
            .find(|m| m.source == naming::PRESENCE_BUCKET)
            .unwrap();
        // The links come up a moment after the leaves start.
        let end = tokio::time::Instant::now() + DEADLINE;
        let source = loop {
            match presenced::hub::mirrors::leaf_stream_info(
                &hub_client,
                &l.site,
                &m.source_stream(),
            )
            .await
            {
                Ok(info) => break info.config,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < end,
                        "the hub admin cannot read {}'s source over its link: {e}",
                        l.site
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let config = presenced::hub::mirrors::mirror_config(&l.site, &m, &source, 1);
        let name = config.name.clone();
        let mut mirror = hub_js.create_stream(config).await.unwrap();
        let end = tokio::time::Instant::now() + DEADLINE;
        while !mirror.info().await.is_ok_and(|i| i.state.messages == 5) {
            assert!(
                tokio::time::Instant::now() < end,
                "hub mirror {name} not complete within {DEADLINE:?}: {:?}",
                mirror.cached_info().state
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let last = mirror
            .get_last_raw_message_by_subject(&naming::kv_subject(naming::PRESENCE_BUCKET, "hall"))
            .await
            .unwrap();
        assert_eq!(last.payload.as_ref(), l.site.as_str().as_bytes());
    }

    // Home's leaf cannot reach away's JetStream, neither to read nor to
    // write: the hub does not even tell it that anyone listens there.
    let away_api = format!(
        "$JS.{}.API.STREAM.INFO.{}",
        away_site.leaf_domain(),
        naming::kv_stream(naming::PRESENCE_BUCKET)
    );
    // The hub's admin reaches it (provision-hub reads mirror sources so),
    // on an inbox of away's; on an inbox of home's, away may not answer.
    let info = presenced::hub::mirrors::leaf_stream_info(
        &hub_client,
        &away_site,
        &naming::kv_stream(naming::PRESENCE_BUCKET),
    )
    .await
    .unwrap();
    assert_eq!(info.state.messages, 5);
    let wrong_inbox = format!("{}.x", naming::leaf::admin_reply_prefix(&home_site));
    let answer = hub_client
        .send_request(
            away_api.clone(),
            async_nats::Request::new()
                .payload("".into())
                .inbox(wrong_inbox)
                .timeout(Some(Duration::from_secs(2))),
        )
        .await;
    assert!(answer.is_err(), "away answered on home's inbox");
    let err = home
        .client
        .request(away_api, "".into())
        .await
        .expect_err("home's leaf reached away's JetStream API");
    assert_eq!(
        err.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{err}"
    );
    let purge = format!(
        "$JS.{}.API.STREAM.PURGE.{}",
        away_site.leaf_domain(),
        naming::kv_stream(naming::PRESENCE_BUCKET)
    );
    assert!(home.client.request(purge, "".into()).await.is_err());
    let away_kv = away
        .js
        .get_key_value(naming::PRESENCE_BUCKET)
        .await
        .unwrap();
    assert_eq!(
        away_kv.get("hall").await.unwrap().unwrap().as_ref(),
        b"away",
        "away's presence was changed from home"
    );

    // Nor can it draw away's traffic by claiming interest in it. The hub
    // publishes on away's API (away receives it), then on home's own; the
    // link delivers in order, so had the first reached home, it would be
    // there by the time the second is.
    let mut stolen = home
        .client
        .subscribe(format!("$JS.{}.API.>", away_site.leaf_domain()))
        .await
        .unwrap();
    let mut own = home
        .client
        .subscribe(format!("$JS.{}.API.TEST.>", home_site.leaf_domain()))
        .await
        .unwrap();
    let mut at_away = away
        .client
        .subscribe(format!("$JS.{}.API.TEST.>", away_site.leaf_domain()))
        .await
        .unwrap();
    home.client.flush().await.unwrap();
    away.client.flush().await.unwrap();
    let marker = format!("$JS.{}.API.TEST.marker", home_site.leaf_domain());
    let probe = format!("$JS.{}.API.TEST.probe", away_site.leaf_domain());
    // The subscriptions take a moment to cross the links.
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        hub_client.publish(probe.clone(), "p".into()).await.unwrap();
        hub_client
            .publish(marker.clone(), "m".into())
            .await
            .unwrap();
        hub_client.flush().await.unwrap();
        let wait = Duration::from_millis(500);
        let away_got = tokio::time::timeout(wait, at_away.next()).await.is_ok();
        let home_got = tokio::time::timeout(wait, own.next()).await.is_ok();
        if away_got && home_got {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the hub's messages did not reach the sites' own subjects"
        );
    }
    hub_client.publish(probe, "last".into()).await.unwrap();
    hub_client.publish(marker, "last".into()).await.unwrap();
    hub_client.flush().await.unwrap();
    for sub in [&mut at_away, &mut own] {
        loop {
            let m = tokio::time::timeout(DEADLINE, sub.next())
                .await
                .expect("the last message")
                .unwrap();
            if m.payload.as_ref() == b"last" {
                break;
            }
        }
    }
    assert!(
        tokio::time::timeout(Duration::ZERO, stolen.next())
            .await
            .is_err(),
        "a message on away's API reached home's leaf"
    );

    // Home injects into away's mirror: a delivery onto away's prefix (as
    // if home had learned away's mirror's delivery subject) is dropped by
    // the hub; home's own prefix passes (the marker). A hub client
    // listening on both sites' delivery subjects sees what the hub
    // accepted.
    // One subscription per site: the hub tells a leaf about interest its
    // grant covers only.
    let observer = async_nats::ConnectOptions::new()
        .nkey(observer_kp.seed().unwrap())
        .connect(hub.url())
        .await
        .unwrap();
    let mut at_home = observer
        .subscribe(naming::leaf::mirror_deliveries(&home_site))
        .await
        .unwrap();
    let mut at_away = observer
        .subscribe(naming::leaf::mirror_deliveries(&away_site))
        .await
        .unwrap();
    observer.flush().await.unwrap();
    let forged = format!(
        "{}.M.forged",
        naming::leaf::mirror_delivery_prefix(&away_site)
    );
    let marker = format!(
        "{}.M.marker",
        naming::leaf::mirror_delivery_prefix(&home_site)
    );
    let end = tokio::time::Instant::now() + DEADLINE;
    'marker: loop {
        home.client
            .publish(forged.clone(), "forged".into())
            .await
            .unwrap();
        home.client
            .publish(marker.clone(), "m".into())
            .await
            .unwrap();
        home.client.flush().await.unwrap();
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), at_home.next()).await
        {
            if m.subject.as_str() == marker {
                break 'marker;
            }
        }
        assert!(
            tokio::time::Instant::now() < end,
            "home's own delivery prefix did not reach the hub"
        );
    }
    // The connection hands messages to subscriptions in arrival order:
    // had the forged delivery (sent first) got through, it would be
    // waiting by now. Away's real deliveries may be there too.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), at_away.next()).await {
        assert_ne!(
            m.subject.as_str(),
            forged,
            "the hub accepted a delivery from home onto away's mirror"
        );
    }
    let away_mirror = away_site.hub_mirror(naming::PRESENCE_BUCKET);
    let mut away_mirror = hub_js
        .get_stream(naming::kv_stream(&away_mirror))
        .await
        .unwrap();
    assert_eq!(away_mirror.info().await.unwrap().state.messages, 5);
    // And the mirror still catches up with away.
    away_kv.put("hall", "away-2".into()).await.unwrap();
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let last = away_mirror
            .get_last_raw_message_by_subject(&naming::kv_subject(naming::PRESENCE_BUCKET, "hall"))
            .await
            .unwrap();
        if last.payload.as_ref() == b"away-2" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "away's mirror stopped following"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // [hub] and `presenced status` of a site ask the hub about its own
    // mirrors through its link, answered on inboxes naming the site; not
    // about another site's.
    let link = presenced::hub::link::HubLink::new(
        home.client.clone(),
        home_site.clone(),
        Duration::from_secs(2),
    );
    let own = naming::kv_stream(&home_site.hub_mirror(naming::PRESENCE_BUCKET));
    let info = link
        .stream_info(&own)
        .await
        .expect("home reads its own mirror's health");
    assert_eq!(info.config.name, own);
    let other = naming::kv_stream(&away_site.hub_mirror(naming::PRESENCE_BUCKET));
    assert!(
        link.stream_info(&other).await.is_err(),
        "home read away's mirror's health"
    );
    drop((home.server, away.server));
}
