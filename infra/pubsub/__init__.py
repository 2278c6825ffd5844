"""Google Pub/Sub transport on google-cloud-pubsub: topology, subscriber (streaming pull bridged into
the event loop; outcome -> ack / retry copy / dead-letter copy), publisher, and the dead-letter
subscription. Imported only when ``INCIDENTD_BROKER=pubsub``.

Same file names as ``infra/rabbitmq``: ``broker.py``, ``subscriber.py``, ``publisher.py``, ``message.py``,
``topology.py``, ``dlq.py``. See docs/pubsub.md.
"""

from infra.pubsub.broker import PubSubBroker, open_broker

__all__ = ["PubSubBroker", "open_broker"]
