//! Smoke tests of the real brokers, with the raw client crates only: one round
//! trip through each (Kafka produce/consume, RabbitMQ publish/get, SQS
//! send/receive, SNS → SQS delivery, a PostgreSQL query), so a broken
//! environment is diagnosed before any adapter test runs.
//!
//! Addresses come from the variables `scripts/brokers.sh env` prints (with the
//! same loopback defaults). A broker that cannot be reached fails the test
//! when `CI=true` or `POSTBOX_REQUIRE_BROKERS=1` (as `scripts/test.sh` sets);
//! otherwise the test says `SKIPPED` with the reason, by name, on stderr.

use std::time::Duration;

use postbox_integration::{
    amqp_url, aws_endpoint, database_url, env_or, kafka_bootstrap, unique, unreachable,
};

const CONNECT: Duration = Duration::from_secs(10);
const ROUND_TRIP: Duration = Duration::from_secs(60);

mod kafka {
    use super::*;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::ClientConfig;

    #[tokio::test]
    async fn kafka_produce_then_consume() {
        let bootstrap = kafka_bootstrap();
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &bootstrap);
        let admin: AdminClient<DefaultClientContext> = config.create().expect("admin client");
        if let Err(e) = admin.inner().fetch_metadata(None, CONNECT) {
            return unreachable(
                "kafka_produce_then_consume",
                &format!("Kafka at {bootstrap}"),
                e,
            );
        }
        let topic = unique("smoke");
        let created = admin
            .create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create topics request");
        created[0].as_ref().expect("topic created");

        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()
            .expect("producer");
        let headers = OwnedHeaders::new().insert(Header {
            key: "ce_type",
            value: Some("smoke.test"),
        });
        let delivered = producer
            .send(
                FutureRecord::to(&topic)
                    .key("k")
                    .payload("hello kafka")
                    .headers(headers),
                ROUND_TRIP,
            )
            .await;
        let (partition, offset) = match delivered {
            Ok(delivery) => (delivery.partition, delivery.offset),
            Err((e, _)) => panic!("produce failed: {e}"),
        };
        assert_eq!((partition, offset), (0, 0));

        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("smoke-group"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()
            .expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let msg = tokio::time::timeout(ROUND_TRIP, consumer.recv())
            .await
            .expect("a record within the time-out")
            .expect("no consume error");
        assert_eq!(msg.payload(), Some(&b"hello kafka"[..]));
        assert_eq!(msg.key(), Some(&b"k"[..]));
        let header = msg.headers().expect("headers").get(0);
        assert_eq!(
            (header.key, header.value),
            ("ce_type", Some(&b"smoke.test"[..]))
        );
    }
}

mod rabbitmq {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    #[tokio::test]
    async fn rabbitmq_publish_confirm_then_get() {
        let url = amqp_url();
        let conn = match tokio::time::timeout(
            CONNECT,
            Connection::connect(&url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return unreachable("rabbitmq_publish_confirm_then_get", "RabbitMQ", e),
            Err(_) => {
                return unreachable(
                    "rabbitmq_publish_confirm_then_get",
                    "RabbitMQ",
                    "connect timed out",
                )
            }
        };
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let queue = unique("smoke");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare");
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"hello rabbit",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "publish was not confirmed: {confirm:?}");
        let got = channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a message in the queue");
        assert_eq!(got.delivery.data, b"hello rabbit");
        got.delivery
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await
            .expect("delete");
    }
}

mod aws {
    use super::*;
    use aws_sdk_sns::config::{BehaviorVersion, Credentials, Region};

    fn creds() -> Credentials {
        Credentials::new(
            env_or("AWS_ACCESS_KEY_ID", "test"),
            env_or("AWS_SECRET_ACCESS_KEY", "test"),
            None,
            None,
            "postbox-smoke-test",
        )
    }

    fn endpoint() -> String {
        aws_endpoint()
    }

    fn sqs() -> aws_sdk_sqs::Client {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(env_or("AWS_REGION", "us-east-1")))
            .endpoint_url(endpoint())
            .credentials_provider(creds())
            .build();
        aws_sdk_sqs::Client::from_conf(config)
    }

    fn sns() -> aws_sdk_sns::Client {
        let config = aws_sdk_sns::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(env_or("AWS_REGION", "us-east-1")))
            .endpoint_url(endpoint())
            .credentials_provider(creds())
            .build();
        aws_sdk_sns::Client::from_conf(config)
    }

    async fn reachable(test: &str, sqs: &aws_sdk_sqs::Client) -> bool {
        match tokio::time::timeout(CONNECT, sqs.list_queues().send()).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                unreachable(
                    test,
                    &format!("SQS at {}", endpoint()),
                    aws_sdk_sqs::error::DisplayErrorContext(e),
                );
                false
            }
            Err(_) => {
                unreachable(
                    test,
                    &format!("SQS at {}", endpoint()),
                    "ListQueues timed out",
                );
                false
            }
        }
    }

    async fn receive_one(sqs: &aws_sdk_sqs::Client, url: &str) -> aws_sdk_sqs::types::Message {
        let deadline = tokio::time::Instant::now() + ROUND_TRIP;
        loop {
            let out = sqs
                .receive_message()
                .queue_url(url)
                .wait_time_seconds(2)
                .max_number_of_messages(1)
                .message_attribute_names("All")
                .send()
                .await
                .expect("receive");
            if let Some(msg) = out.messages.unwrap_or_default().into_iter().next() {
                return msg;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no message within {ROUND_TRIP:?}"
            );
        }
    }

    #[tokio::test]
    async fn sqs_send_then_receive() {
        let sqs = sqs();
        if !reachable("sqs_send_then_receive", &sqs).await {
            return;
        }
        let url = sqs
            .create_queue()
            .queue_name(unique("smoke"))
            .send()
            .await
            .expect("create queue")
            .queue_url
            .expect("url");
        let attr = aws_sdk_sqs::types::MessageAttributeValue::builder()
            .data_type("String")
            .string_value("smoke.test")
            .build()
            .expect("attribute");
        sqs.send_message()
            .queue_url(&url)
            .message_body("hello sqs")
            .message_attributes("type", attr)
            .send()
            .await
            .expect("send");
        let msg = receive_one(&sqs, &url).await;
        assert_eq!(msg.body.as_deref(), Some("hello sqs"));
        let attrs = msg.message_attributes.unwrap_or_default();
        assert_eq!(
            attrs.get("type").and_then(|a| a.string_value.as_deref()),
            Some("smoke.test")
        );
        sqs.delete_message()
            .queue_url(&url)
            .receipt_handle(msg.receipt_handle.expect("receipt"))
            .send()
            .await
            .expect("delete");
        sqs.delete_queue()
            .queue_url(&url)
            .send()
            .await
            .expect("delete queue");
    }

    #[tokio::test]
    async fn sns_to_sqs_delivery() {
        let sqs = sqs();
        if !reachable("sns_to_sqs_delivery", &sqs).await {
            return;
        }
        let sns = sns();
        let topic_arn = sns
            .create_topic()
            .name(unique("smoke"))
            .send()
            .await
            .expect("create topic")
            .topic_arn
            .expect("arn");
        let url = sqs
            .create_queue()
            .queue_name(unique("smoke-sub"))
            .send()
            .await
            .expect("create queue")
            .queue_url
            .expect("url");
        let queue_arn = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue attributes")
            .attributes
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                    .cloned()
            })
            .expect("queue arn");
        sns.subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .expect("subscribe");
        sns.publish()
            .topic_arn(&topic_arn)
            .message("hello sns")
            .send()
            .await
            .expect("publish");
        let msg = receive_one(&sqs, &url).await;
        assert_eq!(
            msg.body.as_deref(),
            Some("hello sns"),
            "raw delivery hands the message body as is"
        );
        sqs.delete_queue()
            .queue_url(&url)
            .send()
            .await
            .expect("delete queue");
        sns.delete_topic()
            .topic_arn(&topic_arn)
            .send()
            .await
            .expect("delete topic");
    }
}

mod postgres {
    use super::*;

    #[tokio::test]
    async fn postgres_query() {
        let url = database_url();
        let (client, connection) = match tokio::time::timeout(
            CONNECT,
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await
        {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return unreachable("postgres_query", "PostgreSQL", e),
            Err(_) => return unreachable("postgres_query", "PostgreSQL", "connect timed out"),
        };
        let conn = tokio::spawn(connection);
        let table = unique("smoke").replace('-', "_");
        client
            .batch_execute(&format!(
                "create temporary table {table} (id bigint primary key, body text not null)"
            ))
            .await
            .expect("create table");
        client
            .execute(
                &format!("insert into {table} values ($1, $2)"),
                &[&1i64, &"hello postgres"],
            )
            .await
            .expect("insert");
        let row = client
            .query_one(&format!("select body from {table} where id = $1"), &[&1i64])
            .await
            .expect("select");
        assert_eq!(row.get::<_, String>(0), "hello postgres");
        drop(client);
        let _ = conn.await;
    }
}
