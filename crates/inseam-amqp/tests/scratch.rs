use std::time::Duration;
use inseam_amqp::{Amqp, AmqpOptions};
use inseam_core::transport::{Outgoing, Subscription, Transport};

#[tokio::test(flavor = "multi_thread")]
async fn scratch_nack() {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let options = AmqpOptions::from_url("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap().exchange(format!("scratch-{run}")).prefix(format!("scratch-{run}"));
    let amqp = Amqp::connect_with(options).await.unwrap();
    let channel = format!("scratch.{run}");
    amqp.provision(&[channel.clone()]).await.unwrap();
    let msgs: Vec<Outgoing> = ["first", "second"].iter().map(|l| Outgoing { channel: channel.clone(), message_id: uuid::Uuid::now_v7(), key: Some("k".into()), headers: vec![], payload: bytes::Bytes::from(l.to_string()) }).collect();
    let mut c = amqp.subscribe(&Subscription::new(format!("g-{run}"), [channel.clone()])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for r in amqp.publish(&msgs).await { r.unwrap(); }
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(8) {
        for m in c.fetch(10, Duration::from_millis(100)).await.unwrap() {
            eprintln!("{:?} {} attempt {}", start.elapsed(), String::from_utf8_lossy(&m.payload), m.attempt);
            if &m.payload[..] == b"first" && n < 2 { n += 1; m.nack(Duration::from_millis(600)).await.unwrap(); } else { m.ack().await.unwrap(); }
        }
    }
}
