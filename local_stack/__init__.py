"""Local real servers for development and integration tests (see local_stack.services)."""
