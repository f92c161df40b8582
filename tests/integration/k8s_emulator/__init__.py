"""A Kubernetes API *emulator* for tests: no Kubernetes can run on the test machines.

``server.py`` is a real HTTP server speaking the REST paths and semantics the official
``kubernetes`` client uses for SeldonDeployments, Secrets, pods and pod logs, with a stand-in for
the Seldon operator that runs real local MLflow model servers for each predictor. It is not
Kubernetes: ``docker/kind/`` runs the same end-to-end tests against a real cluster.
"""
