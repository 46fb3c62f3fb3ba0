//! `SqsBroker::from_env` / `SqsConfig::from_env` against a controlled
//! environment. One test in its own binary: it changes the process
//! environment, which no other test may read meanwhile. No network: building
//! clients sends nothing.

use postbox_core::{Broker, ErrorKind};
use postbox_sqs::{SqsBroker, SqsConfig};

#[tokio::test(flavor = "current_thread")]
async fn from_env_names_what_is_missing_or_wrong() {
    // Nothing the default chain could take a region from: no variables, no
    // profile files, no instance metadata.
    for var in [
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SQS",
        "AWS_ENDPOINT_URL_SNS",
    ] {
        std::env::remove_var(var);
    }
    std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/postbox/aws-config");
    std::env::set_var(
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/postbox/aws-credentials",
    );
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");

    let e = SqsBroker::from_env().await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(e.message().contains("AWS_REGION"), "{e}");

    // A URL's region is enough.
    let broker = SqsBroker::connect(SqsConfig::from_url("sqs://?region=eu-west-1").unwrap())
        .await
        .unwrap();
    assert_eq!(broker.system(), "aws_sqs");

    // An endpoint that is not a URL is named.
    std::env::set_var("AWS_ENDPOINT_URL", "localhost:4566");
    let e = SqsConfig::from_env().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(e.message().contains("AWS_ENDPOINT_URL"), "{e}");

    std::env::set_var("AWS_ENDPOINT_URL", "http://127.0.0.1:4566");
    std::env::set_var("AWS_REGION", "us-east-1");
    let broker = SqsBroker::from_env().await.unwrap();
    assert!(format!("{broker:?}").contains("us-east-1"));
}
