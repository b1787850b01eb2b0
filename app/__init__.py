"""Swarm Core: asynchronous RPC core for IoT fleets."""
