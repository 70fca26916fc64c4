"""The tests' part of the lab: what only tests and the benchmark start.

The fake Kubernetes API server (``fakekube``), the Azurite, barman and
PostgreSQL launchers of the backup scenario, the random policy generator
(``policygen``), the classifier's test runner (``bpfrun``), and the HTTP
upstream, UDP server and packet log run in lab hosts. They build on the
product's lab (``egress_agent.lab``: namespaces, servers, clients, test CA),
which the demo uses too; the product never imports this package.
"""
