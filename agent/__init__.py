"""The node agent: CLI, composition of rules and proxy, start-up and teardown."""
