"""Replication of iMIs: the master and replica nodes."""
