"""incidentd's application core: commands, the factory that decodes messages into them, the dispatcher and
the handlers. Nothing here imports from ``infra``; adapters reach handlers through the protocols in
:mod:`application.ports`."""
