"""The edge server's Flask app, in the shape of Flask's tutorial: app.py creates it; every other module
imports only downward (protocol -> archive, store, metrics -> state -> auth -> pipeline -> the
blueprints: infer, batch, health, review). The HTTP contract: docs/api.md."""
