"""What every icbd node, mount and tool shares: wire formats and records, the
data-folder layout, HTTP and node plumbing, errors. It imports nothing else of icbd."""
