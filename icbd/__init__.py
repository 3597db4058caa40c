"""The `icbd` command line: servers, admin commands, mount, boot and bench."""
