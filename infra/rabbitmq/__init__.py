"""RabbitMQ transport on aio-pika: topology, subscriber (outcome -> ack / retry copy / dead-letter copy),
publisher with confirms, and the dead-letter queue. Imported only when ``INCIDENTD_BROKER=rabbitmq``.

Same file names as ``infra/pubsub``: ``broker.py``, ``subscriber.py``, ``publisher.py``, ``message.py``,
``topology.py``, ``dlq.py``. See docs/rabbitmq.md.
"""

from infra.rabbitmq.broker import RabbitBroker, open_broker

__all__ = ["RabbitBroker", "open_broker"]
