"""Addresses and wire formats shared by the coordinator and the slaves."""
