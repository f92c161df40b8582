"""Hooks holding the connections of the model deployer backends."""
