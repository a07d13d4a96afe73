//! The idemq `Broker` conformance suite on a real RabbitMQ, on classic and
//! on quorum queues.

mod common;

use idemq::testing::broker::BrokerCaps;

fn caps() -> BrokerCaps {
    BrokerCaps {
        retry_delay: common::SHORT_TIER,
        ..BrokerCaps::default()
    }
}

mod classic {
    use super::*;
    use idemq_rabbitmq::RabbitBroker;

    async fn setup(name: &str) -> Option<RabbitBroker> {
        common::connect(common::config(name)).await
    }

    idemq::broker_conformance!(setup, caps(), teardown = common::cleanup);
}

mod quorum {
    use super::*;
    use idemq_rabbitmq::{QueueType, RabbitBroker};

    async fn setup(name: &str) -> Option<RabbitBroker> {
        common::connect(common::config(name).with_queue_type(QueueType::Quorum)).await
    }

    idemq::broker_conformance!(setup, caps(), teardown = common::cleanup);
}
