"""The icbd FUSE filesystem and command line."""
