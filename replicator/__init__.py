"""Replication of iMIs: the master and replica nodes, and what every node shares."""
