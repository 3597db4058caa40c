"""The icbd FUSE filesystem: the names a mount shows, its memory cache, readahead and boot profiles."""
